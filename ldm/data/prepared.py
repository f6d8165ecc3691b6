"""Prepared data (the `prepare` stage's output): its columns, its parquet schema and its readers.

A prepared directory holds `shard-NNNNN.parquet` files of R x R PNG crops with their label, caption,
attributes and control metadata, plus `report.json` (kept/skipped counts, classes, shard sha256s).
"""
from __future__ import annotations

import bisect
import io
import json
from pathlib import Path

import numpy as np

from ldm.control import CONTROL_FIELDS
from ldm.layout import PREPARED_REPORT
from ldm.provenance import file_sha256

REPORT = PREPARED_REPORT
COLUMNS = ("key", "image", "label", "caption", "attributes", *CONTROL_FIELDS)  # CONTROL_FIELDS end with flip


def parquet_schema():
    import pyarrow as pa

    i32 = pa.int32()
    types = {"key": pa.string(), "image": pa.binary(), "label": i32, "caption": pa.string(),
             "attributes": pa.string(), **{field: i32 for field in CONTROL_FIELDS}, "flip": pa.int8()}  # flip: 0/1
    return pa.schema([(name, types[name]) for name in COLUMNS])


def read_report(dir: Path) -> dict:
    path = Path(dir) / REPORT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: prepared data missing (run `ldm prepare` first)")
    return json.loads(path.read_text())


def evenly_spaced(n: int, k: int | None) -> np.ndarray:
    """Indices of at most k of n items, evenly spaced (i * n // k), ascending; all n when k is None or >= n.
    Why evenly spaced: every part of the prepared order (every class) keeps its share of a capped subset."""
    if k is None or k >= n:
        return np.arange(n)
    if k < 2:
        raise ValueError(f"an image cap must keep at least 2 images (a covariance needs them), got {k}")
    return np.arange(k) * n // k


def _shard_files(dir: Path) -> list[tuple[Path, str | None]]:
    """(shard, sha256 or None) in report.json order (sorted names without a report)."""
    report_path = dir / REPORT
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        files = [(dir / s["file"], s.get("sha256")) for s in report["shards"]]
    else:
        files = [(p, None) for p in sorted(dir.glob("shard-*.parquet"))]
    if not files:
        raise FileNotFoundError(f"no prepared shards in {dir}")
    return files


def _check_digest(path: Path, digest: str | None, verify: bool) -> None:
    if verify and digest is not None and file_sha256(path) != digest:
        raise ValueError(f"{path}: sha256 does not match report.json (stale or corrupted shard)")


