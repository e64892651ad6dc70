"""Launch options of the plugin's Triton kernels, per GPU model, chosen by the GPU suite's sweeps.

SGLang keeps its tuned Triton configurations per device name in JSON files (the fused-MoE
``configs/...device_name=NVIDIA_H100_80GB_HBM3.json``); this does the same for the two kernels on
the serving path whose launch options the GPU suite sweeps (issue 21 item 4):

* the statistics (:func:`~vlcache_sglang.kernels.attention_stats.plan_stats`: query block, key
  block, one program per query head or per KV head): :class:`StatsLaunch`;
* the plan-free kept-list decode (:func:`~vlcache_sglang.kernels.ragged_decode.ragged_decode`: key
  block, split count as programs per SM, warps, pipeline stages, one launch or two):
  :class:`DecodeLaunch`.

``kernels/tuned_launches/<device name>.json`` (the name as ``torch.cuda.get_device_name`` reports
it, every character outside ``[A-Za-z0-9._-]`` replaced by ``_``) holds a device's winners; it is
written from a suite report by ``python -m vlcache_sglang.tooling.adopt_kernel_sweeps``, never by
hand. A device without a file uses the defaults (each sweep's first row). Which file a server
reads is the launch setting ``VLCACHE_KERNEL_LAUNCHES`` (``auto``: this folder; ``defaults``; or
a path), resolved once per backend and passed down explicitly.

Pure Python + torch (for the device name); no SGLang, no Triton import.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

__all__ = ["CONFIG_DIR", "DecodeLaunch", "KernelLaunches", "LaunchConfigError", "StatsLaunch",
           "config_path_for", "device_file_name", "launches_for", "launches_for_device_name", "load_launches",
           "parse_launches"]

CONFIG_DIR = Path(__file__).resolve().parent / "tuned_launches"
SCHEMA = 1


class LaunchConfigError(ValueError):
    """A launch-config file is missing, malformed or out of range; the message names the file."""


def _pow2(x: Any, lo: int, hi: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi and x & (x - 1) == 0


@dataclass(frozen=True)
class StatsLaunch:
    """``plan_stats`` options: ``block_m`` rows (per query head when ``pack_heads``), ``block_n`` keys."""

    block_m: int = 16
    block_n: int = 64
    pack_heads: bool = False

    def check(self) -> "StatsLaunch":
        if not (_pow2(self.block_m, 1, 256) and _pow2(self.block_n, 16, 512) and isinstance(self.pack_heads, bool)):
            raise LaunchConfigError(f"statistics launch {asdict(self)}: block_m must be a power of two in "
                                    "1..256, block_n one in 16..512, pack_heads a boolean")
        return self


@dataclass(frozen=True)
class DecodeLaunch:
    """``ragged_decode`` options: ``block_n`` keys per step, splits filling ``programs_per_sm``
    programs per SM (:func:`~vlcache_sglang.kernels.ragged_decode.choose_num_splits`), pass 1's
    ``num_warps`` / ``num_stages`` (Triton's defaults when None), and ``fused_merge``: the splits
    merged by the last of them in the same launch instead of a second launch (off until a GPU
    sweep, whose stress test must have passed, adopts it)."""

    block_n: int = 64
    programs_per_sm: float = 2.0
    num_warps: int | None = None
    num_stages: int | None = None
    fused_merge: bool = False

    def check(self) -> "DecodeLaunch":
        pps = self.programs_per_sm
        ok = (_pow2(self.block_n, 16, 512) and isinstance(pps, (int, float)) and not isinstance(pps, bool)
              and 0 < pps <= 64 and (self.num_warps is None or _pow2(self.num_warps, 1, 32))
              and (self.num_stages is None or (isinstance(self.num_stages, int) and 1 <= self.num_stages <= 8))
              and isinstance(self.fused_merge, bool))
        if not ok:
            raise LaunchConfigError(f"decode launch {asdict(self)}: block_n must be a power of two in 16..512, "
                                    "programs_per_sm in (0, 64], num_warps a power of two up to 32 or null, "
                                    "num_stages 1..8 or null, fused_merge a boolean")
        return self

    def split_choice(self) -> dict[str, float]:
        """Keyword arguments of ``num_splits_for`` / ``choose_num_splits``."""
        return {"block_n": self.block_n, "programs_per_sm": float(self.programs_per_sm)}


@dataclass(frozen=True)
class KernelLaunches:
    """Both kernels' options and where they came from (``defaults`` or a file's path)."""

    stats: StatsLaunch = field(default_factory=StatsLaunch)
    decode: DecodeLaunch = field(default_factory=DecodeLaunch)
    source: str = "defaults"

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "stats": asdict(self.stats), "decode": asdict(self.decode)}


def device_file_name(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``NVIDIA_H100_80GB_HBM3.json``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", device_name.strip()) + ".json"


def _device_name(device: torch.device | str) -> str | None:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def config_path_for(device_name: str, folder: Path | str = CONFIG_DIR) -> Path:
    return Path(folder) / device_file_name(device_name)


def parse_launches(data: Mapping[str, Any], source: str) -> KernelLaunches:
    """A file's JSON object -> :class:`KernelLaunches` (unknown keys and bad values raise)."""
    if not isinstance(data, Mapping) or data.get("schema") != SCHEMA:
        raise LaunchConfigError(f"{source}: not a kernel launch file (expected an object with \"schema\": {SCHEMA})")
    parts: dict[str, Any] = {}
    for name, cls in (("stats", StatsLaunch), ("decode", DecodeLaunch)):
        raw = data.get(name, {})
        if not isinstance(raw, Mapping):
            raise LaunchConfigError(f"{source}: \"{name}\" must be an object")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise LaunchConfigError(f"{source}: unknown \"{name}\" option(s) {sorted(unknown)}; "
                                    f"allowed: {sorted(cls.__dataclass_fields__)}")
        try:
            parts[name] = cls(**raw).check()
        except LaunchConfigError as exc:
            raise LaunchConfigError(f"{source}: {exc}") from None
    return KernelLaunches(parts["stats"], parts["decode"], source)


def load_launches(path: Path | str) -> KernelLaunches:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LaunchConfigError(f"kernel launch file not found: {str(path)!r}") from None
    except (OSError, ValueError) as exc:
        raise LaunchConfigError(f"kernel launch file {str(path)!r} is not readable JSON: {exc}") from None
    return parse_launches(data, str(path))


def launches_for(device: torch.device | str, choice: str = "auto", folder: Path | str = CONFIG_DIR) -> KernelLaunches:
    """The launch options a backend on ``device`` uses (:func:`launches_for_device_name` with its
    GPU model's name; off CUDA there is none, so ``auto`` gives the defaults)."""
    return launches_for_device_name(_device_name(device), choice, folder)


def launches_for_device_name(device_name: str | None, choice: str = "auto",
                             folder: Path | str = CONFIG_DIR) -> KernelLaunches:
    """``choice`` ``auto``: ``folder``'s file for this GPU model if there is one, else the defaults
    (always the defaults without a device name); ``defaults``; or a path to a launch file."""
    if choice == "defaults":
        return KernelLaunches()
    if choice != "auto":
        return load_launches(choice)
    if device_name is None:
        return KernelLaunches()
    path = config_path_for(device_name, folder)
    return load_launches(path) if path.is_file() else KernelLaunches()
