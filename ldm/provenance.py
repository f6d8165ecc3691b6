"""Provenance and atomic file writes shared by every stage.

Stage outputs are written to a temporary sibling and renamed into place, so a killed job never leaves a
half-written file that Snakemake or DVC would mistake for a finished one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent


def code_version() -> str:
    """Hash of the package's source files: identical on every clone of the same code, unlike a timestamp,
    and stable across commits that do not touch `ldm/` (so DVC does not see spurious metric changes)."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE_ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def digest(obj) -> str:
    """Stable short hash of a JSON-able object (rerun trigger and provenance)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, with the same bytes for the same tensors and metadata in every process.

    safetensors writes the metadata from a Rust HashMap, whose order changes from process to process: the same
    weights then hash differently (records' `weights_sha256`, DVC, two runs compared byte for byte). The header
    is rewritten with the metadata keys sorted; the tensors' entries and data stay as safetensors wrote them."""
    from safetensors.torch import save_file

    path = str(path)
    save_file(tensors, path, metadata=metadata)
    if not metadata or len(metadata) < 2:
        return
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (size - len(text))  # the same JSON reordered: never longer than the padded original
        if len(text) != size:
            raise RuntimeError(f"{path}: the reordered safetensors header is {len(text)} bytes, not {size}")
        handle.seek(8)
        handle.write(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n").encode())


def atomic_replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place, replacing an older one."""
    if final_dir.exists():
        old = final_dir.with_name(final_dir.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
