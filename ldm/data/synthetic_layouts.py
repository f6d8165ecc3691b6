"""The rich synthetic world written in the layouts the paper's datasets come in, so that a rehearsal of the
study reads data shaped like ImageNet-1k and CC12M (`ldm synthesize --layout imagenet|cc12m`).

- `imagenet`: an ILSVRC-style tree as the Kaggle ImageNet release ships it: `ROOT/train/<wnid>/<wnid>_<n>.JPEG`
  for `classes` synsets, `ROOT/val/ILSVRC2012_val_<8 digits>.JPEG` with `ROOT/LOC_val_solution.csv`
  (`ImageId,PredictionString` = "wnid xmin ymin xmax ymax") and `ROOT/LOC_synset_mapping.txt` ("wnid
  description"). A synset is one combination of the rich world's attributes (shape, colour, size, background,
  position, lighting: 1,728 combinations, enough for 1,000 distinct classes), in a seeded order, so classes
  are visually distinct and an evaluator can tell them apart. Synset ids are made up (n01440764 + 2357 k).
- `cc12m`: img2dataset webdataset shards `ROOT/<shard:05d>.tar` with members `KEY.jpg`, `KEY.txt` (the caption)
  and `KEY.json` (caption, url, key, status, width, height, original_width, original_height), plus
  `<shard>_stats.json`; keys are the shard number and the index in it, 9 digits, as img2dataset writes them.
  Captions are the rich world's (2-30 words); there is no class anywhere, as in the real CC12M.

Both are deterministic from the seed (JPEG and tar bytes included): image i is drawn from a generator seeded
by (seed, layout, i).
"""
from __future__ import annotations

import io
import itertools
import json
import math
import random
import tarfile
from pathlib import Path

from ..provenance import atomic_write_bytes
from .synthetic import (BACKGROUNDS, BROAD, CAPTION_DETAILS, COLOURS, LIGHTS, P_DETAIL, POSITIONS, RICH_MAX_SIDE,
                        RICH_MIN_SIDE, RICH_SHAPES, SIZES, object_box, render, rich_caption)

LAYOUTS = ("imagenet", "cc12m")
FIRST_WNID, WNID_STEP = 1440764, 2357  # n01440764 is ImageNet's first synset; the rest are made up
JPEG_QUALITY = 90
SHARD_SIZE = 10000  # img2dataset's default number of samples per shard


def synset_attributes(classes: int | None, seed: int) -> list[dict]:
    """`classes` distinct attribute combinations in a seeded order (None: all of them): the synsets."""
    combos = [dict(zip(("shape", "colour", "size", "background", "position", "light"), c))
              for c in itertools.product(RICH_SHAPES, COLOURS, SIZES, BACKGROUNDS, POSITIONS, LIGHTS)]
    classes = len(combos) if classes is None else classes
    if not 1 <= classes <= len(combos):
        raise ValueError(f"classes must be in 1..{len(combos)} (attribute combinations), got {classes}")
    random.Random(f"ldm-synsets:{seed}").shuffle(combos)
    return combos[:classes]


def wnid(k: int) -> str:
    return f"n{FIRST_WNID + WNID_STEP * k:08d}"


def _rng(seed: int, layout: str, index: int) -> random.Random:
    return random.Random(f"ldm-synthetic-layout:{seed}:{layout}:{index}")


def _spec(attrs: dict, rng: random.Random, index: int) -> dict:
    """One image: the given attributes at a native size and aspect of the rich world's broad range."""
    lo, hi = BROAD["scale"]
    scale = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    aspect = 2.0 ** rng.uniform(*BROAD["log2_aspect"])
    h = min(RICH_MAX_SIDE, max(RICH_MIN_SIDE, round(scale / aspect ** 0.5)))
    w = min(RICH_MAX_SIDE, 2 * h, max(RICH_MIN_SIDE, (h + 1) // 2, round(h * aspect)))
    detail = rng.choices(CAPTION_DETAILS, weights=P_DETAIL)[0]
    return {**attrs, "id": f"{index:06d}", "width": w, "height": h, "world": "rich", "detail": detail,
            "jitter": (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)), "phrasing": rng.getrandbits(32)}


def _jpeg(spec: dict) -> bytes:
    buf = io.BytesIO()
    render(spec).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def write_imagenet_layout(root: Path, classes: int, per_class: int, val_per_class: int, seed: int) -> dict:
    """The ILSVRC-style tree (module docstring); returns what it wrote."""
    synsets = synset_attributes(classes, seed)
    descriptions = []
    for k, attrs in enumerate(synsets):
        name = wnid(k)
        descriptions.append(f"{name} {attrs['size']} {attrs['colour']} {attrs['shape']} at {attrs['position']} "
                            f"on {attrs['background']}, lit from the {attrs['light']}")
        for n in range(per_class):
            index = k * per_class + n
            spec = _spec(attrs, _rng(seed, "imagenet-train", index), index)
            atomic_write_bytes(root / "train" / name / f"{name}_{n}.JPEG", _jpeg(spec))
    rows = []
    for v in range(classes * val_per_class):
        k = v % classes
        spec = _spec(synsets[k], _rng(seed, "imagenet-val", v), v)
        image_id = f"ILSVRC2012_val_{v + 1:08d}"
        atomic_write_bytes(root / "val" / f"{image_id}.JPEG", _jpeg(spec))
        cx, cy, side = object_box(spec)
        box = [max(0, round(cx - side / 2)), max(0, round(cy - side / 2)),
               min(spec["width"] - 1, round(cx + side / 2)), min(spec["height"] - 1, round(cy + side / 2))]
        rows.append(f"{image_id},{wnid(k)} {' '.join(map(str, box))} ")
    atomic_write_bytes(root / "LOC_synset_mapping.txt", ("\n".join(descriptions) + "\n").encode())
    atomic_write_bytes(root / "LOC_val_solution.csv", ("ImageId,PredictionString\n" + "\n".join(rows) + "\n").encode())
    return {"layout": "imagenet", "classes": classes, "train_images": classes * per_class,
            "val_images": classes * val_per_class}


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: same seed, same tar bytes
    tar.addfile(info, io.BytesIO(data))


def write_cc12m_layout(root: Path, num_images: int, seed: int, shard_size: int = SHARD_SIZE) -> dict:
    """img2dataset webdataset shards of captioned images, no classes (module docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    attrs = synset_attributes(None, seed)
    shards = 0
    for shard, start in enumerate(range(0, num_images, shard_size)):
        buf = io.BytesIO()
        count = min(shard_size, num_images - start)
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for j in range(count):
                i = start + j
                rng = _rng(seed, "cc12m", i)
                spec = _spec(rng.choice(attrs), rng, i)
                key = f"{shard:05d}{j:04d}"
                caption = rich_caption(spec)
                meta = {"caption": caption, "url": f"https://example.invalid/cc12m/{key}.jpg", "key": key,
                        "status": "success", "error_message": None, "width": spec["width"],
                        "height": spec["height"], "original_width": spec["width"],
                        "original_height": spec["height"]}
                _tar_member(tar, f"{key}.jpg", _jpeg(spec))
                _tar_member(tar, f"{key}.txt", caption.encode())
                _tar_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        atomic_write_bytes(root / f"{shard:05d}.tar", buf.getvalue())
        stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0}
        atomic_write_bytes(root / f"{shard:05d}_stats.json", (json.dumps(stats, sort_keys=True) + "\n").encode())
        shards += 1
    return {"layout": "cc12m", "images": num_images, "shards": shards}

