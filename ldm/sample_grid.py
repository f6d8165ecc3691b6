"""The picture of a run's samples in REPORT.md: a bounded grid of images, one row per shown class (or prompts)."""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid


#: rows of a sample grid at most: 16 classes evenly spaced over the label range (1,000 rows at ImageNet
#: scale would be an unreadable 8,000-image picture)
GRID_ROWS = 16


def grid_classes(num_classes: int, rows: int = GRID_ROWS) -> list[int]:
    """The classes a sample grid shows: all of them up to `rows`, else `rows` evenly spaced (k * K // rows)."""
    return list(range(num_classes)) if num_classes <= rows else [k * num_classes // rows for k in range(rows)]


def save_sample_grid(data: dict, classes: list[str], path: Path, per_class: int = 8, min_side: int = 64) -> list[int]:
    """One row per shown class (`grid_classes`; first sampling seed), blank cells where a class has fewer
    samples, upscaled with nearest-neighbour to at least `min_side` px. Returns the classes shown; on data
    without classes the grid is the first 2 * `per_class` images in prompt order, and it returns their
    indices (the report lists their prompts)."""
    first = data["seeds"] == data["seeds"][0]
    images, labels = data["images"][first], data["labels"][first]
    blank = torch.full((images.shape[3], images.shape[1], images.shape[2]), 255, dtype=torch.uint8)
    rows = []
    if classes:
        shown = grid_classes(len(classes))
        for k in shown:
            chosen = list(torch.from_numpy(images[labels == k][:per_class]).permute(0, 3, 1, 2))
            rows.extend(chosen + [blank] * (per_class - len(chosen)))
    else:
        shown = list(range(min(len(images), 2 * per_class)))
        rows = list(torch.from_numpy(images[shown]).permute(0, 3, 1, 2))
        rows += [blank] * (-len(rows) % per_class)
    grid = make_grid(torch.stack(rows), nrow=per_class, padding=2, pad_value=255)
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    scale = max(1, -(-min_side // images.shape[1]))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    picture.save(tmp)
    tmp.replace(path)
    return shown
