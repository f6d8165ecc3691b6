"""The held-out split: which images no run ever trains on (`dataset.heldout`, a fraction).

An image is held out when a hash of (dataset seed, image key) falls below the fraction, so the split is a
property of the image, not of its position: the same images are held out at every resolution and crop (a
64 px transfer run never saw its held-out images at 32 px either), it does not move when images are added
or removed, and every rank of a sharded encode computes it without talking to the others. The latent cache
stores it per row (`heldout`); training draws only the other rows, and `val_loss` reads only these.
"""
from __future__ import annotations

import hashlib

import numpy as np


#: a prepared row's key is its image's key, plus `#crop<k>` for the k-th extra random crop (`crop_key`)
CROP_SEPARATOR = "#crop"


def crop_key(image_key: str, k: int) -> str:
    """Row key of an image's k-th random crop: the image key itself for the first, so one crop per image keeps
    the keys (and everything drawn from them) it always had."""
    return image_key if k == 0 else f"{image_key}{CROP_SEPARATOR}{k}"


def image_key(row_key: str) -> str:
    """The image a prepared row was cropped from (`crop_key`'s inverse)."""
    return row_key.split(CROP_SEPARATOR, 1)[0]


def heldout_mask(keys: list[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean per row key: True where its image is held out (every crop of an image on the same side)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1), got {fraction}")
    threshold = int(fraction * 2**64)
    return np.array([int.from_bytes(hashlib.sha256(f"heldout\0{seed}\0{image_key(k)}".encode()).digest()[:8],
                                    "little") < threshold for k in keys], dtype=bool)
