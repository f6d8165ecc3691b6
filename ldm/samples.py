"""A run's sample sets on disk: one safetensors shard of uint8 images per set, and `index.json` listing them.

Written by the `sample` stage and read by the `evaluate` stage; images are stored as tensors in one shard
per snapshot (and per extra set: guidance sweep, size conditions), never as one file per image.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from .layout import SAMPLES_INDEX as INDEX


def save_set(path: Path, tensors: dict) -> None:
    """Write one sample set atomically (a killed job leaves no half-written shard)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def load_set(samples_dir: Path, entry: dict) -> dict[str, np.ndarray]:
    """The arrays of one set named by an index entry (a snapshot, the guidance sweep or the size set)."""
    return {k: v.numpy() for k, v in load_file(str(samples_dir / entry["file"])).items()}


def read_index(samples_dir: Path) -> dict:
    path = samples_dir / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no samples index (run `ldm sample` first)")
    return json.loads(path.read_text())
