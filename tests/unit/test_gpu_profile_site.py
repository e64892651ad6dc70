"""What ``gpu_kit install`` adds to the GPU site folder beside the wheels, rehearsed on CPU.

The first whole-server run on the H200 (2026-12-04) stopped at two things the wheels alone did not
give: the vlcache servers refused ``--attention-backend vlcache`` (no ``sglang.srt.plugins`` entry
point for a package merely on ``PYTHONPATH``), and every server died building Qwen2's MLP
(``DualGemm._select_mode`` imports ``cutlass``, which the kit lacks).
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.unit.fake_cuda import PRELUDE
from vlcache_sglang.tooling.gpu_kit import SGL_KERNEL_PLACEHOLDER, install_profile

REPO = Path(__file__).resolve().parents[2]


def test_the_project_is_registered_as_an_sglang_plugin(tmp_path):
    install_profile(tmp_path)
    dists = [d for d in importlib.metadata.distributions(path=[str(tmp_path)]) if d.metadata["Name"] == "vlcache-sglang"]
    assert len(dists) == 1
    points = [ep for ep in dists[0].entry_points if ep.group == "sglang.srt.plugins"]
    assert [(ep.name, ep.value) for ep in points] == [("vlcache", "vlcache_sglang.plugin:register")]
    assert (tmp_path / "sitecustomize.py").read_text().startswith('"""``sitecustomize`` of the GPU kit')


DUAL_GEMM_AS_ON_CUDA = PRELUDE + textwrap.dedent("""
    from sglang.srt.layers.dual_gemm import DualGemm
    gemm = DualGemm.__new__(DualGemm)
    try:
        print("MODE", gemm._select_mode(None, 128), "MAX", gemm.max_tokens)
    except ImportError as exc:
        print("IMPORT ERROR", exc)
""")


@pytest.mark.parametrize("with_profile", [True, False])
def test_dual_gemm_without_cutlass_is_off_with_the_profile(tmp_path, with_profile):
    pytest.importorskip("sglang")
    install_profile(tmp_path)
    paths = ([str(tmp_path)] if with_profile else []) + [str(REPO), str(REPO / SGL_KERNEL_PLACEHOLDER)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "SGLANG_FORCE_FUSED_OP_BACKEND": "torch"}
    proc = subprocess.run([sys.executable, "-c", DUAL_GEMM_AS_ON_CUDA], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if with_profile:  # sitecustomize ran at interpreter start, from the site folder on PYTHONPATH
        assert "MODE None MAX 0" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    else:  # what the first GPU run met (there: No module named 'cutlass'; here 'cuda' comes first)
        assert "IMPORT ERROR" in proc.stdout, proc.stdout


HANGING_SERVER = textwrap.dedent("""
    import threading, time
    def first_request():
        time.sleep(120)  # stands for a server stuck in its first request
    threading.Thread(target=first_request, name="stuck-scheduler", daemon=True).start()
    print("READY", flush=True)
    time.sleep(120)
""")


def test_a_server_stopped_before_it_was_ready_leaves_its_stacks(tmp_path):
    """The profile's SIGUSR1 handler, and ``ServerHandle.stop(dump_stacks=True)`` using it: a
    process of the profile stopped while it hangs writes every thread's stack into its log."""
    import time

    from vlcache_sglang.tooling.serving import ServerHandle

    site = tmp_path / "site"
    install_profile(site)
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", HANGING_SERVER], stdout=fh, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONPATH=str(site)), start_new_session=True)
    deadline = time.monotonic() + 60
    while "READY" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    ServerHandle(process=proc, port=0, log_path=log).stop(timeout=10, dump_stacks=True)
    text = log.read_text()
    assert proc.poll() is not None, "the process group was stopped"
    assert "first_request" in text and "Thread 0x" in text, text[-2000:]
