"""`ldm sample`: images from every snapshot of a run, for every sampling seed, with fixed conditions.

The final snapshot is sampled with every seed of `sampling.seeds` (its metrics are mean ± std over them);
earlier snapshots, which only feed the metric-vs-step curves, with the first seed. Labels are class-balanced (image i gets class i mod K) and every image has its own noise seed derived from
(sampling seed, i), so image i is the same whatever the batch size. The size/crop condition is that of an
uncropped square image of `sampling.original_size` pixels (the SDXL convention for "a whole image").
Images are stored as uint8 tensors in one safetensors shard per snapshot, never as one file per image.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .autoencoder import load_vae
from .config import get_run, sampler_for
from .latents import LatentDataset
from .models import model_from_config
from .provenance import atomic_write_json
from .sampling import sample_latents
from .train import build_run_objective, latents_dir, list_snapshots, load_final, run_dir


def vae_location(config: dict) -> str:
    return config["autoencoder"]["pretrained"] or str(Path(config["workdir"]) / "vae")


def image_seeds(seed: int, count: int) -> list[int]:
    return [seed * 1_000_003 + i for i in range(count)]


def sampling_conditions(num_samples: int, num_classes: int, original_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(num_samples) % num_classes
    size = float(original_size)
    control = torch.tensor([size, size, 0.0, 0.0, size, size]).repeat(num_samples, 1)
    return labels, control


@torch.no_grad()
def decode_to_uint8(vae, latents: torch.Tensor, scaling: float, shift: float, batch_size: int = 64) -> torch.Tensor:
    out = []
    for chunk in latents.split(batch_size):
        pixels = vae.decode(chunk / scaling + shift).sample
        out.append(((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1))
    return torch.cat(out)


def sample_run(config: dict, run_id: str, log=print) -> Path:
    run = get_run(config, run_id)
    _recipe, scfg = config["recipes"][run.recipe], config["sampling"]
    out = run_dir(config, run_id) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    cache = LatentDataset(latents_dir(config, run.resolution), verify=False)
    scaling, shift = cache.scaling_factor, cache.shift_factor
    vae = load_vae(vae_location(config)).eval()
    objective = build_run_objective(config, run_id)
    labels, control = sampling_conditions(scfg["num_samples"], len(cache.classes), scfg["original_size"])
    _, model_config, _ = load_final(run_dir(config, run_id) / "final.safetensors")
    model = model_from_config(model_config).eval()
    latent_shape = _latent_shape(cache)
    entries = []
    snapshots = list_snapshots(run_dir(config, run_id) / "checkpoints")
    for snapshot in snapshots:
        step = int(snapshot.name.split("-")[1])
        model.load_state_dict(load_file(str(snapshot / "ema.safetensors")))
        images, seeds = [], []
        # Every seed for the final weights (mean ± std); the first seed only for the curve's earlier points.
        snapshot_seeds = scfg["seeds"] if snapshot == snapshots[-1] else scfg["seeds"][:1]
        for seed in snapshot_seeds:
            latents = sample_latents(model, objective, labels, control, latent_shape=latent_shape,
                                     steps=scfg["steps"], guidance_semantic=scfg["guidance"],
                                     guidance_control=scfg["guidance_control"],
                                     seeds=image_seeds(seed, len(labels)), batch_size=scfg["batch_size"],
                                     sampler=sampler_for(config, run.recipe))
            images.append(decode_to_uint8(vae, latents, scaling, shift))
            seeds.append(torch.full((len(labels),), seed, dtype=torch.int64))
        name = f"step-{step:07d}.safetensors"
        tmp = out / (name + ".tmp")
        save_file({"images": torch.cat(images).contiguous(), "labels": labels.repeat(len(snapshot_seeds)),
                   "seeds": torch.cat(seeds), "control": control.repeat(len(snapshot_seeds), 1)}, str(tmp))
        tmp.replace(out / name)
        entries.append({"step": step, "file": name, "seeds": snapshot_seeds})
        log(f"{run_id}: sampled step {step} ({len(snapshot_seeds)} seeds x {len(labels)} images)")
    atomic_write_json(out / "index.json", {
        "run_id": run_id, "snapshots": entries, "seeds": scfg["seeds"], "num_samples": scfg["num_samples"],
        "sampler": sampler_for(config, run.recipe), "steps": scfg["steps"],
        "guidance": {"semantic": scfg["guidance"], "control": scfg["guidance_control"]},
        "original_size": scfg["original_size"], "classes": cache.classes, "resolution": run.resolution,
    })
    return out / "index.json"


def _latent_shape(cache: LatentDataset) -> tuple[int, int, int]:
    return tuple(cache.manifest["latent_shape"])


def load_samples(samples_dir: Path, entry: dict) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in load_file(str(samples_dir / entry["file"])).items()}


def read_index(samples_dir: Path) -> dict:
    return json.loads((samples_dir / "index.json").read_text())
