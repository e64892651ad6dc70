"""Per-model default policy files: where ``tune.py`` writes them and where the launcher looks.

A tuned policy is a :class:`~vlcache_sglang.policy.PolicyConfig` JSON file. When a server is
launched with ``--attention-backend vlcache`` and neither ``--vlcache-config`` nor
``VLCACHE_CONFIG`` is given, the plugin looks up the default for ``--model-path``, first hit wins:

1. the user's policy directory: ``$VLCACHE_CONFIG_DIR`` (default
   ``$XDG_CONFIG_HOME/vlcache-sglang/policies``, i.e. ``~/.config/vlcache-sglang/policies``),
   file ``<model key>.json`` (:func:`model_key`: ``Qwen--Qwen2-VL-2B-Instruct`` for a hub id,
   ``<dir name>-<hash of the absolute path>`` for a local directory), so a user's own tuning
   wins over one shipped with the weights;
2. next to the weights: ``<model dir>/vlcache_policy.json`` (a local directory, or the file of
   that name in a hub model's local Hugging Face cache; no network access), like
   ``generation_config.json``.

``--vlcache-config none`` (or ``VLCACHE_CONFIG=none``) skips the lookup. ``tune.py`` writes next
to the weights of a writable local directory, otherwise into the user's directory; a provenance
file ``<name>.tuning.json`` (study, trial, accuracies) goes beside it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from vlcache_sglang.policy import PolicyConfig, PolicyConfigError

POLICY_FILENAME = "vlcache_policy.json"
ENV_CONFIG_DIR = "VLCACHE_CONFIG_DIR"
#: value of ``--vlcache-config`` / ``VLCACHE_CONFIG`` that disables the per-model default
DISABLED = "none"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class TunedConfigError(ValueError):
    """A per-model policy file exists but cannot be used; the message names the file."""


def user_config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The user's policy directory (``$VLCACHE_CONFIG_DIR`` or the XDG config location) in
    ``environ`` (the launcher's or the tuner's environment; default: this process's)."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_CONFIG_DIR):
        return Path(environ[ENV_CONFIG_DIR]).expanduser()
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "vlcache-sglang" / "policies"


def _local_dir(model_path: str | os.PathLike) -> Path | None:
    p = Path(model_path).expanduser()
    return p.resolve() if p.is_dir() else None


def model_key(model_path: str | os.PathLike) -> str:
    """File-name key of a model: ``org--name`` for a hub id, ``<dir>-<8 hex>`` for a directory."""
    local = _local_dir(model_path)
    if local is not None:
        return f"{local.name}-{hashlib.sha1(str(local).encode()).hexdigest()[:8]}"
    text = str(model_path)
    if not _HUB_ID.match(text):
        raise TunedConfigError(f"model {text!r} is neither an existing directory nor a Hugging Face id (org/name)")
    return text.replace("/", "--")


def _cached_hub_file(repo_id: str) -> Path | None:
    """``vlcache_policy.json`` of a hub model if it is in the local HF cache (never downloads)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        hit = try_to_load_from_cache(repo_id, POLICY_FILENAME)
    except Exception:  # noqa: BLE001 - a malformed id or cache is "no file", not a launch failure
        return None
    return Path(hit) if isinstance(hit, str) else None


def candidate_paths(model_path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> list[Path]:
    """Where the default policy of ``model_path`` may live, in lookup order."""
    out = [user_config_dir(environ) / f"{model_key(model_path)}.json"]
    local = _local_dir(model_path)
    if local is not None:
        out.append(local / POLICY_FILENAME)
    else:
        cached = _cached_hub_file(str(model_path))
        if cached is not None:
            out.append(cached)
    return out


def find_default_config(model_path: str | os.PathLike, environ: Mapping[str, str] | None = None) -> Path | None:
    """The first existing candidate file, or None."""
    try:
        candidates = candidate_paths(model_path, environ)
    except TunedConfigError:
        return None
    return next((p for p in candidates if p.is_file()), None)


def load_policy_file(path: str | os.PathLike) -> PolicyConfig:
    """Read and validate a policy file; :class:`TunedConfigError` names the file and the problem."""
    try:
        return PolicyConfig.load(path)
    except (OSError, PolicyConfigError) as exc:
        raise TunedConfigError(f"vlcache policy file {str(path)!r} is not a valid policy: {exc}") from None


def default_write_path(model_path: str | os.PathLike) -> Path:
    """Where ``tune.py`` writes: next to writable local weights, else the user's directory."""
    local = _local_dir(model_path)
    if local is not None and os.access(local, os.W_OK):
        return local / POLICY_FILENAME
    return user_config_dir() / f"{model_key(model_path)}.json"


def provenance_path(policy_path: str | os.PathLike) -> Path:
    """``vlcache_policy.json`` -> ``vlcache_policy.tuning.json``."""
    p = Path(policy_path)
    return p.with_name(p.stem + ".tuning.json")


def write_policy(policy: PolicyConfig, path: str | os.PathLike,
                 provenance: Mapping[str, Any] | None = None) -> Path:
    """Write ``policy`` atomically (and its provenance beside it); returns the policy path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(policy.to_json() + "\n", encoding="utf-8")
    os.replace(tmp, path)
    if provenance is not None:
        provenance_path(path).write_text(json.dumps(dict(provenance), indent=2, sort_keys=True) + "\n",
                                         encoding="utf-8")
    return path
