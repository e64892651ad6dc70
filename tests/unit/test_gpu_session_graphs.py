"""The ``graphs`` step of scripts/gpu_session.sh (the second kit call's GPU work), rehearsed on the
CPU: it runs the decode-graph tests over SGLang's real pools (on a GPU their CUDA variants capture
real ``torch.cuda.CUDAGraph``s; here those skip and the recorded-launch variants run) and leaves
their log and JUnit report in ``$OUT``."""
from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_graphs_step_runs_the_decode_graph_tests(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, STEPS="graphs", OUT=str(out), SKIP_SUITE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_session.sh")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = ET.parse(out / "graph_tests.xml").getroot().find("testsuite")
    ran = {case.get("name") for case in suite.iter("testcase") if case.find("skipped") is None}
    assert int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0, (out / "graph_tests.log").read_text()
    # the backend's graph hooks over SGLang's pools (layer and head cells) and the executor's graph mode
    assert {"test_replays_equal_eager_decode_over_compressed_plain_and_padded_batches[cpu-layer]",
            "test_replays_equal_eager_decode_over_compressed_plain_and_padded_batches[cpu-head]",
            "test_graph_mode_splits_follow_each_captured_batch_size[cpu]",
            "test_graph_mode_one_capture_serves_shared_and_per_layer_lists[fused-merge-cpu]"} <= ran, sorted(ran)
    # the fused merge's race test is in the step (it skips off CUDA: the interpreter runs programs in turn)
    every = {case.get("name") for case in suite.iter("testcase")}
    assert {"test_fused_merge_under_concurrent_programs_cuda[long-lists]",
            "test_fused_merge_under_concurrent_programs_cuda[short-lists]"} <= every, sorted(every)
    assert "passed" in (out / "graph_tests.log").read_text()
