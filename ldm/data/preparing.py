"""The pieces every way of running `ldm prepare` shares: one raw sample's rows, a shard file, the report.

Why one module: the single-process path (`ldm.stages.prepare`) and the parallel one
(`ldm.data.prepare_parallel`) must write byte-identical output, so both build rows, write shards and write
report.json through these same functions instead of two copies that could drift apart.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from ldm.data.prepared import COLUMNS, REPORT, parquet_schema
from ldm.data.sources import RawSample
from ldm.data.split import crop_key
from ldm.data.transforms import SkipImage, crop_and_resize, decode_image
from ldm.errors import EmptyDatasetError


def sample_rng(seed: int, key: str) -> np.random.Generator:
    """Per-image generator from (seed, key): independent of order, of other images and of worker count."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def image_rows(sample: RawSample, resolution: int, crop: str, seed: int, max_aspect: float,
               crops: int) -> list[dict]:
    """The prepared rows of one raw sample (one per crop), or SkipImage naming why it is unusable."""
    try:
        data = sample.read()
    except OSError as e:
        raise SkipImage("unreadable", f"{sample.key}: {e}") from None
    img = decode_image(data, sample.key)
    cropped = [crop_and_resize(img, resolution, crop, sample_rng(seed, crop_key(sample.key, k)), max_aspect)
               for k in range(crops)]
    rows = []
    for k, (crop_img, meta) in enumerate(cropped):
        buf = io.BytesIO()
        crop_img.save(buf, format="PNG")
        rows.append({"key": crop_key(sample.key, k), "image": buf.getvalue(), "label": int(sample.label),
                     "caption": sample.caption, "attributes": json.dumps(sample.attributes, sort_keys=True), **meta})
    return rows


def write_shard(path: Path, rows: list[dict], tmp_suffix: str = ".tmp") -> None:
    """Rows -> one parquet file, atomically (`tmp_suffix` lets concurrent writers of one file not collide)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema()
    table = pa.Table.from_arrays([pa.array([r[c] for r in rows], type=schema.field(c).type) for c in COLUMNS],
                                 schema=schema)
    tmp = path.with_name(path.name + tmp_suffix)
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def shard_file(k: int) -> str:
    return f"shard-{k:05d}.parquet"


def finish(out: Path, source: str, shards: list[dict], kept: int, skipped: Counter, resolution: int, crop: str,
           classes: list[str], crops: int, tmp_name: str = "report.json.tmp") -> dict:
    """Remove stale shards, then write report.json last (its presence marks the directory complete)."""
    if kept == 0:
        raise EmptyDatasetError(f"no usable images in {source}: skipped {dict(sorted(skipped.items()))}")
    current = {s["file"] for s in shards}
    for old in out.glob("shard-*.parquet"):  # idempotent: a smaller rerun leaves no stale shard behind
        if old.name not in current:
            old.unlink(missing_ok=True)
    report = {"kept": kept, "skipped": dict(sorted(skipped.items())), "resolution": resolution, "crop": crop,
              "classes": list(classes), "shards": shards, "source": str(source)}
    if crops > 1:  # kept counts images; the shards hold `crops` rows of each
        report["crops_per_image"] = crops
    tmp = out / tmp_name
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / REPORT)
    return report
