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

Two worlds (`world=` of `sample_specs` / `write_synthetic`; docs/synthetic-world.md):
- "simple" (the default, byte-identical to the original generator): every attribute drawn independently,
  one caption template. Size/crop/flip metadata carry no class information, captions all ~12 words.
- "rich": the same kind of images, but the correlations the paper's effects need: class-dependent native
  size and aspect (original size predicts the class: claim 1), class-dependent placement near the borders
  (a crop cuts the object: crop metadata matters), a chiral class (`arrow`, always pointing right) and a
  lighting side skewed to the left (a mirrored image is a different distribution: the flip flag carries
  information), and captions of 2..30 words (claim 4, padding). Per-image draws come from a generator
  seeded by (seed, index), so image i is the same whatever `num_images` is.
"""
from __future__ import annotations

import math
import random

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
WORLDS = ("simple", "rich")

# ----------------------------------------------------------------------------------------------- rich world
RICH_SHAPES = ("arrow", "circle", "square", "triangle")  # sorted; the arrow always points right (chiral)
LIGHTS = ("left", "right")  # which half of the object is lit (a lighter tint of its colour)
LIT_MIX = 0.45  # lit half = colour blended this far towards white
RICH_ATTRIBUTES = {**ATTRIBUTES, "shape": list(RICH_SHAPES), "light": list(LIGHTS)}
RICH_MIN_SIDE, RICH_MAX_SIDE = 40, 320  # aspect stays within [1/2, 2]: prepare's max_aspect (4) never skips
P_LIGHT_LEFT = 0.85  # "light from the upper left": a mirrored image has the light on the unusual side
P_TYPICAL = 0.85  # share of a class's images drawn from its own size/aspect/placement mode, else the broad one
BROAD = {"scale": (48, 224), "log2_aspect": (-1.0, 1.0)}
# Per class: native scale sqrt(w*h) (log-uniform, px) and log2(w/h) range (drawn with P_TYPICAL, else BROAD),
# preferred positions (drawn with p_place, else any of the 9), P(size == "large").
_EDGE_COLUMNS = ("top left", "left", "bottom left", "top right", "right", "bottom right")
_EDGE_ROWS = ("top left", "top", "top right", "bottom left", "bottom", "bottom right")
RICH_CLASSES = {
    "arrow": {"scale": (96, 160), "log2_aspect": (0.4, 0.9), "positions": _EDGE_COLUMNS, "p_place": 0.7,
              "p_large": 0.75},
    "circle": {"scale": (44, 80), "log2_aspect": (0.25, 1.0), "positions": ("center",), "p_place": 0.6,
               "p_large": 0.5},
    "square": {"scale": (160, 232), "log2_aspect": (-0.9, -0.35), "positions": _EDGE_ROWS, "p_place": 0.7,
               "p_large": 0.7},
    "triangle": {"scale": (64, 224), "log2_aspect": (-0.3, 0.3),
                 "positions": ("bottom left", "bottom", "bottom right"), "p_place": 0.6, "p_large": 0.5},
}
CAPTION_DETAILS = (0, 1, 2, 3, 4)  # 0: "a circle" (2 words) ... 4: every attribute + extra clauses (<= 30)
P_DETAIL = (0.15, 0.2, 0.25, 0.2, 0.2)
MAX_CAPTION_WORDS = 30


def caption(spec: dict) -> str:
    """The caption: simple world, every attribute in words; rich world (`spec["world"] == "rich"`), see
    `rich_caption`. A pure function of the spec."""
    if spec.get("world") == "rich":
        return rich_caption(spec)
    pos = spec["position"]
    where = {"center": "in the center", "left": "on the left", "right": "on the right"}.get(pos, f"at the {pos}")
    return f"a {spec['size']} {spec['colour']} {spec['shape']} {where} of a {spec['background']} background"


def classes(world: str = "simple") -> list[str]:
    """Class names (sorted == label order) of `world`."""
    return list(RICH_SHAPES if _check_world(world) == "rich" else SHAPES)


def attributes(world: str = "simple") -> dict[str, list[str]]:
    """Attribute vocabularies of `world` (what metadata.jsonl / the parquet `attributes` column hold)."""
    return {k: list(v) for k, v in (RICH_ATTRIBUTES if _check_world(world) == "rich" else ATTRIBUTES).items()}


def _check_world(world: str) -> str:
    if world not in WORLDS:
        raise ValueError(f"unknown synthetic world {world!r}; expected one of {', '.join(WORLDS)}")
    return world


def sample_specs(num_images: int, seed: int, world: str = "simple") -> list[dict]:
    """Attribute draws for `num_images` images; classes exactly balanced (counts differ by at most 1)."""
    if _check_world(world) == "rich":
        return sample_rich_specs(num_images, seed)
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


def _image_rng(seed: int, index: int, what: str) -> random.Random:
    # str seeds are hashed with SHA-512 by `random` (not PYTHONHASHSEED): stable across runs and platforms
    return random.Random(f"ldm-synthetic-rich:{seed}:{what}:{index}")


def _weighted(rng: random.Random, values, weights):
    x, acc = rng.random(), 0.0
    for v, p in zip(values, weights):
        acc += p
        if x < acc:
            return v
    return values[-1]


def sample_rich_specs(num_images: int, seed: int) -> list[dict]:
    """Rich-world draws (see RICH_CLASSES). Labels are a fresh permutation of the classes in each block of
    len(RICH_SHAPES) images, and each image's attributes come from a generator seeded by (seed, index), so
    the first k specs of any longer run are these k specs: keys, bytes and classes stay put as N grows."""
    n_cls = len(RICH_SHAPES)
    specs = []
    for i in range(num_images):
        block = list(range(n_cls))
        _image_rng(seed, i // n_cls, "labels").shuffle(block)
        label = block[i % n_cls]
        shape = RICH_SHAPES[label]
        cls = RICH_CLASSES[shape]
        rng = _image_rng(seed, i, "image")
        typical = rng.random() < P_TYPICAL
        lo, hi = cls["scale"] if typical else BROAD["scale"]
        scale = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        a_lo, a_hi = cls["log2_aspect"] if typical else BROAD["log2_aspect"]
        aspect = 2.0 ** rng.uniform(a_lo, a_hi)
        h = min(RICH_MAX_SIDE, max(RICH_MIN_SIDE, round(scale / math.sqrt(aspect))))
        w = min(RICH_MAX_SIDE, 2 * h, max(RICH_MIN_SIDE, (h + 1) // 2, round(h * aspect)))  # w/h in [1/2, 2]
        place = rng.random() < cls["p_place"]
        position = rng.choice(list(cls["positions"]) if place else list(POSITIONS))
        specs.append({
            "id": f"{i:06d}",
            "label": label,
            "shape": shape,
            "colour": rng.choice(list(COLOURS)),
            "size": "large" if rng.random() < cls["p_large"] else "small",
            "position": position,
            "background": rng.choice(list(BACKGROUNDS)),
            "light": "left" if rng.random() < P_LIGHT_LEFT else "right",
            "width": w,
            "height": h,
            "jitter": (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)),
            "world": "rich",
            "detail": _weighted(rng, CAPTION_DETAILS, P_DETAIL),
            "phrasing": rng.getrandbits(32),
        })
    return specs


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def frame_words(width: int, height: int) -> str:
    """Native format in words (rich captions): "landscape" (w/h >= 1.2), "portrait" (<= 1/1.2) or "balanced"
    (not "square": a caption names no class but its own)."""
    r = width / height
    return "landscape" if r >= 1.2 else "portrait" if r <= 1 / 1.2 else "balanced"


def resolution_words(width: int, height: int) -> str:
    """Native resolution in words (rich captions): low (sqrt(w*h) < 80), high (> 150) or medium."""
    s = math.sqrt(width * height)
    return "low" if s < 80 else "high" if s > 150 else "medium"


def rich_caption(spec: dict) -> str:
    """A rich-world caption, 2..MAX_CAPTION_WORDS words, at `spec["detail"]` (0: the class only; 4: every
    attribute plus extra clauses about format, resolution, orientation, composition). Phrasing variants
    come from `spec["phrasing"]`; every statement is true of the image."""
    rng = random.Random(spec["phrasing"])
    shape, colour, size, bg = spec["shape"], spec["colour"], spec["size"], spec["background"]
    pos = spec["position"]
    where = {"center": "in the center", "left": "on the left", "right": "on the right"}.get(pos, f"at the {pos}")
    detail = spec["detail"]
    if detail == 0:
        return f"{_a(shape)} {shape}"
    if detail == 1:
        return rng.choice([f"{_a(colour)} {colour} {shape}", f"{_a(size)} {size} {shape}",
                           f"{_a(shape)} {shape} on {bg}", f"{colour} {shape}, photo"])
    prefix = rng.choice(["", "a photo of ", "an image of ", "a picture of "])
    if detail == 2:
        body = rng.choice([f"{size} {colour} {shape} on {_a(bg)} {bg} background", f"{colour} {shape} {where}",
                           f"{size} {shape} {where}"])
        return prefix + f"{_a(body)} {body}"
    body = f"{size} {colour} {shape} {where} of {_a(bg)} {bg} background, lit from the {spec['light']}"
    text = prefix + f"{_a(body)} {body}"
    if detail == 3:
        return text
    w, h = spec["width"], spec["height"]
    clauses = [f"in a {frame_words(w, h)} frame", f"taken at {resolution_words(w, h)} resolution",
               "with nothing else in the scene", f"the {shape} is {colour}",
               "pointing to the right" if shape == "arrow" else "seen straight on",
               f"with the {spec['light']} half brighter than the other", "sharp and clearly drawn"]
    if pos != "center":
        clauses.append("close to the edge of the picture")
    rng.shuffle(clauses)
    words = len(text.split())
    for clause in clauses:
        n = len(clause.split())
        if words + n > MAX_CAPTION_WORDS:
            continue
        text, words = f"{text}, {clause}", words + n
    return text


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


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, side: float, fill) -> None:
    r = side / 2
    x0, y0, x1, y1 = cx - r, cy - r, cx + r, cy + r
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
    elif shape == "arrow":
        # pointing right: a shaft a third of the extent thick, a head filling the full height on the right
        t = side / 6
        neck = x1 - 0.5 * side
        draw.rectangle((x0, cy - t, neck + 0.05 * side, cy + t), fill=fill)
        draw.polygon([(neck, y0), (x1, cy), (neck, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(set(SHAPES) | set(RICH_SHAPES))}")


def lit_colour(colour: str) -> tuple[int, int, int]:
    """The lit half's tint of a colour (rich world)."""
    return tuple(round(c + LIT_MIX * (255 - c)) for c in COLOURS[colour])


