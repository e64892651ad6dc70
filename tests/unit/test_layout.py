"""The import graph the layout promises.

* The server side (what SGLang imports: ``plugin``, ``hooks`` and the hook modules, ``settings``,
  ``policy_resolution``, ``compatibility``, ``radix_cache``, ``tuned_configs``, ``bundled``, ``backend/``, ``policy/``,
  ``cpu_runtime/``) imports nothing from ``vlcache_sglang.research`` (evaluation, training),
  ``vlcache_sglang.tooling`` (launchers for tests, benchmarks and the demo) or the tuning package.
* ``vlcache_sglang.policy`` is pure PyTorch: it imports neither SGLang nor the kernels; the backend
  hands it the kernel dispatch as a function (``StatsAccumulator(..., stats_fn=...)``).

How ``kernels/`` and ``tuning/`` are importable: they are folders at the repository root. An install
maps them into the package (``setup.py``: ``package_dir`` puts ``kernels/`` at
``vlcache_sglang.kernels`` and ``tuning/`` at ``vlcache_sglang.tuning``), so site-packages gets no
generic top-level ``kernels`` or ``tuning``. In a source checkout ``vlcache_sglang/__init__.py``
appends the checkout root to the package's ``__path__``, which gives the same two names with no
install. With the repository root itself on ``sys.path`` (``PYTHONPATH=.``, the tests) the folders
are also importable as top-level ``kernels`` and ``tuning`` (``tests/tuning`` imports ``tuning.*``;
transformers' probe for the hub's ``kernels`` package then finds ours). Both names are checked.

Each check has two halves: the modules a fresh interpreter holds after importing the entry points
(``sys.modules``; the interpreter sees only the package, as in an install, not the repository root),
and every import statement in the sources, those inside functions included (an import that runs
only on CUDA or only on a request would not show up in ``sys.modules`` on this machine).
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import vlcache_sglang

PKG = Path(vlcache_sglang.__file__).resolve().parent
SERVER_SOURCES = [PKG / f for f in ("plugin.py", "hooks.py", "launch_hooks.py", "scheduler_hooks.py", "settings.py",
                                    "policy_resolution.py", "compatibility.py", "radix_cache.py", "tuned_configs.py",
                                    "bundled.py", "__init__.py")]
SERVER_SOURCES += sorted(p for d in ("backend", "policy", "cpu_runtime") for p in (PKG / d).rglob("*.py"))
SERVER_ENTRY_POINTS = ["vlcache_sglang.plugin", "vlcache_sglang.hooks", "vlcache_sglang.radix_cache",
                       "vlcache_sglang.backend.attention_backend", "vlcache_sglang.policy"]

NOT_FOR_THE_SERVER = ("vlcache_sglang.research", "vlcache_sglang.tooling", "vlcache_sglang.tuning", "tuning")
NOT_FOR_THE_POLICY = ("sglang", "kernels", "vlcache_sglang.kernels", "vlcache_sglang.backend",
                      "vlcache_sglang.research", "vlcache_sglang.tooling", "vlcache_sglang.tuning", "tuning")


def _under(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _imported_names(path: Path) -> list[str]:
    """Absolute module names of every import statement in ``path`` (relative ones resolved)."""
    package = ".".join(("vlcache_sglang", *path.relative_to(PKG).parent.parts))
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            names.append(module)
            names += [f"{module}.{a.name}" for a in node.names]  # `from vlcache_sglang import research`
    return names


def _modules_after_import(tmp_path: Path, code: str) -> list[str]:
    """``sorted(sys.modules)`` of a fresh interpreter that ran ``code``. Only the package is on its
    path (a link to it, as site-packages would hold it), not the repository root."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "vlcache_sglang").symlink_to(PKG, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(site), CUDA_VISIBLE_DEVICES="")
    code += "\nimport json, sys\nprint('MODULES=' + json.dumps(sorted(sys.modules)))\n"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("MODULES="))
    return json.loads(line[len("MODULES="):])


def test_server_sources_import_no_research_tooling_or_tuning() -> None:
    assert len(SERVER_SOURCES) > 30
    bad = {f"{p.relative_to(PKG)}: {n}" for p in SERVER_SOURCES for n in _imported_names(p)
           if _under(n, NOT_FOR_THE_SERVER)}
    assert not bad, sorted(bad)


def test_policy_sources_import_neither_sglang_nor_kernels() -> None:
    bad = {f"{p.relative_to(PKG)}: {n}" for p in (PKG / "policy").rglob("*.py") for n in _imported_names(p)
           if _under(n, NOT_FOR_THE_POLICY)}
    assert not bad, sorted(bad)


def test_importing_the_server_loads_no_research_tooling_or_tuning(tmp_path: Path) -> None:
    code = "".join(f"import {m}\n" for m in SERVER_ENTRY_POINTS)
    code += ("import pkgutil, importlib, vlcache_sglang.backend as b\n"
             "for m in pkgutil.walk_packages(b.__path__, 'vlcache_sglang.backend.'):\n"
             "    importlib.import_module(m.name)\n"
             "import vlcache_sglang.settings, vlcache_sglang.policy_resolution, vlcache_sglang.compatibility\n"
             "import vlcache_sglang.tuned_configs, vlcache_sglang.bundled\n")
    modules = _modules_after_import(tmp_path, code)
    assert "vlcache_sglang.backend.compressor" in modules and "sglang" in modules  # the import really ran
    assert not [m for m in modules if _under(m, NOT_FOR_THE_SERVER)]


def test_importing_the_policy_loads_neither_sglang_nor_kernels(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['sglang'] = None\n"  # a refused import would fail loudly
            "import importlib, pkgutil, torch\n"
            "import vlcache_sglang.policy as p\n"
            "for m in pkgutil.walk_packages(p.__path__, 'vlcache_sglang.policy.'):\n"
            "    importlib.import_module(m.name)\n"
            "from vlcache_sglang.policy import PolicyConfig, StatsAccumulator, build_plan, locate_window\n"
            "cfg = PolicyConfig(alpha=0.5)\n"
            "acc = StatsAccumulator(1, 2, 1, 16, locate_window(16, [(0, 7)], cfg), cfg)\n"
            "acc.add(0, torch.randn(16, 2, 4), torch.arange(16), torch.randn(16, 1, 4), 0.5)\n"
            "assert build_plan(acc).kept[0].numel() == 8\n"
            "del sys.modules['sglang']\n")
    modules = _modules_after_import(tmp_path, code)
    assert "vlcache_sglang.policy.stats" in modules
    assert not [m for m in modules if _under(m, NOT_FOR_THE_POLICY)]
