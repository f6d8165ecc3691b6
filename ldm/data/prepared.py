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


def load_prepared(dir: Path, verify: bool = True):
    """Read a prepared directory: (images uint8 [N, R, R, 3], DataFrame of the other columns).

    Shards are read in report.json order; with `verify`, each shard's sha256 must match the report.
    """
    import pandas as pd
    import pyarrow.parquet as pq
    from PIL import Image

    dir = Path(dir)
    report_path = dir / REPORT
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        files = [(dir / s["file"], s.get("sha256")) for s in report["shards"]]
    else:
        files = [(p, None) for p in sorted(dir.glob("shard-*.parquet"))]
    if not files:
        raise FileNotFoundError(f"no prepared shards in {dir}")
    images, frames = [], []
    for path, digest in files:
        if verify and digest is not None and file_sha256(path) != digest:
            raise ValueError(f"{path}: sha256 does not match report.json (stale or corrupted shard)")
        table = pq.read_table(path)
        images.extend(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in table.column("image").to_pylist())
        frames.append(table.drop_columns(["image"]).to_pandas())
    df = pd.concat(frames, ignore_index=True)
    return np.stack(images).astype(np.uint8, copy=False), df


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
