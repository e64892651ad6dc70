"""VL-Cache KV-cache compression for vision-language models, served by SGLang."""
from pathlib import Path as _Path

__version__ = "0.1.0"


def _map_checkout_folders() -> None:
    """In a source checkout, ``vlcache_sglang.kernels`` / ``vlcache_sglang.tuning`` are the
    repository's ``kernels/`` and ``tuning/`` folders (``setup.py`` maps them in an install). Adding
    the checkout root to this package's search path keeps that true with no install (the GPU
    machine) or with an editable install made from another checkout. Guarded by files only this
    repository has, so an installed wheel never picks up site-packages' unrelated ``kernels``."""
    root = _Path(__file__).resolve().parent.parent
    if (root / "setup.py").is_file() and (root / "kernels" / "dispatch.py").is_file() \
            and (root / "tuning" / "__init__.py").is_file():
        __path__.append(str(root))  # noqa: F821 (the package's own __path__)


_map_checkout_folders()
