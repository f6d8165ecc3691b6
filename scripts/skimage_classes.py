"""Arrange scikit-image's bundled photographs into an ImageNet-style class-folder tree for `ldm prepare`.

Why: the pipeline has to be shown on real photographs (JPEG/PNG, RGB and grayscale, non-square, larger
than the training resolution), not only on the synthetic shapes, and scikit-image ships a handful of
them inside its wheel (no download). A handful of photos is too few to train on, so each class folder
gets the original photo(s) byte for byte plus `--crops` random crops of them (side 35-90 % of the
shorter edge, aspect 3:4 to 4:3, deterministic from `--seed`), written in the photo's own format.
`metadata.jsonl` (the Hugging Face ImageFolder convention that `ldm prepare` reads) gives each file a
caption. Classes and their photos are listed in CLASSES.

    pip install scikit-image==0.26.0   # the `test` extra pins it
    python scripts/skimage_classes.py --out work/own/raw --crops 24
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = {  # class folder -> (bundled files in skimage/data, caption)
    "astronaut": (["astronaut.png"], "a photo of an astronaut"),
    "cat": (["chelsea.png"], "a photo of a cat"),
    "coffee": (["coffee.png"], "a photo of a cup of coffee"),
    "motorcycle": (["motorcycle_left.png", "motorcycle_right.png"], "a photo of a motorcycle"),
    "rocket": (["rocket.jpg"], "a photo of a rocket on a launch pad"),
    "texture": (["brick.png", "grass.png", "gravel.png"], "a grayscale photo of a ground texture"),
}


def skimage_data_dir() -> Path:
    try:
        import skimage.data
    except ImportError:
        raise SystemExit("needs scikit-image: pip install scikit-image==0.26.0 (or pip install -e '.[test]')")
    return Path(skimage.data.data_dir)


def random_crop(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = im.size
    side = rng.uniform(0.35, 0.9) * min(w, h)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw, ch = min(w, round(side * aspect ** 0.5)), min(h, round(side / aspect ** 0.5))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return im.crop((left, top, left + cw, top + ch))


def arrange(out: Path, crops: int, seed: int = 0) -> dict[str, int]:
    """Write the class folders under `out` (replacing them); return images per class."""
    src = skimage_data_dir()
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts, meta = {}, []
    for cls, (files, caption) in CLASSES.items():
        d = out / cls
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        names = []
        for f in files:
            shutil.copyfile(src / f, d / f)
            names.append(f)
        for i in range(crops):
            f = files[i % len(files)]
            im = Image.open(src / f)
            stem, ext = f.rsplit(".", 1)
            name = f"{stem}-crop{i:03d}.{ext}"
            random_crop(im, rng).save(d / name, **({"quality": 92} if ext == "jpg" else {}))
            names.append(name)
        meta += [{"file_name": f"{cls}/{n}", "caption": caption} for n in names]
        counts[cls] = len(names)
    (out / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--crops", type=int, default=24, help="random crops per class, besides the originals")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    counts = arrange(args.out, args.crops, args.seed)
    print(f"{sum(counts.values())} images in {len(counts)} classes under {args.out}: "
          + ", ".join(f"{k} {v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
