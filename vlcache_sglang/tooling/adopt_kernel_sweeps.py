"""Turn a GPU-suite report's two launch sweeps into the GPU model's tuned launch file.

``python -m vlcache_sglang.tooling.adopt_kernel_sweeps out/gpu_suite/gpu_suite.json`` reads the
``stats_sweep`` and ``decode_sweep`` figures of ``benchmarks/gpu_suite.py`` and writes
``kernels/tuned_launches/<device>.json`` (:mod:`vlcache_sglang.kernels.launch_configs`), which
every server on that GPU model then uses (``VLCACHE_KERNEL_LAUNCHES=auto``, the default).

A sweep's winner is adopted only when it is checked correct against the default row and at least
``--min-gain`` (3 %) faster than it; otherwise that kernel keeps the defaults (noise is not a
tuning). A kernel whose sweep is missing or failed keeps what the existing file says. Reports from
``--cpu-smoke`` runs are refused unless ``--allow-cpu-smoke`` (the plumbing tests), since
interpreter timings say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from vlcache_sglang.kernels.launch_configs import (CONFIG_DIR, SCHEMA, DecodeLaunch, LaunchConfigError, StatsLaunch,
                                                   config_path_for, parse_launches)

#: (suite figure, launch-file section, launch class, the row's time field)
SWEEPS = (("stats_sweep", "stats", StatsLaunch, "eager_s"), ("decode_sweep", "decode", DecodeLaunch, "s"))


def _choice(entry: Mapping[str, Any], cls, time_key: str, min_gain: float) -> tuple[dict | None, dict]:
    """(the section to write or None to leave it as it is, what was decided and measured)."""
    if entry.get("skipped") or not entry.get("configs"):
        return None, {"decision": "no sweep in the report: section unchanged", "skipped": entry.get("skipped")}
    fields = list(cls.__dataclass_fields__)
    default_row = entry.get("default") or {}
    best = entry.get("best")
    if not best or not best.get("correct") or time_key not in best:
        return None, {"decision": "no correct configuration: section unchanged"}
    options = {k: best[k] for k in fields}
    if asdict(cls()) != {k: default_row.get(k) for k in fields}:
        raise LaunchConfigError(f"the sweep's first row {({k: default_row.get(k) for k in fields})} is not "
                                f"the current defaults {asdict(cls())}: rerun the suite from this checkout")
    t_best = float(best[time_key])
    t_default = default_row.get(time_key) if default_row.get("correct", True) else None
    measured = {"best_s": t_best, "default_s": t_default, "best": options}
    if t_default is not None and t_best > (1.0 - min_gain) * float(t_default):
        return asdict(cls()), {**measured, "decision": f"defaults kept: best is under {100 * min_gain:.0f} % faster"}
    return asdict(cls(**options).check()), {**measured, "decision": "adopted"}


def adopt(report: Mapping[str, Any], folder: Path | str = CONFIG_DIR, *, min_gain: float = 0.03,
          allow_cpu_smoke: bool = False, report_name: str = "") -> tuple[Path, dict]:
    """Write the launch file of ``report``'s device; returns (its path, its content)."""
    mode = str(report.get("mode", ""))
    if mode != "gpu" and not allow_cpu_smoke:
        raise LaunchConfigError(f"report mode {mode!r} is not a GPU run: its timings tune nothing "
                                "(--allow-cpu-smoke for plumbing checks only)")
    device = report.get("device")
    if not device:
        raise LaunchConfigError("the report names no device")
    path = config_path_for(str(device), folder)
    current: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if current:
        parse_launches(current, str(path))  # a broken existing file is reported, not silently replaced
    by_figure = {r.get("figure"): r for r in report.get("results", []) if isinstance(r, Mapping)}
    content: dict[str, Any] = {"schema": SCHEMA, "device": str(device)}
    provenance: dict[str, Any] = {"report": report_name, "when": report.get("when"), "mode": mode,
                                  "torch": report.get("torch"), "triton": report.get("triton")}
    for figure, section, cls, time_key in SWEEPS:
        entry = by_figure.get(figure, {})
        chosen, note = _choice(entry, cls, time_key, min_gain)
        if chosen is None and section in current:
            chosen = current[section]
        if chosen is not None:
            content[section] = chosen
        provenance[section] = {**note, **({k: entry[k] for k in ("n", "window", "batch") if k in entry})}
    content["measured"] = provenance
    parse_launches(content, str(path))  # what is written is what a server accepts
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2) + "\n")
    return path, content


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="gpu_suite.json of benchmarks/gpu_suite.py")
    p.add_argument("--folder", default=str(CONFIG_DIR), help="where launch files live (default: the package's)")
    p.add_argument("--min-gain", type=float, default=0.03, help="fraction faster than the default to adopt")
    p.add_argument("--allow-cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        report = json.loads(Path(args.report).read_text())
        path, content = adopt(report, args.folder, min_gain=args.min_gain, allow_cpu_smoke=args.allow_cpu_smoke,
                              report_name=Path(args.report).name)
    except (OSError, ValueError) as exc:  # LaunchConfigError is a ValueError
        print(f"adopt_kernel_sweeps: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    for _, section, _, _ in SWEEPS:
        print(f"  {section}: {content.get(section, 'defaults')} ({content['measured'][section]['decision']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
