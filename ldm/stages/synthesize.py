"""`ldm synthesize`: the embedded default's synthetic shapes dataset (class folders + caption shards)."""
from __future__ import annotations

from pathlib import Path

from ..data.synthetic_writer import write_synthetic


def run(args) -> None:
    info = write_synthetic(Path(args.out), num_images=args.num_images, seed=args.seed, corrupt=args.corrupt,
                           world=args.world)
    print(f"wrote {args.num_images} synthetic images (+{args.corrupt} corrupt) to {args.out}: classes {info['classes']}")
