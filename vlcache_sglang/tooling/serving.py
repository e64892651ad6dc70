"""Start and stop a real SGLang server on loopback (tests, the demo, benchmarks, tuning).

The server is started with the stock ``python -m sglang.launch_server`` in its own process
group and stopped by that process id; on a machine without CUDA the CPU engine switches are
set (``SGLANG_USE_CPU_ENGINE=1``, ``--device cpu``). Only 127.0.0.1 is ever bound.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import requests

LOOPBACK = "127.0.0.1"
STACK_DUMP_WAIT_S = 3.0  # after SIGUSR1, for every process to write its stacks


def vlcache_state(url: str) -> dict:
    """The plugin's pool and compression accounting in the server's ``/server_info``
    (``internal_states[0].vlcache``: free and evictable KV, live compressed rows, counters)."""
    return requests.get(f"{url}/server_info", timeout=60).json()["internal_states"][0]["vlcache"]


LIVE_STORES = ("compressed_requests_live", "pending_statistics", "resolved_rows_live", "request_states_live",
               "row_flags_live", "virtual_ids_live", "cell_slots_live")
"""The plugin's per-request and per-row stores in :func:`vlcache_state`: all zero once nothing
is live and the radix tree is empty."""


def wait_for(predicate, what: str, timeout: float = 120.0, interval: float = 0.02):
    """Poll ``predicate()`` until it returns something true and return that; raise
    ``AssertionError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"never observed within {timeout:.0f} s: {what}")


