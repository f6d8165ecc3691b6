"""Deterministic synthetic shapes dataset: the embedded default's stand-in for ImageNet / CC12M.

Why it looks like this:
- Every attribute (shape, colour, size, position, background) is stated in the caption and stored as
  structured attributes, so an evaluator can score class- *and* text-conditional samples without a
  pretrained network (`render` + the vocab constants are the ground truth).
- Native sizes (48..160 px) and aspect ratios (0.5..2) vary and objects sit on a 3x3 grid, so a center
  crop can cut an off-centre object: crop and size metadata (SDXL-style micro-conditioning) matter.
- Shapes are drawn at 4x and box-downsampled (`Image.reduce`), which anti-aliases edges exactly and
  deterministically; PNG and parquet writers are deterministic, so the same seed gives the same bytes.
- `SHAPES` is kept in sorted order so that `SHAPES[label]` is right for both layouts: the class-folder
  convention (formats.md) numbers classes by sorted folder name.
"""
from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "cross", "square", "triangle")  # sorted == class-folder order == label order
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
# Object extent as a fraction of the shorter image side; large enough that the shape (the class)
# stays legible at 32 px after the f=4 autoencoder, not only colour and position.
SIZES = {"small": 0.45, "large": 0.75}
# 3x3 grid: word -> (x fraction, y fraction) of the free range (0 = touching the left/top margin).
POSITIONS = {
    "top left": (0.0, 0.0), "top": (0.5, 0.0), "top right": (1.0, 0.0),
    "left": (0.0, 0.5), "center": (0.5, 0.5), "right": (1.0, 0.5),
    "bottom left": (0.0, 1.0), "bottom": (0.5, 1.0), "bottom right": (1.0, 1.0),
}
ATTRIBUTES = {
    "shape": list(SHAPES),
    "colour": list(COLOURS),
    "size": list(SIZES),
    "position": list(POSITIONS),
    "background": list(BACKGROUNDS),
}
MIN_SIDE, MAX_SIDE = 48, 160
MARGIN = 0.06  # free border, fraction of the shorter side: corners stay background
SUPERSAMPLE = 4
CORRUPT_KINDS = ("truncated", "not_an_image", "empty")  # the prepare skip reason each corrupt file gets


def caption(spec: dict) -> str:
    """The caption states every attribute in words."""
    pos = spec["position"]
    where = {"center": "in the center", "left": "on the left", "right": "on the right"}.get(pos, f"at the {pos}")
    return f"a {spec['size']} {spec['colour']} {spec['shape']} {where} of a {spec['background']} background"


def sample_specs(num_images: int, seed: int) -> list[dict]:
    """Attribute draws for `num_images` images; classes exactly balanced (counts differ by at most 1)."""
    rng = random.Random(seed)
    labels = [i % len(SHAPES) for i in range(num_images)]
    rng.shuffle(labels)
    specs = []
    for i, label in enumerate(labels):
        h = rng.randint(MIN_SIDE, MAX_SIDE)
        # w / h in [2/3, 3/2]: a center crop can cut an object at the edge, rarely remove it entirely
        aspect = 1.5 ** rng.uniform(-1.0, 1.0)
        w = min(MAX_SIDE, max(MIN_SIDE, round(h * aspect)))
        specs.append({
            "id": f"{i:06d}",
            "label": label,
            "shape": SHAPES[label],
            "colour": rng.choice(list(COLOURS)),
            "size": rng.choice(list(SIZES)),
            "position": rng.choice(list(POSITIONS)),
            "background": rng.choice(list(BACKGROUNDS)),
            "width": w,
            "height": h,
            "jitter": (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)),
        })
    return specs


def object_box(spec: dict) -> tuple[float, float, float]:
    """(center x, center y, side) of the object's bounding square in native pixels."""
    w, h = spec["width"], spec["height"]
    short = min(w, h)
    side = SIZES[spec["size"]] * short
    margin = MARGIN * short
    fx, fy = POSITIONS[spec["position"]]
    jx, jy = spec.get("jitter", (0.0, 0.0))
    fx, fy = min(1.0, max(0.0, fx + jx)), min(1.0, max(0.0, fy + jy))
    cx = margin + side / 2 + fx * (w - 2 * margin - side)
    cy = margin + side / 2 + fy * (h - 2 * margin - side)
    return cx, cy, side


