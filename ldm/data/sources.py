"""One iterator over every raw layout `ldm prepare` accepts (formats.md, "Raw data").

Why: prepare, its report and its tests must not care whether images come from an ImageNet-style folder
tree, parquet caption shards, webdataset tars or the synthetic generator. Each source yields `RawSample`s
in a deterministic order; image bytes are read lazily through `read()` so that an unreadable file becomes
one skipped sample (the caller catches OSError/SkipImage) instead of a crash. Samples whose caption or
attributes cannot be read are not yielded; they are counted in `source.skipped` (reset on each iteration).
A path that is not a regular file (a FIFO or device named `x.png`) is never read: reading it could block
forever, so `read()` raises SkipImage("not_a_file") instead.
"""
from __future__ import annotations

import glob as globlib
import json
import os
import stat
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from ldm.data.transforms import SkipImage
from ldm.errors import EmptyDatasetError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class RawSample:
    key: str
    read: Callable[[], bytes]
    label: int = -1
    caption: str = ""
    attributes: dict = field(default_factory=dict)


class Source:
    """Base: `name`, `classes`, `skipped` (reason -> count from the last iteration), iteration."""

    name: str
    classes: list[str]

    def __init__(self) -> None:
        self.skipped: Counter = Counter()

    def __iter__(self) -> Iterator[RawSample]:
        self.skipped = Counter()
        return self._samples()

    def _samples(self) -> Iterator[RawSample]:  # pragma: no cover - abstract
        raise NotImplementedError


def _parse_attributes(value) -> dict:
    """JSON string or dict of str -> str; anything else raises ValueError."""
    if value is None or value == "":
        return {}
    attrs = json.loads(value) if isinstance(value, (str, bytes)) else value
    if not isinstance(attrs, dict):
        raise ValueError("attributes is not an object")
    return {str(k): str(v) for k, v in attrs.items()}


def _read_regular(path: Path) -> bytes:
    """The bytes of `path` if it is a regular file (through symlinks); opened non-blocking and checked
    before any read, so a FIFO or a device raises SkipImage instead of hanging or streaming forever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SkipImage("not_a_file", str(path))
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _file_reader(path: Path) -> Callable[[], bytes]:
    return partial(_read_regular, path)


def _given(data: bytes | None) -> bytes:
    return data if data is not None else b""


def _bytes_reader(data: bytes | None) -> Callable[[], bytes]:
    """`read()` of bytes already in hand. A partial, not a lambda: samples are pickled to prepare's workers."""
    return partial(_given, data)


def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")


def _classes_near(paths: list[Path]) -> list[str]:
    """Class names from a dataset.json / classes.json beside the shards or one level up (synthetic layout)."""
    for d in dict.fromkeys(p.parent for p in paths):
        for cand in (d / "dataset.json", d / "classes.json", d.parent / "dataset.json", d.parent / "classes.json"):
            if cand.is_file():
                try:
                    data = json.loads(cand.read_text())
                except (OSError, ValueError):
                    continue
                classes = data.get("classes") if isinstance(data, dict) else data
                if isinstance(classes, list):
                    return [str(c) for c in classes]
    return []


class FolderSource(Source):
    """ROOT/<class>/<file>: label = index of <class> in the sorted sub-folders; optional ROOT/metadata.jsonl."""

    def __init__(self, root: Path, name: str | None = None):
        super().__init__()
        self.root = Path(root)
        self.name = name or str(self.root)
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _metadata(self) -> dict[str, dict | None]:
        """file_name -> record; None marks a record whose caption/attributes are unreadable."""
        meta: dict[str, dict | None] = {}
        path = self.root / "metadata.jsonl"
        if not path.is_file():
            return meta
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                name = rec["file_name"]
            except (ValueError, KeyError, TypeError):
                self.skipped["bad_metadata"] += 1  # no file name to pin it on: the image stays, uncaptioned
                continue
            try:
                cap = rec.get("caption", "")
                if cap is None:
                    cap = ""
                if not isinstance(cap, str):
                    raise ValueError("caption is not a string")
                meta[str(name)] = {"caption": cap, "attributes": _parse_attributes(rec.get("attributes"))}
            except (ValueError, TypeError):
                meta[str(name)] = None
        return meta

    def _samples(self) -> Iterator[RawSample]:
        meta = self._metadata()
        # images beside the class folders belong to no class: counted, not silently dropped
        loose = sum(1 for p in self.root.iterdir() if _is_image_name(p) and not p.is_dir())
        if loose:
            self.skipped["outside_class_folder"] += loose
        for label, cls in enumerate(self.classes):
            try:  # rglob hides an unreadable folder; its class keeps its label and has 0 images
                with os.scandir(self.root / cls):
                    pass
            except OSError:
                self.skipped["unreadable_folder"] += 1
                continue
            files = sorted(p for p in (self.root / cls).rglob("*") if _is_image_name(p) and not p.is_dir())
            for path in files:
                key = path.relative_to(self.root).as_posix()
                rec = meta.get(key, {"caption": "", "attributes": {}})
                if rec is None:
                    self.skipped["bad_caption"] += 1
                    continue
                yield RawSample(key, _file_reader(path), label, rec["caption"], rec["attributes"])


