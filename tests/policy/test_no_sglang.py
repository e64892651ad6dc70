"""The policy is pure PyTorch: importable with SGLang absent, and no module under it names sglang."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import vlcache_sglang.policy as policy

POLICY_DIR = Path(policy.__file__).parent


def test_no_sglang_import_in_sources() -> None:
    for path in POLICY_DIR.rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n == "sglang" or n.startswith("sglang.") for n in names), f"{path}: {names}"


def test_importable_with_sglang_blocked() -> None:
    code = (
        "import sys; sys.modules['sglang'] = None\n"
        "import torch\n"
        "from vlcache_sglang.policy import PolicyConfig, locate_window, StatsAccumulator, build_plan\n"
        "cfg = PolicyConfig(alpha=0.5)\n"
        "w = locate_window(16, [(0, 7)], cfg)\n"
        "acc = StatsAccumulator(1, 2, 1, 16, w, cfg)\n"
        "acc.add(0, torch.randn(16, 2, 4), torch.arange(16), torch.randn(16, 1, 4), 0.5)\n"
        "plan = build_plan(acc)\n"
        "assert plan.kept[0].numel() == 8\n"
        "assert not [m for m, v in sys.modules.items() if m.startswith('sglang') and v is not None]\n"
    )
    env = dict(os.environ, PYTHONPATH=str(POLICY_DIR.parents[1]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
