"""The picture of a run's samples in REPORT.md: a bounded grid of images, one row per shown class (or prompts)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


#: rows of a sample grid at most: 16 classes evenly spaced over the label range (1,000 rows at ImageNet
#: scale would be an unreadable 8,000-image picture)
GRID_ROWS = 16


def grid_classes(num_classes: int, rows: int = GRID_ROWS) -> list[int]:
    """The classes a sample grid shows: all of them up to `rows`, else `rows` evenly spaced (k * K // rows)."""
    return list(range(num_classes)) if num_classes <= rows else [k * num_classes // rows for k in range(rows)]


def tile(cells: list[np.ndarray], per_row: int, padding: int = 2, fill: int = 255) -> np.ndarray:
    """H×W×C uint8 cells in rows of `per_row`, `padding` px of `fill` around each: the picture of torchvision's
    `make_grid(..., nrow=per_row, padding=padding, pad_value=fill)` (tests/test_eval_run.py compares the two).

    Why not call `make_grid`: importing torchvision costs ~2-3 CPU-s (it pulls in torch._dynamo), paid by every
    `ldm evaluate` job of a study for one picture."""
    h, w, c = cells[0].shape
    cols = min(per_row, len(cells))
    rows = -(-len(cells) // cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), fill, np.uint8)
    for i, cell in enumerate(cells):
        y, x = divmod(i, cols)
        grid[y * (h + padding) + padding:(y + 1) * (h + padding), x * (w + padding) + padding:(x + 1) * (w + padding)] = cell
    return grid


def save_sample_grid(data: dict, classes: list[str], path: Path, per_class: int = 8, min_side: int = 64) -> list[int]:
    """One row per shown class (`grid_classes`; first sampling seed), blank cells where a class has fewer
    samples, upscaled with nearest-neighbour to at least `min_side` px. Returns the classes shown; on data
    without classes the grid is the first 2 * `per_class` images in prompt order, and it returns their
    indices (the report lists their prompts)."""
    first = data["seeds"] == data["seeds"][0]
    images, labels = data["images"][first], data["labels"][first]
    blank = np.full(images.shape[1:], 255, dtype=np.uint8)
    cells = []
    if classes:
        shown = grid_classes(len(classes))
        for k in shown:
            chosen = list(images[labels == k][:per_class])
            cells.extend(chosen + [blank] * (per_class - len(chosen)))
    else:
        shown = list(range(min(len(images), 2 * per_class)))
        cells = list(images[shown])
        cells += [blank] * (-len(cells) % per_class)
    picture = Image.fromarray(tile(cells, per_class))
    scale = max(1, -(-min_side // images.shape[1]))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    picture.save(tmp)
    tmp.replace(path)
    return shown
