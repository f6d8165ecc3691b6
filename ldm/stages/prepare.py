"""`ldm prepare`: raw source -> validated, cropped R x R parquet shards + report.json (formats.md).

Why: decoding and cropping once per resolution makes every later stage (VAE training, latent encoding,
evaluation) read the same pixels and the same crop-control metadata. Each image's randomness comes from
sha256(seed, key), so the output does not depend on iteration order or worker count, and a rerun with
the same arguments writes byte-identical shards. Bad inputs never crash the stage: they are counted in
report.json under their reason; only a dataset with nothing usable is an error.
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
from ldm.data.sources import open_source
from ldm.data.split import crop_key
from ldm.data.transforms import CROP_POLICIES, SkipImage, crop_and_resize, decode_image
from ldm.errors import EmptyDatasetError
from ldm.provenance import file_sha256



def sample_rng(seed: int, key: str) -> np.random.Generator:
    """Per-image generator from (seed, key): independent of order and of other images."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _write_shard(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema()
    table = pa.Table.from_arrays([pa.array([r[c] for r in rows], type=schema.field(c).type) for c in COLUMNS],
                                 schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _validate(resolution, crop, shard_size, max_aspect) -> None:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    if crop not in CROP_POLICIES:
        raise ValueError(f"unknown crop policy {crop!r}; expected one of {', '.join(CROP_POLICIES)}")
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if not max_aspect >= 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect!r}")


def prepare(source: str, out: Path, resolution: int, crop: str = "center", seed: int = 0,
            shard_size: int = 1000, max_aspect: float = 4.0, crops: int = 1) -> dict:
    """Decode, validate and crop every sample of `source` into `out`/shard-NNNNN.parquet; return the report.

    `crops` > 1 (random policies): that many random crops per image, each a row with its own crop box and key
    (`ldm.data.split.crop_key`), so training, which draws rows, sees a new crop of an image at most visits:
    random-crop augmentation with the crops cached, not one crop fixed at prepare time."""
    from tqdm.auto import tqdm

    _validate(resolution, crop, shard_size, max_aspect)
    if crops < 1 or (crop == "center" and crops != 1):
        raise ValueError(f"crops must be >= 1, and 1 with the center crop (all its crops are the same); got {crops}")
    resolution = int(resolution)
    src = open_source(str(source))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).unlink(missing_ok=True)  # a run that dies midway must not look finished

    skipped: Counter = Counter()
    shards: list[dict] = []
    rows: list[dict] = []
    kept = 0

    def flush() -> None:
        path = out / f"shard-{len(shards):05d}.parquet"
        _write_shard(path, rows)
        shards.append({"file": path.name, "rows": len(rows), "sha256": file_sha256(path)})
        rows.clear()

    for sample in tqdm(src, desc=f"prepare {resolution}px", unit="img", disable=None):
        try:
            try:
                data = sample.read()
            except OSError as e:
                raise SkipImage("unreadable", f"{sample.key}: {e}") from None
            img = decode_image(data, sample.key)
            cropped = [crop_and_resize(img, resolution, crop, sample_rng(seed, crop_key(sample.key, k)), max_aspect)
                       for k in range(crops)]
        except SkipImage as e:
            skipped[e.reason] += 1
            continue
        for k, (crop_img, meta) in enumerate(cropped):
            buf = io.BytesIO()
            crop_img.save(buf, format="PNG")
            rows.append({"key": crop_key(sample.key, k), "image": buf.getvalue(), "label": int(sample.label),
                         "caption": sample.caption,
                         "attributes": json.dumps(sample.attributes, sort_keys=True), **meta})
            if len(rows) == shard_size:
                flush()
        kept += 1
    if rows:
        flush()
    skipped.update(src.skipped)

    if kept == 0:
        raise EmptyDatasetError(f"no usable images in {source}: skipped {dict(sorted(skipped.items()))}")

    current = {s["file"] for s in shards}
    for old in out.glob("shard-*.parquet"):  # idempotent: a smaller rerun leaves no stale shard behind
        if old.name not in current:
            old.unlink()
    report = {"kept": kept, "skipped": dict(sorted(skipped.items())), "resolution": resolution, "crop": crop,
              "classes": list(src.classes), "shards": shards, "source": str(source)}
    if crops > 1:  # kept counts images; the shards hold `crops` rows of each
        report["crops_per_image"] = crops
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / REPORT)
    return report


def run(args) -> None:
    report = prepare(args.source, Path(args.out), resolution=args.resolution, crop=args.crop, seed=args.seed,
                     crops=args.crops, shard_size=args.shard_size)
    print(f"prepared {report['kept']} images at {args.resolution}px into {args.out}; skipped: {report['skipped']}")
