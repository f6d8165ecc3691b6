"""The control-metadata vector, described once: its fields, their order, their groups and what a flip does.

A control vector is the SDXL-style micro-conditioning of one image, in original-image pixels:
(orig_h, orig_w, crop_top, crop_left, crop_h, crop_w), plus `flip` (1: the image the model sees is the
mirror of the original; the first author's later code has such a slot). Without the flag a model trained
with flips cannot tell a mirrored image from an original one, which matters wherever the data is not mirror
symmetric (text, chiral objects, lighting). Prepared data stores these columns, the latent cache stacks them
into a (N, WIDTH) float tensor, training mirrors the crop box of flipped samples and toggles `flip`,
sampling asks for "a whole, unmirrored square image of S pixels", and the models embed them per group:
`size` (low-level: the original resolution) and `crop` (geometric: the crop box and the flip), each with
its own time weighting. All of them read this module, so a new field is added here and nowhere else.
"""
from __future__ import annotations

import torch

#: Field names in vector order (columns of prepared data and of the latent cache's `control` tensor).
CONTROL_FIELDS: tuple[str, ...] = ("orig_h", "orig_w", "crop_top", "crop_left", "crop_h", "crop_w", "flip")
#: Width of a control vector.
CONTROL_WIDTH = len(CONTROL_FIELDS)
#: Field groups embedded separately (each may get its own time weighting w(t)).
CONTROL_GROUPS: dict[str, tuple[int, ...]] = {
    "size": (CONTROL_FIELDS.index("orig_h"), CONTROL_FIELDS.index("orig_w")),
    "crop": tuple(CONTROL_FIELDS.index(f) for f in ("crop_top", "crop_left", "crop_h", "crop_w", "flip")),
}
#: Index of the flip flag (a recipe with `control_flip: false` zeroes it: the ablation without the flag).
FLIP = CONTROL_FIELDS.index("flip")

_ORIG_W, _CROP_LEFT, _CROP_W = (CONTROL_FIELDS.index(f) for f in ("orig_w", "crop_left", "crop_w"))


def whole_square_image(size: float, count: int) -> torch.Tensor:
    """(count, WIDTH) control of an uncropped, unmirrored square image of `size` pixels (SDXL's "whole image")."""
    values = {"orig_h": size, "orig_w": size, "crop_top": 0.0, "crop_left": 0.0, "crop_h": size, "crop_w": size,
              "flip": 0.0}
    return torch.tensor([float(values[f]) for f in CONTROL_FIELDS]).repeat(count, 1)


def mirror_flipped(control: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """Mirroring an image mirrors its crop box, crop_left' = orig_w - crop_left - crop_w, and toggles `flip`
    (rows where flipped)."""
    control = control.clone()
    rows = flipped.bool()
    mirrored_left = control[:, _ORIG_W] - control[:, _CROP_LEFT] - control[:, _CROP_W]
    control[:, _CROP_LEFT] = torch.where(rows, mirrored_left, control[:, _CROP_LEFT])
    control[:, FLIP] = torch.where(rows, 1.0 - control[:, FLIP], control[:, FLIP])
    return control


def mirror_box(meta: dict) -> dict:
    """The same for one prepared image's metadata (a prepare-time flip): mirrored crop box, toggled flip."""
    return {**meta, "crop_left": meta["orig_w"] - meta["crop_left"] - meta["crop_w"], "flip": 1 - meta["flip"]}


def check_shape(control: torch.Tensor, rows: int | None = None) -> None:
    """Raise a ValueError naming the fields when `control` is not (rows, WIDTH)."""
    if control.ndim != 2 or control.shape[1] != CONTROL_WIDTH or (rows is not None and control.shape[0] != rows):
        want = f"({rows if rows is not None else 'B'}, {CONTROL_WIDTH})"
        raise ValueError(f"control must be {want} {CONTROL_FIELDS}, got {tuple(control.shape)}")