def _decode(png: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def load_prepared(dir: Path, verify: bool = True):
    """Read a prepared directory: (images uint8 [N, R, R, 3], DataFrame of the other columns), all decoded in
    memory (training the VAE, tests); the evaluation stages read `open_prepared` instead.

    Shards are read in report.json order; with `verify`, each shard's sha256 must match the report.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    images, frames = [], []
    for path, digest in _shard_files(Path(dir)):
        _check_digest(path, digest, verify)
        table = pq.read_table(path)
        images.extend(_decode(b) for b in table.column("image").to_pylist())
        frames.append(table.drop_columns(["image"]).to_pandas())
    df = pd.concat(frames, ignore_index=True)
    return np.stack(images).astype(np.uint8, copy=False), df


def open_prepared(dir: Path, verify: bool = True):
    """`load_prepared` without decoding: (PreparedImages, DataFrame of the other columns). Memory: the
    DataFrame (labels, captions, metadata) and one shard's encoded images, whatever the number of images."""
    import pandas as pd
    import pyarrow.parquet as pq

    images = PreparedImages(dir, verify)
    columns = [c for c in COLUMNS if c != "image"]
    frames = [pq.read_table(path, columns=[c for c in columns if c in pq.read_schema(path).names]).to_pandas()
              for path in images.files]
    return images, pd.concat(frames, ignore_index=True)


class PreparedImages:
    """The images of a prepared directory as a read-only uint8 sequence [N, R, R, 3] that decodes only the rows
    asked for: `images[i]`, `images[a:b]`, `images[indices]` (any order) -> uint8 arrays; `len(images)`.

    Why: evaluation must hold a bounded number of decoded images whatever N is (ImageNet at 512 px decodes to
    about 1 TB); a decoded array and this reader are used alike (`image_chunks`). The encoded image columns of
    the last `keep` shards read are kept (bounded by the shard size, not N): reading in order reads every shard
    once, and random mini-batches of a dataset of at most `keep` shards read each shard once.
    """

    dtype, ndim = np.dtype(np.uint8), 4

    def __init__(self, dir: Path, verify: bool = True, keep: int = 4):
        import pyarrow.parquet as pq

        self.dir, self.files, self.offsets, self.keep = Path(dir), [], [0], keep
        for path, digest in _shard_files(self.dir):
            _check_digest(path, digest, verify)
            self.files.append(path)
            self.offsets.append(self.offsets[-1] + pq.ParquetFile(path).metadata.num_rows)
        self._cached: dict[int, list] = {}  # shard -> encoded images, least recently used first
        self._shape: tuple | None = None

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def shape(self) -> tuple:
        if self._shape is None:
            self._shape = (len(self), *self[0].shape)
        return self._shape

    def _encoded(self, k: int) -> list:
        if k not in self._cached:
            import pyarrow.parquet as pq

            while len(self._cached) >= self.keep:  # drop the least recently used before reading the next
                self._cached.pop(next(iter(self._cached)))
            self._cached[k] = pq.read_table(self.files[k], columns=["image"]).column("image").to_pylist()
        self._cached[k] = self._cached.pop(k)  # most recently used last
        return self._cached[k]

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self[np.array([key])][0]
        rows = np.arange(*key.indices(len(self))) if isinstance(key, slice) else np.asarray(key)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        if len(rows) and not (-len(self) <= rows.min() and rows.max() < len(self)):
            raise IndexError(f"rows outside the {len(self)} prepared images")
        rows = np.where(rows < 0, rows + len(self), rows)
        shard = np.searchsorted(self.offsets, rows, side="right") - 1
        out = None
        for k in np.unique(shard):  # each shard read once, in order
            encoded = self._encoded(int(k))
            for pos in np.flatnonzero(shard == k):
                img = _decode(encoded[rows[pos] - self.offsets[k]])
                if out is None:
                    out = np.empty((len(rows), *img.shape), np.uint8)
                out[pos] = img
        return out if out is not None else np.empty((0, *self.shape[1:]), np.uint8)


def image_chunks(images, indices=None, size: int = 256):
    """uint8 arrays of at most `size` images: the rows `indices` (default all, in order) of a decoded array or a
    `PreparedImages`; only one chunk is decoded at a time."""
    indices = np.arange(len(images)) if indices is None else np.asarray(indices)
    for start in range(0, len(indices), size):
        yield images[indices[start:start + size]]


class PreparedRows:
    """Row-range reader over the prepared parquet shards (one decoded file kept at a time)."""

    COLUMNS = ["key", "image", "label", "caption", *CONTROL_FIELDS]

    def __init__(self, prepared: Path, report: dict):
        import pyarrow.parquet as pq

        self.files, self.offsets = [], [0]
        for s in report["shards"]:
            f = prepared / s["file"]
            if not f.is_file():
                raise FileNotFoundError(f"prepared shard missing: {f}")
            n = pq.ParquetFile(f).metadata.num_rows
            if n != int(s.get("rows", n)):
                raise ValueError(f"prepared shard {f} has {n} rows, report.json says {s['rows']}")
            self.files.append(f)
            self.offsets.append(self.offsets[-1] + n)
        self._cached: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return self.offsets[-1]

    def _file(self, i: int) -> dict:
        if self._cached is None or self._cached[0] != i:
            import pyarrow.parquet as pq

            self._cached = (i, pq.read_table(self.files[i], columns=self.COLUMNS).to_pydict())
        return self._cached[1]

    def select(self, indices, columns: list[str]) -> dict[str, list]:
        """`columns` of the rows at global `indices` (any order), reading only those columns of the shards
        that hold them (captions of a few thousand held-out rows without decoding a single image)."""
        import pyarrow.parquet as pq

        indices = [int(i) for i in indices]
        out: dict[str, list] = {c: [None] * len(indices) for c in columns}
        by_file: dict[int, list[tuple[int, int]]] = {}
        for pos, i in enumerate(indices):
            if not 0 <= i < len(self):
                raise IndexError(f"row {i} outside the {len(self)} prepared rows")
            by_file.setdefault(bisect.bisect_right(self.offsets, i) - 1, []).append((pos, i))
        for k, wanted in sorted(by_file.items()):
            table = pq.read_table(self.files[k], columns=columns).to_pydict()
            for pos, i in wanted:
                for c in columns:
                    out[c][pos] = table[c][i - self.offsets[k]]
        return out

    def rows(self, a: int, b: int) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in self.COLUMNS}
        i = bisect.bisect_right(self.offsets, a) - 1
        while a < b:
            lo, hi = self.offsets[i], self.offsets[i + 1]
            take = min(b, hi)
            cols = self._file(i)
            for c in self.COLUMNS:
                out[c] += cols[c][a - lo:take - lo]
            a, i = take, i + 1
        return out
