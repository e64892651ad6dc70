"""The GPU server kit: SGLang and the packages its server imports, carried to the lent GPU machine
in parts small enough for the device tool (at most 64 MiB per call, working tree included).

Standard library only: it runs on the GPU machine's bare Python 3.12 before anything is installed.

    python -m vlcache_sglang.tooling.gpu_kit build   --lock requirements/gpu/server-lock.txt --out out/gpu-server-kit
    python -m vlcache_sglang.tooling.gpu_kit status  --kit out/gpu-server-kit      # which parts are here
    python -m vlcache_sglang.tooling.gpu_kit install --kit out/gpu-server-kit --target out/gpu-site

``build`` (here, with PyPI) downloads the lock file's wheels for CPython 3.12 manylinux with
``--no-deps``; a wheel published for another CPython only (SGLang 0.5.23's here is cp311, for its
optional Rust extensions, which the server never loads) is repacked as ``py3-none-any`` without
its compiled extension modules; then all wheels are put in one uncompressed tar (wheels are
already zip-compressed) cut into parts of at most ``--part-mib``. ``MANIFEST.json`` lists every
wheel and part with its size and SHA-256. On the GPU machine the parts arrive over several calls
into the ignored ``out/gpu-server-kit`` (kept there between calls); ``install`` checks every part,
joins them, and installs the wheels with ``pip --no-index --no-deps --target``, a folder that goes
first on ``PYTHONPATH``.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
DEVICE_CALL_LIMIT = 64 * MIB  # what one device-tool call carries, working tree included
DEFAULT_PART_MIB = 52  # a part plus the working tree (8 MiB) fits one call; 2 parts for the 91 MiB kit
MANIFEST = "MANIFEST.json"
PLATFORM_ARGS = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
                 "--abi", "none"] + [a for p in ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
                                                 "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                                                 "manylinux2014_x86_64", "manylinux1_x86_64", "any")
                                     for a in ("--platform", p)]
#: How the kit's server runs on the GPU machine, where sgl-kernel cannot go: SGLang's pure-torch
#: fused ops (norms, activations, rotary), the torch sampler, SDPA vision attention, no check of
#: the sglang-kernel distribution's version (none is installed: the placeholder below answers its
#: imports); and the vlcache CUDA executor opted in. The CPU suite serves with the same profile
#: (tests/e2e/test_compatibility.py), so only the CUDA kernels themselves are new on the GPU.
GPU_SERVER_ENV = {"SGLANG_FORCE_FUSED_OP_BACKEND": "torch", "SGLANG_SKIP_SGL_KERNEL_VERSION_CHECK": "1",
                  "VLCACHE_CUDA_EXECUTOR": "flashinfer"}
#: the ``sgl_kernel`` placeholder (every kernel raises when called, naming itself), relative to the
#: repository: last on the GPU server's ``PYTHONPATH``, since SGLang imports ``sgl_kernel`` and its
#: submodules unconditionally on CUDA (``sglang/srt/layers/activation.py``, ``layernorm.py``,
#: ``quantization/gguf.py``, ...)
SGL_KERNEL_PLACEHOLDER = "vlcache_sglang/cpu_runtime/sgl_kernel_placeholder"
GPU_SERVER_ARGS = ["--sampling-backend", "pytorch", "--mm-attention-backend", "sdpa"]
_EXT_MODULE = re.compile(r"\.cpython-\d+[^/]*\.so$")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack_any_python(wheel: Path, out_dir: Path) -> Path:
    """``wheel`` (built for one CPython) as ``py3-none-any``, without compiled extension modules:
    for packages whose compiled parts are optional on the path that is used."""
    name, version = wheel.name.split("-")[:2]
    out = out_dir / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name, rows = None, []
        for info in src.infolist():
            if _EXT_MODULE.search(info.filename):
                continue
            if info.filename.endswith(".dist-info/RECORD"):
                record_name = info.filename
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/WHEEL"):
                text = re.sub(r"^Tag: .*$", "Tag: py3-none-any", data.decode(), flags=re.M)
                data = text.replace("Root-Is-Purelib: false", "Root-Is-Purelib: true").encode()
            dst.writestr(info.filename, data)
            rows.append(f"{info.filename},{_record_hash(data)},{len(data)}")
        if record_name is None:
            raise ValueError(f"{wheel.name}: no RECORD")
        rows.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(rows) + "\n")
    return out


def chunk(wheels: list[Path], dest: Path, part_bytes: int) -> dict:
    """Put ``wheels`` in one tar, cut it into ``part-NNN`` files of at most ``part_bytes`` in
    ``dest``, and write the manifest; returns it."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("part-*"):
        old.unlink()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for w in sorted(wheels, key=lambda p: p.name):
            tar.add(w, arcname=w.name)
    data = buf.getvalue()
    parts = []
    for i, start in enumerate(range(0, len(data), part_bytes)):
        piece = data[start:start + part_bytes]
        path = dest / f"part-{i:03d}"
        path.write_bytes(piece)
        parts.append({"name": path.name, "bytes": len(piece), "sha256": hashlib.sha256(piece).hexdigest()})
    manifest = {"part_bytes": part_bytes, "tar_sha256": hashlib.sha256(data).hexdigest(), "parts": parts,
                "wheels": [{"name": w.name, "bytes": w.stat().st_size, "sha256": sha256(w)}
                           for w in sorted(wheels, key=lambda p: p.name)]}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def missing_parts(kit: Path) -> list[str]:
    """Parts the manifest lists that are absent or corrupt in ``kit``."""
    manifest = json.loads((kit / MANIFEST).read_text())
    bad = []
    for p in manifest["parts"]:
        path = kit / p["name"]
        if not path.exists() or path.stat().st_size != p["bytes"] or sha256(path) != p["sha256"]:
            bad.append(p["name"])
    return bad


