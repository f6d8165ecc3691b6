"""`ldm synthesize`: the embedded default's synthetic shapes dataset (class folders + caption shards), or the
rich world in the layouts of ImageNet-1k or CC12M (`ldm.data.synthetic_layouts`)."""
from __future__ import annotations

from pathlib import Path

from ..data.synthetic_layouts import write_cc12m_layout, write_imagenet_layout
from ..data.synthetic_writer import write_synthetic
from ..errors import UserError


def run(args) -> None:
    out = Path(args.out)
    if args.layout == "imagenet":
        if args.num_images % args.classes:
            raise UserError(f"--num-images {args.num_images} is not a multiple of --classes {args.classes}")
        info = write_imagenet_layout(out, args.classes, args.num_images // args.classes, args.val_per_class, args.seed)
        print(f"wrote an ILSVRC-style tree to {out}: {info['classes']} synsets, {info['train_images']} train and "
              f"{info['val_images']} val images")
        return
    if args.layout == "cc12m":
        info = write_cc12m_layout(out, args.num_images, args.seed)
        print(f"wrote {info['images']} captioned images in {info['shards']} img2dataset shard(s) to {out}")
        return
    info = write_synthetic(out, num_images=args.num_images, seed=args.seed, corrupt=args.corrupt, world=args.world)
    print(f"wrote {args.num_images} synthetic images (+{args.corrupt} corrupt) to {args.out}: classes {info['classes']}")