def settled_state(url: str, timeout: float = 60.0, flush: bool = False) -> dict:
    """:func:`vlcache_state` once no compressed request is live and no statistics are pending
    (every compaction and release is done), or after ``timeout`` seconds, whichever comes first;
    with ``flush`` the radix tree is emptied first, so the state is the server's at-start state
    if nothing leaked (see :func:`differences_from_start`)."""
    deadline = time.monotonic() + timeout
    while True:
        st = vlcache_state(url)
        if (st["compressed_requests_live"] == 0 and st["pending_statistics"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if not flush:
        return st
    flush_cache(url)
    return vlcache_state(url)


def differences_from_start(state: dict) -> dict:
    """What in ``state`` (a settled, flushed :func:`vlcache_state`) is not as at start: every
    store empty, the whole pool free and nothing evictable. ``{}`` when all is back."""
    expected = {k: 0 for k in LIVE_STORES} | {"available_kv_tokens": state["max_total_num_tokens"],
                                                "evictable_kv_tokens": 0}
    return {k: (state[k], v) for k, v in expected.items() if state[k] != v}


def flush_cache(url: str, timeout: float = 30.0) -> None:
    """Empty the server's radix cache (``POST /flush_cache``). SGLang refuses (400) while a request
    is still in its running batch, which a just-answered request can be for a moment, so this
    retries until the flush is accepted and raises if it never is within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        r = requests.post(f"{url}/flush_cache", timeout=60)
        if r.status_code == 200:
            return
        if time.monotonic() >= deadline:
            raise RuntimeError(f"flush_cache refused for {timeout:.0f} s: {r.status_code} {r.text}")
        time.sleep(0.1)


def _ephemeral_port_floor() -> int:
    """Lowest port the kernel hands out to outgoing and ``bind(0)`` sockets (Linux default 32768)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A free port *below* the kernel's ephemeral range.

    A port taken with ``bind(0)`` comes from the ephemeral range, and in the seconds before the
    server binds it again the kernel may give that same number to another socket: a two-rank
    CPU server opens gloo pair sockets exactly then (CI saw ``[Errno 98] address already in
    use`` on the HTTP port).  Ports below the range are never assigned implicitly.  SGLang puts
    its NCCL/gloo rendezvous at ``port + 100..1000``, so keep clear of the floor by that much.
    """
    high = _ephemeral_port_floor() - 1100
    low = min(20000, high - 1000)
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def mm_process_config(model_path: str | os.PathLike) -> dict | None:
    """Honour the model's own image-size limits (SGLang otherwise forces Qwen2-VL's defaults)."""
    path = Path(model_path) / "preprocessor_config.json"
    if not path.exists():
        path = Path(model_path) / "processor_config.json"
    if not path.exists():
        return None
    cfg = json.loads(path.read_text())
    cfg = cfg.get("image_processor", cfg)
    size = cfg.get("size") or {}
    if "shortest_edge" in size and "longest_edge" in size:
        return {"image": {"size": {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}}}
    return None


@dataclass
class ServerHandle:
    """A running server: its URL, process and log file."""

    process: subprocess.Popen
    port: int
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0, dump_stacks: bool = False) -> None:
        """SIGTERM the server's process group, wait until every member is gone, then SIGKILL.

        ``dump_stacks``: first ``SIGUSR1`` to the group and a moment's wait: processes of the GPU
        profile (:mod:`~vlcache_sglang.tooling.gpu_sitecustomize`) write every thread's stack into
        the log; a process without that handler just ends, as it was about to."""
        pgid = self.process.pid
        if dump_stacks and self.process.poll() is None:
            try:
                os.killpg(pgid, signal.SIGUSR1)
                time.sleep(STACK_DUMP_WAIT_S)
            except ProcessLookupError:
                return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.process.poll()
                if not _group_alive(pgid):
                    return
                time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies still count for killpg; treat a group whose only members are zombies as gone
    try:
        out = subprocess.run(["ps", "-o", "stat=", "-g", str(pgid)], capture_output=True, text=True).stdout
    except OSError:
        return True
    return any(s and not s.startswith("Z") for s in out.split())


def server_command(model_path: str | os.PathLike, *, attention_backend: str = "vlcache", port: int,
                   max_total_tokens: int = 16384, max_running_requests: int = 16,
                   extra_args: list[str] | None = None) -> list[str]:
    cmd = [
        sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
        "--attention-backend", attention_backend, "--host", LOOPBACK, "--port", str(port),
        "--max-total-tokens", str(max_total_tokens), "--max-running-requests", str(max_running_requests),
        "--dtype", "float32",
    ]
    if not has_cuda():
        cmd += ["--device", "cpu"]
    mm = mm_process_config(model_path)
    if mm is not None:
        cmd += ["--mm-process-config", json.dumps(mm)]
    return cmd + list(extra_args or [])


def server_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("SGLANG_PLUGINS", "vlcache")
    if not has_cuda():
        env["SGLANG_USE_CPU_ENGINE"] = "1"
    env.update(extra_env or {})
    return env


class _PortTaken(RuntimeError):
    """The HTTP port was taken between choosing it and the server binding it."""


def start_server(model_path: str | os.PathLike, *, attention_backend: str = "vlcache",
                 extra_args: list[str] | None = None, extra_env: dict[str, str] | None = None,
                 log_path: str | os.PathLike | None = None, startup_timeout: float = 240.0,
                 port_attempts: int = 3, spawned: list[ServerHandle] | None = None, **kwargs) -> ServerHandle:
    """Launch the stock SGLang server and wait until it generates; raises with the log tail on failure.

    Only a lost race for the HTTP port is retried (on a fresh port): SGLang logs
    ``address already in use`` and then waits forever instead of exiting. Each process is
    appended to ``spawned`` as soon as it exists, so a caller stopped while it waits (SIGTERM)
    can stop servers that are not up yet.
    """
    for attempt in range(port_attempts):
        try:
            return _start_once(model_path, attention_backend=attention_backend, extra_args=extra_args,
                               extra_env=extra_env, log_path=log_path, startup_timeout=startup_timeout,
                               spawned=spawned, **kwargs)
        except _PortTaken as exc:
            if attempt == port_attempts - 1:
                raise RuntimeError(f"SGLang server could not bind a port in {port_attempts} attempts:\n{exc}") from None
    raise AssertionError("unreachable")


def _start_once(model_path: str | os.PathLike, *, attention_backend: str, extra_args: list[str] | None,
                extra_env: dict[str, str] | None, log_path: str | os.PathLike | None,
                startup_timeout: float, spawned: list[ServerHandle] | None = None, **kwargs) -> ServerHandle:
    port = free_port()
    cmd = server_command(model_path, attention_backend=attention_backend, port=port, extra_args=extra_args, **kwargs)
    log = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="sglang-", suffix=".log")[1])
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=server_env(extra_env),
                                start_new_session=True)
    handle = ServerHandle(process=proc, port=port, log_path=log, args=cmd)
    if spawned is not None:
        spawned.append(handle)
    bind_failure = f"error while attempting to bind on address ('{LOOPBACK}', {port})"
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            handle.stop()
            raise RuntimeError(f"SGLang server exited with code {proc.returncode}:\n{handle.log_tail()}")
        try:
            if requests.get(f"{handle.url}/health_generate", timeout=30).status_code == 200:
                return handle
        except requests.RequestException:
            if bind_failure in log.read_text(errors="replace"):
                handle.stop()
                raise _PortTaken(handle.log_tail()) from None
        time.sleep(1.0)
    handle.stop(dump_stacks=True)
    raise TimeoutError(f"SGLang server not ready after {startup_timeout:.0f} s:\n{handle.log_tail()}")


@contextmanager
def running_server(model_path: str | os.PathLike, **kwargs) -> Iterator[ServerHandle]:
    handle = start_server(model_path, **kwargs)
    try:
        yield handle
    finally:
        handle.stop()


@contextmanager
def running_servers(specs: dict[str, dict]) -> Iterator[dict[str, ServerHandle | Exception]]:
    """Start every server of ``specs`` (name -> :func:`start_server`'s keywords, ``model_path``
    among them) at the same time and wait for all: their imports, weight loading and JIT builds
    overlap. Yields name -> handle, or the exception that server failed with; stops them all on
    exit, also those still starting when the caller is stopped."""
    import concurrent.futures as cf

    spawned: list[ServerHandle] = []
    results: dict[str, ServerHandle | Exception] = {}
    pool = cf.ThreadPoolExecutor(max_workers=len(specs))
    try:
        futures = {name: pool.submit(start_server, spawned=spawned, **spec) for name, spec in specs.items()}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except Exception as exc:
                results[name] = exc
        yield results
    finally:
        ready = {id(h) for h in results.values() if isinstance(h, ServerHandle)}
        for handle in list(spawned):  # a server not up yet exits (saying where it was), its start thread with it
            handle.stop(dump_stacks=id(handle) not in ready)
        pool.shutdown(wait=True)