def assemble(kit: Path, wheel_dir: Path) -> list[Path]:
    """Join and check the parts, extract the wheels into ``wheel_dir``; raises if any is missing."""
    bad = missing_parts(kit)
    if bad:
        raise FileNotFoundError(f"kit {kit}: parts missing or corrupt: {', '.join(bad)}")
    manifest = json.loads((kit / MANIFEST).read_text())
    data = b"".join((kit / p["name"]).read_bytes() for p in manifest["parts"])
    if hashlib.sha256(data).hexdigest() != manifest["tar_sha256"]:
        raise ValueError("kit: joined parts do not match the manifest")
    wheel_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(wheel_dir, filter="data")
    out = [wheel_dir / w["name"] for w in manifest["wheels"]]
    for w, path in zip(manifest["wheels"], out):
        if sha256(path) != w["sha256"]:
            raise ValueError(f"kit: {path.name} does not match the manifest")
    return out


def install(kit: Path, target: Path, python: str = sys.executable) -> None:
    """Install every wheel of the kit into ``target`` (no index, no dependency resolution), then
    the project's own metadata and the GPU profile's ``sitecustomize`` (:func:`install_profile`)."""
    with tempfile.TemporaryDirectory() as tmp:
        wheels = assemble(kit, Path(tmp))
        subprocess.run([python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                        "--disable-pip-version-check", "-q", "--target", str(target), *map(str, wheels)],
                       check=True)
    install_profile(target)


def install_profile(target: Path, repo: Path = REPO) -> Path:
    """What ``target`` needs beside the wheels, the code staying in ``repo`` (first after ``target``
    on ``PYTHONPATH``):

    * ``vlcache_sglang-<version>.dist-info`` with the project's entry points: SGLang finds plugins
      by the ``sglang.srt.plugins`` entry point, which a package merely on ``PYTHONPATH`` lacks
      (the first GPU run's vlcache servers refused ``--attention-backend vlcache`` for this);
    * ``sitecustomize.py``: :mod:`vlcache_sglang.tooling.gpu_sitecustomize`.

    Returns the dist-info folder."""
    import tomllib

    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    name = project["name"].replace("-", "_")
    info = target / f"{name}-{project['version']}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    lines = []
    for group, points in project.get("entry-points", {}).items():
        lines += [f"[{group}]"] + [f"{k} = {v}" for k, v in points.items()] + [""]
    (info / "entry_points.txt").write_text("\n".join(lines))
    (info / "top_level.txt").write_text("vlcache_sglang\n")
    (target / "sitecustomize.py").write_text((repo / "vlcache_sglang" / "tooling" / "gpu_sitecustomize.py").read_text())
    return info


def build(lock: Path, out: Path, part_bytes: int, pip: list[str]) -> dict:
    """Download the lock file's wheels for the GPU machine's Python and chunk them."""
    reqs = [ln.strip() for ln in lock.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    with tempfile.TemporaryDirectory() as tmp:
        dl, ready = Path(tmp) / "dl", Path(tmp) / "ready"
        dl.mkdir()
        ready.mkdir()
        for req in reqs:
            got = subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dl),
                                  *PLATFORM_ARGS, req], capture_output=True, text=True)
            if got.returncode != 0:  # published for another CPython only: take it and repack it
                subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dl), req],
                               check=True)
        for w in dl.glob("*.whl"):
            tag = w.name[:-4].split("-")[-3:]
            if tag[0].startswith("cp") and tag[0] not in ("cp312",) and tag[1] != "abi3":
                repack_any_python(w, ready)
            else:
                w.rename(ready / w.name)
        return chunk(sorted(ready.glob("*.whl")), out, part_bytes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlcache_sglang.tooling.gpu_kit", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--lock", type=Path, required=True)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--part-mib", type=int, default=DEFAULT_PART_MIB)
    s = sub.add_parser("status")
    s.add_argument("--kit", type=Path, required=True)
    i = sub.add_parser("install")
    i.add_argument("--kit", type=Path, required=True)
    i.add_argument("--target", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "build":
        m = build(args.lock, args.out, args.part_mib * MIB, [sys.executable, "-m", "pip"])
        total = sum(p["bytes"] for p in m["parts"])
        print(f"{len(m['wheels'])} wheels, {total / MIB:.1f} MiB in {len(m['parts'])} parts of <= {args.part_mib} MiB "
              f"under {args.out}")
        return 0
    if args.cmd == "status":
        bad = missing_parts(args.kit)
        print("complete" if not bad else "missing: " + " ".join(bad))
        return 0 if not bad else 1
    install(args.kit, args.target)
    print(f"installed into {args.target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
