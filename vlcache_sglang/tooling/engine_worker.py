"""An offline SGLang ``Engine`` in a child process, for inputs HTTP cannot carry.

SGLang 0.5.23's ``/generate`` takes a video only as a string or ``{"url": ...}`` (a path, URL or
base64 of an encoded file), which it decodes with torchcodec or decord; the CPU install has
neither (``requirements/sglang-cpu.txt`` leaves torchcodec out, ``torchvision.io.read_video`` is
gone), and the HF video processor needs torchcodec for strings too. The offline Engine passes
a frames tensor or array straight to the processor, so video is served through the same
tokenizer manager, scheduler, model and backend as any request.

The Engine runs in a spawned child that leads its own process group: the caller's process
keeps its environment (the launch hooks export ``VLCACHE_*`` settings) and its SGLang classes
unhooked, and :meth:`EngineHandle.stop` ends the whole group.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _serve(conn, model_path: str, engine_kwargs: dict, env: dict) -> None:
    os.setsid()
    os.environ.update(env)
    import sglang as sgl

    try:
        engine = sgl.Engine(model_path=model_path, **engine_kwargs)
    except BaseException as exc:  # report why, then exit
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    try:
        while True:
            op, kwargs = conn.recv()
            if op == "stop":
                break
            try:
                if op == "generate":
                    out: Any = engine.generate(**kwargs)
                elif op == "state":
                    out = engine.get_server_info()["internal_states"][0]["vlcache"]
                elif op == "flush":
                    out = bool(getattr(engine.flush_cache(), "success", True))
                else:
                    raise ValueError(f"unknown operation {op!r}")
                conn.send(("ok", out))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        engine.shutdown()


class EngineHandle:
    """Calls into the child's Engine: :meth:`generate` (``Engine.generate`` keyword arguments),
    :meth:`state` (``/server_info``'s ``vlcache`` entry), :meth:`flush` (the radix cache)."""

    def __init__(self, process, conn) -> None:
        self.process, self._conn = process, conn

    def _call(self, op: str, kwargs: dict | None = None, timeout: float = 600.0):
        self._conn.send((op, kwargs or {}))
        if not self._conn.poll(timeout):
            raise TimeoutError(f"engine did not answer {op!r} within {timeout:.0f} s")
        status, out = self._conn.recv()
        if status != "ok":
            raise RuntimeError(out)
        return out

    def generate(self, **kwargs) -> dict:
        return self._call("generate", kwargs)

    def state(self) -> dict:
        return self._call("state")

    def flush(self) -> bool:
        return self._call("flush")

    def stop(self, timeout: float = 60.0) -> None:
        try:
            self._conn.send(("stop", {}))
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # the Engine's scheduler and detokenizer
            try:
                os.killpg(self.process.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            time.sleep(1.0)
        self.process.join(5)


@contextmanager
def running_engine(model_path: str | os.PathLike, startup_timeout: float = 300.0, **engine_kwargs) -> Iterator[EngineHandle]:
    """An ``attention_backend="vlcache"`` Engine (CPU switches as :mod:`vlcache_sglang.tooling.serving`)."""
    from vlcache_sglang.tooling.serving import has_cuda, mm_process_config

    kwargs: dict = {"attention_backend": "vlcache", "dtype": "float32", "max_total_tokens": 16384,
                    "max_running_requests": 16}
    env = {"SGLANG_PLUGINS": os.environ.get("SGLANG_PLUGINS", "vlcache")}
    if not has_cuda():
        kwargs["device"] = "cpu"
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    mm = mm_process_config(model_path)
    if mm is not None:
        kwargs["mm_process_config"] = mm
    kwargs.update(engine_kwargs)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_serve, args=(child, str(Path(model_path)), kwargs, env), daemon=False)
    process.start()
    handle = EngineHandle(process, parent)
    try:
        if not parent.poll(startup_timeout):
            raise TimeoutError(f"SGLang engine not ready after {startup_timeout:.0f} s")
        status, out = parent.recv()
        if status != "ok":
            raise RuntimeError(f"SGLang engine failed to start: {out}")
        yield handle
    finally:
        handle.stop()
