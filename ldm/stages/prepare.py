"""`ldm prepare`: raw source -> validated, cropped R x R parquet shards + report.json (formats.md).

Why: decoding and cropping once per resolution makes every later stage (VAE training, latent encoding,
evaluation) read the same pixels and the same crop-control metadata. Each image's randomness comes from
sha256(seed, key), so the output does not depend on iteration order or worker count, and a rerun with
the same arguments writes byte-identical shards. Bad inputs never crash the stage: they are counted in
report.json under their reason; only a dataset with nothing usable is an error. `--workers` (processes on
one node) and `--rank/--world-size` (SLURM tasks) split the work and write the same bytes as one process
(`ldm.data.prepare_parallel`).
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from ldm.data.prepare_parallel import DEFAULT_PART_SIZE, prepare_parallel
from ldm.data.prepared import REPORT
from ldm.data.preparing import finish, image_rows, sample_rng, shard_file, write_shard
from ldm.data.sources import open_source
from ldm.data.transforms import CROP_POLICIES, SkipImage
from ldm.progress import progress
from ldm.provenance import file_sha256

__all__ = ["prepare", "run", "sample_rng"]


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
            shard_size: int = 1000, max_aspect: float = 4.0, crops: int = 1, workers: int = 1, rank: int = 0,
            world_size: int = 1, part_size: int = DEFAULT_PART_SIZE) -> dict:
    """Decode, validate and crop every sample of `source` into `out`/shard-NNNNN.parquet; return the report.

    `crops` > 1 (random policies): that many random crops per image, each a row with its own crop box and key
    (`ldm.data.split.crop_key`), so training, which draws rows, sees a new crop of an image at most visits:
    random-crop augmentation with the crops cached, not one crop fixed at prepare time.

    `workers` > 1 or `world_size` > 1: the parallel path (`ldm.data.prepare_parallel`), same files; a rank
    whose call leaves work to other ranks returns {"complete": False, ...} instead of the report."""
    _validate(resolution, crop, shard_size, max_aspect)
    if crops < 1 or (crop == "center" and crops != 1):
        raise ValueError(f"crops must be >= 1, and 1 with the center crop (all its crops are the same); got {crops}")
    for name, value in (("workers", workers), ("world_size", world_size), ("part_size", part_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    settings = {"resolution": int(resolution), "crop": crop, "seed": int(seed), "max_aspect": float(max_aspect),
                "crops": int(crops)}
    if workers > 1 or world_size > 1:
        return prepare_parallel(str(source), Path(out), settings, int(shard_size), int(workers), int(rank),
                                int(world_size), int(part_size))
    return _prepare_one_process(str(source), Path(out), settings, int(shard_size))


def _prepare_one_process(source: str, out: Path, settings: dict, shard_size: int) -> dict:
    """The streaming path: rows are written as soon as a shard is full (no intermediate files)."""
    src = open_source(source)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).unlink(missing_ok=True)  # a run that dies midway must not look finished

    skipped: Counter = Counter()
    shards: list[dict] = []
    rows: list[dict] = []
    kept = 0

    def flush() -> None:
        path = out / shard_file(len(shards))
        write_shard(path, rows)
        shards.append({"file": path.name, "rows": len(rows), "sha256": file_sha256(path)})
        rows.clear()

    for sample in progress(src, f"prepare {settings['resolution']}px", unit="img"):
        try:
            new = image_rows(sample, **settings)
        except SkipImage as e:
            skipped[e.reason] += 1
            continue
        for row in new:
            rows.append(row)
            if len(rows) == shard_size:
                flush()
        kept += 1
    if rows:
        flush()
    skipped.update(src.skipped)
    return finish(out, source, shards, kept, skipped, settings["resolution"], settings["crop"], src.classes,
                  settings["crops"])


def _rank_world(args) -> tuple[int, int]:
    """--rank/--world-size, else the launcher's RANK/WORLD_SIZE, else a single process (as `ldm encode`)."""
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    return rank, world


def run(args) -> None:
    rank, world = _rank_world(args)
    problem = (f"rank {rank} not in [0, world size {world})" if not 0 <= rank < world
               else f"--workers must be >= 1, got {args.workers}" if args.workers < 1 else None)
    if problem:  # a launch mistake: one line and exit code 2, before any work is set up
        print(f"ldm prepare: error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    report = prepare(args.source, Path(args.out), resolution=args.resolution, crop=args.crop, seed=args.seed,
                     crops=args.crops, shard_size=args.shard_size, workers=args.workers, rank=rank,
                     world_size=world)
    if report.get("complete", True) is False:
        print(f"rank {rank}/{world}: prepared its {report['parts_done']} parts; {report['missing']} of "
              f"{report['parts']} parts still missing (other ranks); the last rank to finish writes report.json")
        return
    print(f"prepared {report['kept']} images at {args.resolution}px into {args.out}; skipped: {report['skipped']}")
