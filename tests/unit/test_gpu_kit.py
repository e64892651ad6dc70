"""The GPU server kit (vlcache_sglang.tooling.gpu_kit) on local wheels: parts never exceed their limit,
the default part fits one device-tool call beside the working tree, a missing or corrupt part is
named, a wheel published for another CPython is repacked without its extension modules, and the
kit installs with pip from its parts alone (no index), importable from the target folder."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vlcache_sglang.tooling import gpu_kit

REPO = Path(__file__).resolve().parents[2]


def make_wheel(folder: Path, name: str, tag: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (dist-info with METADATA, WHEEL, RECORD)."""
    dist = f"{name}-1.0.dist-info"
    files = dict(files)
    files[f"{dist}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode()
    purelib = "true" if tag == "py3-none-any" else "false"
    files[f"{dist}/WHEEL"] = f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: {purelib}\nTag: {tag}\n".encode()
    record = [f"{p},{gpu_kit._record_hash(d)},{len(d)}" for p, d in files.items()] + [f"{dist}/RECORD,,"]
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{name}-1.0-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, d in files.items():
            z.writestr(p, d)
    return path


@pytest.fixture()
def wheels(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    pure = make_wheel(src, "kitpure", "py3-none-any",
                      {"kitpure/__init__.py": b"VALUE = 41\n", "kitpure/blob.bin": bytes(range(256)) * 40})
    native = make_wheel(src, "kitnative", "cp311-cp311-manylinux_2_34_x86_64",
                        {"kitnative/__init__.py": b"from kitpure import VALUE\nANSWER = VALUE + 1\n",
                         "kitnative/_ext.cpython-311-x86_64-linux-gnu.so": b"\x7fELF not really"})
    return src, pure, native


def test_parts_respect_the_limit_and_the_kit_installs_from_them(tmp_path, wheels):
    src, pure, native = wheels
    repacked = gpu_kit.repack_any_python(native, src)
    assert repacked.name == "kitnative-1.0-py3-none-any.whl"
    with zipfile.ZipFile(repacked) as z:
        assert not any(n.endswith(".so") for n in z.namelist())
        assert "Tag: py3-none-any" in z.read("kitnative-1.0.dist-info/WHEEL").decode()
    kit = tmp_path / "kit"
    manifest = gpu_kit.chunk([pure, repacked], kit, part_bytes=4096)
    assert len(manifest["parts"]) > 2
    assert all((kit / p["name"]).stat().st_size <= 4096 for p in manifest["parts"])
    assert gpu_kit.missing_parts(kit) == []
    target = tmp_path / "site"
    gpu_kit.install(kit, target)
    out = subprocess.run([sys.executable, "-c", "import kitnative; print(kitnative.ANSWER)"],
                         env={"PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert out.stdout.strip() == "42", out.stderr


def test_a_missing_or_corrupt_part_is_named_and_nothing_installs(tmp_path, wheels):
    src, pure, _ = wheels
    kit = tmp_path / "kit"
    manifest = gpu_kit.chunk([pure], kit, part_bytes=4096)
    first, second = manifest["parts"][0]["name"], manifest["parts"][1]["name"]
    (kit / first).unlink()
    data = bytearray((kit / second).read_bytes())
    data[0] ^= 1
    (kit / second).write_bytes(bytes(data))
    assert gpu_kit.missing_parts(kit) == [first, second]
    with pytest.raises(FileNotFoundError, match=first):
        gpu_kit.install(kit, tmp_path / "site")
    assert not (tmp_path / "site").exists()


def test_default_part_fits_one_device_call_beside_the_working_tree():
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True).stdout.split("\0")
    tree = sum((REPO / f).stat().st_size for f in files if f and (REPO / f).is_file())
    assert tree + gpu_kit.DEFAULT_PART_MIB * gpu_kit.MIB < gpu_kit.DEVICE_CALL_LIMIT, tree


def test_lock_file_pins_every_package():
    lock = (REPO / "requirements" / "gpu" / "server-lock.txt").read_text().splitlines()
    reqs = [ln for ln in lock if ln.strip() and not ln.startswith("#")]
    assert reqs and all("==" in r for r in reqs)
    names = {r.split("==")[0].lower() for r in reqs}
    assert {"sglang", "transformers", "fastapi", "uvicorn", "pyzmq", "xgrammar"} <= names
    assert not names & {"torch", "triton", "numpy"}  # the GPU machine's own


def test_manifest_hashes_are_sha256(tmp_path, wheels):
    src, pure, _ = wheels
    m = gpu_kit.chunk([pure], tmp_path / "kit", part_bytes=1 << 20)
    assert m["wheels"][0]["sha256"] == hashlib.sha256(pure.read_bytes()).hexdigest()