class ParquetSource(Source):
    """Caption shards: `image` bytes or `image_path` (relative to the shard), `caption`, `label`, `attributes`."""

    def __init__(self, files: list[Path], name: str):
        super().__init__()
        self.files = files
        self.name = name
        self.classes = _classes_near(files)

    def _samples(self) -> Iterator[RawSample]:
        import pyarrow.parquet as pq

        for path in self.files:
            try:
                pf = pq.ParquetFile(path)
            except Exception:
                self.skipped["unreadable_shard"] += 1
                continue
            cols = set(pf.schema_arrow.names)
            img_col = "image" if "image" in cols else "image_path" if "image_path" in cols else None
            if img_col is None:
                raise ValueError(f"{path}: caption shard has neither an 'image' nor an 'image_path' column")
            want = [c for c in (img_col, "caption", "label", "attributes") if c in cols]
            row = 0
            for batch in pf.iter_batches(batch_size=256, columns=want):
                data = batch.to_pydict()
                for i in range(batch.num_rows):
                    key = f"{path.name}:{row}"
                    row += 1
                    cap = data["caption"][i] if "caption" in data else ""
                    if not isinstance(cap, str):
                        self.skipped["bad_caption"] += 1
                        continue
                    try:
                        attrs = _parse_attributes(data["attributes"][i]) if "attributes" in data else {}
                    except (ValueError, TypeError):
                        self.skipped["bad_attributes"] += 1
                        continue
                    label = data["label"][i] if "label" in data else None
                    label = -1 if label is None else int(label)
                    value = data[img_col][i]
                    if img_col == "image":
                        read = _bytes_reader(value)
                    else:
                        p = Path(value) if value else None
                        read = _file_reader(p if p is None or p.is_absolute() else path.parent / p) \
                            if p is not None else _bytes_reader(None)
                    yield RawSample(key, read, label, cap, attrs)


class TarSource(Source):
    """Webdataset shards: members grouped by the name before the first '.' of the basename; one image
    (.png/.jpg/...), caption from .txt or .json["caption"], label from .cls or .json["label"]."""

    def __init__(self, files: list[Path], name: str):
        super().__init__()
        self.files = files
        self.name = name
        self.classes = _classes_near(files)

    def _groups(self, path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
        current, parts = None, {}
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                dirname, _, base = member.name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if not dot:
                    continue
                sample_key = f"{dirname}/{stem}" if dirname else stem
                if sample_key != current:
                    if current is not None:
                        yield current, parts
                    current, parts = sample_key, {}
                f = tar.extractfile(member)
                parts[ext.lower()] = f.read() if f is not None else b""
        if current is not None:
            yield current, parts

    def _samples(self) -> Iterator[RawSample]:
        for path in self.files:
            try:
                for sample_key, parts in self._groups(path):
                    sample = self._sample(path, sample_key, parts)
                    if sample is not None:
                        yield sample
            except (tarfile.TarError, OSError, EOFError):
                self.skipped["unreadable_shard"] += 1

    def _sample(self, path: Path, sample_key: str, parts: dict[str, bytes]) -> RawSample | None:
        img_ext = next((e for e in ("png", "jpg", "jpeg", "webp", "bmp") if e in parts), None)
        if img_ext is None:
            self.skipped["no_image"] += 1
            return None
        try:
            meta = json.loads(parts["json"]) if "json" in parts else {}
            if not isinstance(meta, dict):
                raise ValueError("json is not an object")
            if "txt" in parts:
                cap = parts["txt"].decode("utf-8")
            else:
                cap = meta.get("caption", meta.get("text", "")) or ""
            if not isinstance(cap, str):
                raise ValueError("caption is not a string")
            label = int(parts["cls"].decode().strip()) if "cls" in parts else int(meta.get("label", -1))
            attrs = _parse_attributes(meta.get("attributes"))
        except (ValueError, TypeError, UnicodeDecodeError):
            self.skipped["bad_caption"] += 1
            return None
        data = parts[img_ext]
        return RawSample(f"{path.name}:{sample_key}", _bytes_reader(data), label, cap.strip(), attrs)


def _expand(source: str) -> list[Path]:
    if any(ch in source for ch in "*?["):
        return [Path(p) for p in sorted(globlib.glob(source, recursive=True)) if Path(p).is_file()]
    p = Path(source)
    if p.is_file():
        return [p]
    return []


def open_source(source: str) -> Source:
    """Pick the reader from what `source` names: a synthetic root (has dataset.json + folders/), a class
    folder tree, a parquet file / directory of them / glob, or a .tar file / directory of them / glob."""
    src = str(source)
    p = Path(src)
    if p.is_dir():
        if (p / "dataset.json").is_file() and (p / "folders").is_dir():
            return FolderSource(p / "folders", name=f"synthetic:{p}")
        parquets = sorted(f for f in p.glob("*.parquet") if f.is_file())
        if parquets:
            return ParquetSource(parquets, src)
        tars = sorted(f for f in p.glob("*.tar") if f.is_file())
        if tars:
            return TarSource(tars, src)
        if any(c.is_dir() and not c.name.startswith(".") for c in p.iterdir()):
            return FolderSource(p)
        loose = sum(1 for c in p.iterdir() if _is_image_name(c))
        if loose:
            raise EmptyDatasetError(f"{src}: {loose} images at its top level and no class subfolder; images must "
                                    f"be in class subfolders ({src}/<class>/<image>)")
        raise EmptyDatasetError(f"no images, parquet shards, tar shards or class folders in {src}")
    files = _expand(src)
    if not files:
        raise FileNotFoundError(f"source not found: {src}")
    if all(f.suffix == ".parquet" for f in files):
        return ParquetSource(files, src)
    if all(f.suffix == ".tar" for f in files):
        return TarSource(files, src)
    raise ValueError(f"source {src} mixes or lacks .parquet/.tar files: {sorted({f.suffix for f in files})}")