def render(spec: dict) -> Image.Image:
    """Draw one sample at SUPERSAMPLE x and box-downsample to (width, height), RGB.

    A spec with a `light` key (rich world) gets a two-tone object: the half on the `light` side of the
    bounding box centre is drawn in `lit_colour`."""
    s = SUPERSAMPLE
    w, h = spec["width"], spec["height"]
    img = Image.new("RGB", (w * s, h * s), BACKGROUNDS[spec["background"]])
    cx, cy, side = (v * s for v in object_box(spec))
    _draw_shape(ImageDraw.Draw(img), spec["shape"], cx, cy, side, COLOURS[spec["colour"]])
    if "light" not in spec:
        return img.reduce(s)
    if spec["light"] not in LIGHTS:
        raise ValueError(f"unknown light {spec['light']!r}; expected one of {LIGHTS}")
    # The lit half: draw the shape again into a copy of that half of the frame (drawing clips at the copy's
    # border, which is the split line) and paste the copy back.
    split = round(cx)
    box = (0, 0, split, img.height) if spec["light"] == "left" else (split, 0, img.width, img.height)
    if box[2] > box[0]:
        half = img.crop(box)
        _draw_shape(ImageDraw.Draw(half), spec["shape"], cx - box[0], cy, side, lit_colour(spec["colour"]))
        img.paste(half, box[:2])
    return img.reduce(s)
