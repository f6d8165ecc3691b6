"""`ldm sample`: images from every snapshot of a run, for every sampling seed, with fixed conditions.

The final snapshot is sampled with every seed of `sampling.seeds` (its metrics are mean ± std over them);
earlier snapshots, which only feed the metric-vs-step curves, with the first seed. Labels are class-balanced (image i gets class i mod K) and every image has its own noise seed derived from
(sampling seed, i), so image i is the same whatever the batch size. The size/crop condition is that of an
uncropped square image of `sampling.original_size` pixels (the SDXL convention for "a whole image").
Images are stored as uint8 tensors in one safetensors shard per snapshot, never as one file per image.

Two extra sets of the final snapshot, when the config asks for them:
- `guidance.safetensors`: the first seed at every semantic scale of `sampling.guidance_sweep` (the sweep
  curve; evaluation picks the scale with the best fd_evaluator);
- `sizes.safetensors`: every seed at every original size of `sampling.size_conditions`, same noise and
  class per image across sizes (the size-consistency metric, the paper's Figure 2 effect).
Image i is bit-identical whatever `sampling.batch_size` (see `ldm.sampling`; the forward group size is
recorded in the index as `forward_batch`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .autoencoder import load_vae
from .config import ConfigError, get_run, sampler_for
from .latents import LatentDataset
from .models import model_from_config
from .provenance import atomic_write_json
from .sampling import FORWARD_BATCH, sample_latents
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


def _save_shard(path: Path, tensors: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def sample_run(config: dict, run_id: str, log=print) -> Path:
    run = get_run(config, run_id)
    recipe, scfg = config["recipes"][run.recipe], config["sampling"]
    out = run_dir(config, run_id) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    cache = LatentDataset(latents_dir(config, run_id), verify=False)
    scaling, shift = cache.scaling_factor, cache.shift_factor
    vae = load_vae(vae_location(config)).eval()
    objective = build_run_objective(config, run_id)
    labels, control = sampling_conditions(scfg["num_samples"], len(cache.classes), scfg["original_size"])
    _, model_config, _ = load_final(run_dir(config, run_id) / "final.safetensors")
    model = model_from_config(model_config).eval()
    latent_shape = _latent_shape(cache)
    entries = []
    snapshots = list_snapshots(run_dir(config, run_id) / "checkpoints")
    sampler = sampler_for(config, run.recipe)

    uses_control = recipe.get("control", "additive") != "none"
    text, text_mask = None, None
    if recipe.get("conditioning", "class") == "text":
        text, text_mask = sampling_captions(cache, labels, recipe, seed=config["seed"])

    def draw(seed: int, guidance: float, ctrl: torch.Tensor) -> torch.Tensor:
        latents = sample_latents(model, objective, None if text is not None else labels,
                                 ctrl if uses_control else None, text=text, text_mask=text_mask,
                                 latent_shape=latent_shape, steps=scfg["steps"],
                                 guidance_semantic=guidance, guidance_control=scfg["guidance_control"],
                                 guidance_interval=scfg["guidance_interval"], seeds=image_seeds(seed, len(labels)),
                                 batch_size=scfg["batch_size"], sampler=sampler, micro_batch=FORWARD_BATCH)
        return decode_to_uint8(vae, latents, scaling, shift)

    for snapshot in snapshots:
        step = int(snapshot.name.split("-")[1])
        model.load_state_dict(load_file(str(snapshot / "ema.safetensors")))
        # Every seed for the final weights (mean ± std); the first seed only for the curve's earlier points.
        snapshot_seeds = scfg["seeds"] if snapshot == snapshots[-1] else scfg["seeds"][:1]
        images = [draw(seed, scfg["guidance"], control) for seed in snapshot_seeds]
        seeds = [torch.full((len(labels),), seed, dtype=torch.int64) for seed in snapshot_seeds]
        name = f"step-{step:07d}.safetensors"
        _save_shard(out / name, {"images": torch.cat(images), "labels": labels.repeat(len(snapshot_seeds)),
                                 "seeds": torch.cat(seeds), "control": control.repeat(len(snapshot_seeds), 1)})
        entries.append({"step": step, "file": name, "seeds": snapshot_seeds})
        log(f"{run_id}: sampled step {step} ({len(snapshot_seeds)} seeds x {len(labels)} images)")
    # the model now holds the final snapshot's weights
    extra = {}
    if scfg["guidance_sweep"]:
        scales = [float(g) for g in scfg["guidance_sweep"]]
        seed = scfg["seeds"][0]
        images = [draw(seed, g, control) for g in scales]
        _save_shard(out / "guidance.safetensors", {
            "images": torch.cat(images), "labels": labels.repeat(len(scales)),
            "scales": torch.tensor(scales, dtype=torch.float64).repeat_interleave(len(labels))})
        extra["guidance_sweep"] = {"file": "guidance.safetensors", "scales": scales, "seed": seed,
                                   "step": entries[-1]["step"]}
        log(f"{run_id}: guidance sweep at scales {scales} (seed {seed})")
    if scfg["size_conditions"] and not uses_control:
        log(f"{run_id}: size conditions skipped: recipe {run.recipe} has no control conditioning")
    elif scfg["size_conditions"]:
        sizes = [int(v) for v in scfg["size_conditions"]]
        images, seeds, size_col = [], [], []
        for seed in scfg["seeds"]:
            for size in sizes:
                images.append(draw(seed, scfg["guidance"], sampling_conditions(len(labels), len(cache.classes), size)[1]))
                seeds.append(torch.full((len(labels),), seed, dtype=torch.int64))
                size_col.append(torch.full((len(labels),), size, dtype=torch.int64))
        n_sets = len(sizes) * len(scfg["seeds"])
        _save_shard(out / "sizes.safetensors", {"images": torch.cat(images), "labels": labels.repeat(n_sets),
                                                "seeds": torch.cat(seeds), "sizes": torch.cat(size_col),
                                                "index": torch.arange(len(labels)).repeat(n_sets)})
        extra["size_conditions"] = {"file": "sizes.safetensors", "sizes": sizes, "seeds": scfg["seeds"],
                                    "step": entries[-1]["step"]}
        log(f"{run_id}: size conditions {sizes} x {len(scfg['seeds'])} seeds")
    atomic_write_json(out / "index.json", {
        "run_id": run_id, "snapshots": entries, "seeds": scfg["seeds"], "num_samples": scfg["num_samples"],
        "sampler": sampler, "steps": scfg["steps"],
        "guidance": {"semantic": scfg["guidance"], "control": scfg["guidance_control"],
                     "interval": scfg["guidance_interval"]},
        "forward_batch": FORWARD_BATCH, "image_seeds": "seed * 1000003 + i",
        "original_size": scfg["original_size"], "classes": cache.classes, "resolution": run.resolution,
        # what evaluation needs to cost the model (REPORT.md's efficiency table) without the checkpoint
        "model_config": model_config, "latent_shape": list(latent_shape),
        "text_tokens": 0 if text is None else int(text.shape[1]), **extra,
    })
    for stale in ("guidance.safetensors", "sizes.safetensors"):  # left over from a config that asked for them
        if not any(e.get("file") == stale for e in extra.values()) and (out / stale).exists():
            (out / stale).unlink()
    return out / "index.json"


def sampling_captions(cache: LatentDataset, labels: torch.Tensor, recipe: dict, seed: int):
    """Caption states for text-conditional sampling: image i gets the (i // K)-th cached caption of its
    class (cache order, cycling), so captions are class-balanced like the labels, fixed across seeds and
    snapshots, and cond_accuracy still has a class to check. Padded as the recipe trains (the noise of
    noisy_replicate from a fixed generator, so every sampling seed sees the same captions)."""
    from .text import pad_tokens

    data = cache.rows()
    if "text_emb" not in data:
        raise ConfigError(f"{cache.dir}: text-conditional sampling needs caption states in the latent cache "
                          "(it was encoded without a text encoder)")
    labels_all = data.column("label")
    by_class = [torch.nonzero(labels_all == c).flatten() for c in range(len(cache.classes))]
    empty = [cache.classes[c] for c, rows in enumerate(by_class) if len(rows) == 0]
    if empty:
        raise ConfigError(f"{cache.dir}: no cached caption of class(es) {empty} to condition on")
    K = len(cache.classes)
    rows = torch.stack([by_class[int(c)][(i // K) % len(by_class[int(c)])] for i, c in enumerate(labels)])
    mode = recipe.get("text_padding", "noisy_replicate")
    picked = data.gather(rows, ["text_emb", "text_len"])
    states, mask = pad_tokens(picked["text_emb"].float(), picked["text_len"], mode=mode,
                              sigma=recipe.get("text_pad_sigma", 0.1), generator=torch.Generator().manual_seed(seed))
    return states, (mask if mode == "zero_mask" else None)


def _latent_shape(cache: LatentDataset) -> tuple[int, int, int]:
    return tuple(cache.manifest["latent_shape"])


def load_samples(samples_dir: Path, entry: dict) -> dict[str, np.ndarray]:
    """The arrays of one shard named by an index entry (a snapshot, the guidance sweep or the size set)."""
    return {k: v.numpy() for k, v in load_file(str(samples_dir / entry["file"])).items()}


def read_index(samples_dir: Path) -> dict:
    return json.loads((samples_dir / "index.json").read_text())
