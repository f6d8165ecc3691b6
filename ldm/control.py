"""The control-metadata vector, described once: its fields, their order, their groups and what a flip does.

A control vector is the SDXL-style micro-conditioning of one image, in original-image pixels:
(orig_h, orig_w, crop_top, crop_left, crop_h, crop_w). Prepared data stores these columns, the latent
cache stacks them into a (N, WIDTH) float tensor, training mirrors the crop of flipped samples, sampling
asks for "a whole square image of S pixels", and the models embed them per group. All of them read this
module, so a new field is added here and nowhere else.
"""
from __future__ import annotations

import torch

#: Field names in vector order (columns of prepared data and of the latent cache's `control` tensor).
CONTROL_FIELDS: tuple[str, ...] = ("orig_h", "orig_w", "crop_top", "crop_left", "crop_h", "crop_w")
#: Width of a control vector.
CONTROL_WIDTH = len(CONTROL_FIELDS)
#: Field groups embedded separately (each may get its own time weighting w(t)).
CONTROL_GROUPS: dict[str, tuple[int, ...]] = {
    "size": (CONTROL_FIELDS.index("orig_h"), CONTROL_FIELDS.index("orig_w")),
    "crop": tuple(CONTROL_FIELDS.index(f) for f in ("crop_top", "crop_left", "crop_h", "crop_w")),
}

_ORIG_W, _CROP_LEFT, _CROP_W = (CONTROL_FIELDS.index(f) for f in ("orig_w", "crop_left", "crop_w"))


def whole_square_image(size: float, count: int) -> torch.Tensor:
    """(count, WIDTH) control of an uncropped square image of `size` pixels (SDXL's "whole image")."""
    values = {"orig_h": size, "orig_w": size, "crop_top": 0.0, "crop_left": 0.0, "crop_h": size, "crop_w": size}
    return torch.tensor([float(values[f]) for f in CONTROL_FIELDS]).repeat(count, 1)


def mirror_flipped(control: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """Mirroring an image mirrors its crop box: crop_left' = orig_w - crop_left - crop_w (rows where flipped)."""
    control = control.clone()
    mirrored_left = control[:, _ORIG_W] - control[:, _CROP_LEFT] - control[:, _CROP_W]
    control[:, _CROP_LEFT] = torch.where(flipped.bool(), mirrored_left, control[:, _CROP_LEFT])
    return control


def check_shape(control: torch.Tensor, rows: int | None = None) -> None:
    """Raise a ValueError naming the fields when `control` is not (rows, WIDTH)."""
    if control.ndim != 2 or control.shape[1] != CONTROL_WIDTH or (rows is not None and control.shape[0] != rows):
        want = f"({rows if rows is not None else 'B'}, {CONTROL_WIDTH})"
        raise ValueError(f"control must be {want} {CONTROL_FIELDS}, got {tuple(control.shape)}")
