"""`ldm check-data`: fail right after `prepare`, in one line, on data that would make the study silently wrong.

Why a stage of its own: Snakemake runs it between `prepare` and the jobs that read the data (`train`,
`train_evaluator`), so a single class, an empty class folder, missing captions or a phantom class of
duplicates stops the DAG before hours of training. The checks live in `ldm.data.checks`. The record
(`--out`) is written only when every check holds, so its presence means the data passed.
"""
from __future__ import annotations

from pathlib import Path

from ldm.data.checks import check_prepared
from ldm.provenance import atomic_write_json


def run(args) -> None:
    out = Path(args.out)
    out.unlink(missing_ok=True)  # a failed check must not leave an older pass behind
    record = check_prepared(Path(args.prepared), min_classes=args.min_classes, captions=args.captions)
    atomic_write_json(out, record)
    counts = sorted(record["classes"].items(), key=lambda item: (item[1], item[0]))
    spread = f" (fewest: {counts[0][0]} {counts[0][1]}, most: {counts[-1][0]} {counts[-1][1]})" if counts else ""
    caps, dup = record["captions"], record["duplicates"]
    print(f"{args.prepared}: {record['images']} images in {len(counts)} classes{spread}; captions: "
          f"{caps['nonempty']} non-empty, {caps['empty']} empty; {dup['within_class']} repeated images within a "
          f"class; every check holds, record in {out}")
