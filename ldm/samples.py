"""A run's sample sets on disk: one safetensors shard of uint8 images per set, and `index.json` listing them.

Written by the `sample` stage and read by the `evaluate` stage; images are stored as tensors in one shard
per snapshot (and per extra set: guidance sweep, size conditions), never as one file per image.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .layout import SAMPLES_INDEX as INDEX
from .provenance import save_tensors


def save_set(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write one sample set atomically (a killed job leaves no half-written shard)."""
    tmp = path.with_name(path.name + ".tmp")
    save_tensors({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


class FinishedParts:
    """The image sets a sampling job has finished, kept until the job ends, so a killed job (preempted, out of
    time, SIGKILL) redoes only what it had not finished: one file per (set, seed) under `samples/parts/`,
    written atomically, reused only when its `key` (a digest of everything the images depend on: run and
    sampling settings, the snapshot's weights) matches."""

    def __init__(self, samples_dir: Path, log=print):
        self.dir, self.log, self.reused = samples_dir / "parts", log, 0

    def load(self, name: str, key: str) -> torch.Tensor | None:
        """The images of part `name` when its file was finished with this `key`, else None."""
        path = self.dir / f"{name}.safetensors"
        if path.is_file():
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") == key:
                    return f.get_tensor("images")
        return None

    def get(self, name: str, key: str, make) -> torch.Tensor:
        """The images of part `name`: from its file when it was finished with this `key`, else `make()` (kept)."""
        images = self.load(name, key)
        if images is not None:
            self.reused += 1
            return images
        images = make()
        self.dir.mkdir(parents=True, exist_ok=True)
        save_set(self.dir / f"{name}.safetensors", {"images": images}, {"key": key})
        return images

    def clear(self) -> None:
        """Every set is in its final file: the parts go."""
        shutil.rmtree(self.dir, ignore_errors=True)


def load_set(samples_dir: Path, entry: dict) -> dict[str, np.ndarray]:
    """The arrays of one set named by an index entry (a snapshot, the guidance sweep or the size set)."""
    return {k: v.numpy() for k, v in load_file(str(samples_dir / entry["file"])).items()}


#: next to the index: the prompt of every image of a text-conditional run
PROMPTS = "prompts.json"


def read_prompts(samples_dir: Path, index: dict) -> list[str] | None:
    """The prompt of every image of a text-conditional run (image i: prompt i), else None."""
    if "prompts" not in index:
        return None
    return json.loads((samples_dir / index["prompts"]["file"]).read_text())["prompts"]


def read_index(samples_dir: Path) -> dict:
    path = samples_dir / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no samples index (run `ldm sample` first)")
    return json.loads(path.read_text())