def render(spec: dict) -> Image.Image:
    """Draw one sample at SUPERSAMPLE x and box-downsample to (width, height), RGB."""
    s = SUPERSAMPLE
    w, h = spec["width"], spec["height"]
    img = Image.new("RGB", (w * s, h * s), BACKGROUNDS[spec["background"]])
    draw = ImageDraw.Draw(img)
    cx, cy, side = (v * s for v in object_box(spec))
    r = side / 2
    x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
    fill = COLOURS[spec["colour"]]
    shape = spec["shape"]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        t = side / 6  # arm half-thickness: arms are a third of the extent wide
        draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)
        draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return img.reduce(s)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _corrupt_bytes(kind: str, good_png: bytes) -> bytes:
    if kind == "truncated":
        return good_png[: len(good_png) // 2]
    if kind == "not_an_image":
        return b"this is a text file with a .png name\n"
    return b""  # empty


def write_synthetic(root: Path, num_images: int, seed: int, corrupt: int = 0, shard_size: int = 500) -> dict:
    """Write both raw layouts of formats.md plus dataset.json under `root`; returns dataset.json's content.

    Corrupt files (named `corrupt-NNN.png`, cycling through CORRUPT_KINDS) go into the class folders only
    and are not listed in metadata.jsonl; dataset.json's `corrupt` maps each expected skip reason to its count.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if num_images < 0 or corrupt < 0 or shard_size < 1:
        raise ValueError(f"bad synthetic sizes: num_images={num_images}, corrupt={corrupt}, shard_size={shard_size}")
    root = Path(root)
    folders, captions_dir = root / "folders", root / "captions"
    for d in [folders / c for c in SHAPES] + [captions_dir]:
        d.mkdir(parents=True, exist_ok=True)
    for old in captions_dir.glob("shard-*.parquet"):  # a rerun with fewer images leaves no stale shard
        old.unlink()

    meta_lines, rows = [], []
    for spec in sample_specs(num_images, seed):
        png = _png(render(spec))
        attrs = {k: spec[k] for k in ATTRIBUTES}
        text = caption(spec)
        file_name = f"{spec['shape']}/{spec['id']}.png"
        _write_bytes(folders / file_name, png)
        meta_lines.append(json.dumps({"file_name": file_name, "caption": text, "attributes": attrs}, sort_keys=True))
        rows.append((png, text, spec["label"], json.dumps(attrs, sort_keys=True)))
    _write_bytes(folders / "metadata.jsonl", "".join(line + "\n" for line in meta_lines).encode())

    schema = pa.schema([("image", pa.binary()), ("caption", pa.string()), ("label", pa.int32()),
                        ("attributes", pa.string())])
    for n, start in enumerate(range(0, num_images, shard_size)):
        chunk = list(zip(*rows[start:start + shard_size]))
        table = pa.Table.from_arrays([pa.array(col, type=f.type) for col, f in zip(chunk, schema)], schema=schema)
        path = captions_dir / f"shard-{n:05d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    counts: dict[str, int] = {}
    good = _png(render({"shape": "square", "colour": "red", "size": "large", "position": "center",
                        "background": "white", "width": 64, "height": 64}))
    for old in folders.glob("*/corrupt-*.png"):
        old.unlink()
    for j in range(corrupt):
        kind = CORRUPT_KINDS[j % len(CORRUPT_KINDS)]
        _write_bytes(folders / SHAPES[j % len(SHAPES)] / f"corrupt-{j:03d}.png", _corrupt_bytes(kind, good))
        counts[kind] = counts.get(kind, 0) + 1

    info = {"classes": list(SHAPES), "attributes": ATTRIBUTES, "seed": seed, "num_images": num_images,
            "corrupt": counts, "layouts": {"folders": "folders", "captions": "captions"}}
    _write_bytes(root / "dataset.json", (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    return info
