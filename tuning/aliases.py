"""``--model`` aliases: short names for a model plus the dataset and splits it is tuned on.

Built in: ``qwen2-vl`` (``Qwen/Qwen2-VL-2B-Instruct`` on DocVQA when the Hugging Face Hub is
reachable; offline, the bundled trained Qwen2-VL-architecture model ``models/tinyvlm-docvqa`` on
its synthetic document-VQA splits) and ``tinyvlm-docvqa`` (always the bundled model). Users add
or replace aliases with a JSON file (``--aliases FILE`` or ``$VLCACHE_MODEL_ALIASES``)::

    {"my-vlm": "/models/my-vlm",
     "qwen2-vl-7b": {"model": "Qwen/Qwen2-VL-7B-Instruct", "dataset": "lmms-lab/DocVQA:DocVQA",
                      "study_split": "validation[:200]", "heldout_split": "validation[200:400]"}}

Anything that is not an alias may be a local model directory or a Hugging Face id (``org/name``).
"""
from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from vlcache_sglang.bundled import REPO_ROOT, bundled_model_dir

ENV_ALIASES = "VLCACHE_MODEL_ALIASES"
BUNDLED_DATASET = REPO_ROOT / "data" / "tinyvlm-docvqa"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class AliasError(ValueError):
    """Unknown alias, bad alias file, or a model that cannot be reached."""


@dataclass(frozen=True)
class ModelSpec:
    """A resolved ``--model``: what the server loads and the default data to tune it on."""

    name: str
    model_path: str
    dataset: str | None = None
    study_split: str = "calibration"
    heldout_split: str = "heldout"


def _bundled(name: str) -> ModelSpec:
    return ModelSpec(name=name, model_path=str(bundled_model_dir()), dataset=str(BUNDLED_DATASET))


#: online targets of the built-in aliases (offline they fall back to the bundled model)
HUB_ALIASES: dict[str, ModelSpec] = {
    "qwen2-vl": ModelSpec(name="qwen2-vl", model_path="Qwen/Qwen2-VL-2B-Instruct",
                          dataset="lmms-lab/DocVQA:DocVQA", study_split="validation[:200]",
                          heldout_split="validation[200:400]"),
}
BUNDLED_ALIASES = ("qwen2-vl", "tinyvlm-docvqa")


def hub_reachable(timeout: float = 2.0) -> bool:
    """False when ``HF_HUB_OFFLINE`` is set or huggingface.co cannot be reached."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_alias_file(path: str | os.PathLike) -> dict[str, ModelSpec]:
    """Read a user alias file (see the module docstring)."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AliasError(f"alias file {str(path)!r} cannot be read as JSON: {exc}") from None
    if not isinstance(raw, Mapping):
        raise AliasError(f"alias file {str(path)!r} must hold a JSON object of alias -> model")
    out = {}
    for name, entry in raw.items():
        out[name] = _spec_from_entry(name, entry, path)
    return out


def _spec_from_entry(name: str, entry: Any, path: Any) -> ModelSpec:
    if isinstance(entry, str):
        return ModelSpec(name=name, model_path=entry)
    if isinstance(entry, Mapping) and isinstance(entry.get("model"), str):
        allowed = {"model", "dataset", "study_split", "heldout_split"}
        unknown = set(entry) - allowed
        if unknown:
            raise AliasError(f"alias {name!r} in {str(path)!r}: unknown key(s) {sorted(unknown)}; allowed {sorted(allowed)}")
        kw = {k: str(v) for k, v in entry.items() if k != "model"}
        return ModelSpec(name=name, model_path=entry["model"], **kw)
    raise AliasError(f"alias {name!r} in {str(path)!r} must be a model string or an object with a 'model' key")


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001
        return False


def resolve_model(name: str, *, alias_file: str | os.PathLike | None = None,
                  online: bool | None = None) -> ModelSpec:
    """Resolve ``--model`` (user alias, built-in alias, local directory or hub id)."""
    user_file = alias_file or os.environ.get(ENV_ALIASES)
    user = load_alias_file(user_file) if user_file else {}
    if name in user:
        spec = user[name]
    elif name in BUNDLED_ALIASES:
        reachable = hub_reachable() if online is None else online
        spec = HUB_ALIASES[name] if reachable and name in HUB_ALIASES else _bundled(name)
    else:
        spec = ModelSpec(name=name, model_path=name)
    path = Path(spec.model_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AliasError(f"model directory {str(path)!r} has no config.json")
        return replace(spec, model_path=str(path.resolve()))
    if not _HUB_ID.match(spec.model_path):
        known = sorted(set(BUNDLED_ALIASES) | set(user))
        raise AliasError(f"unknown model alias {name!r}: known aliases are {', '.join(known)}; otherwise pass a "
                         "local model directory or a Hugging Face id (org/name), or map the alias with "
                         f"--aliases FILE / ${ENV_ALIASES}")
    reachable = hub_reachable() if online is None else online
    if not reachable and not _hub_cached(spec.model_path):
        raise AliasError(f"model {spec.model_path!r} is not in the local Hugging Face cache and the hub cannot be "
                         "reached (offline); download it first or pass a local directory")
    return spec
