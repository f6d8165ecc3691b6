"""The cost of a study before it runs (`ldm plan CONFIG`): FLOPs per job and rule, and accelerator hours at an
assumed model FLOP utilisation, so a study is sized before it is submitted rather than after a day of queueing.

Counted (FLOPs as `ldm.models.inventory` counts them: 2 per multiply-add, matmuls, convolutions, attention):
- train: steps x the run's global batch x 3 forward passes (forward + backward), x 4/3 with gradient
  checkpointing, plus mDT's masked second pass at its kept fraction;
- sample: per evaluated snapshot (the final one with every sampling seed, the others with the first and
  `aux_samples` images, as `ldm sample` does), the guidance sweeps and the size conditions (`aux_samples`
  images each): images x steps x model passes (the
  guidance formula's: 1 conditional, + 1 with semantic guidance, + 1 with control guidance), plus one VAE
  decode per image;
- evaluate: the TF Inception (5.7 G multiply-adds per 299 px image, its published count) on every image an
  Inception FID scores, and val_loss's forward passes;
- encode: one VAE encode of each image and of its mirror (the cache's two posteriors).
Not counted: data loading, the evaluator and its features (small), text encoding, CLIP. Accelerator hours =
FLOPs / (peak x MFU); both are flags, the MFU an assumption until `benchmarks/gpu.py` measures one.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from .checkpoint import snapshot_steps
from .config import job_resources
from .preflight import vae_geometry
from .spec import Scenario
from .text import MAX_LENGTH as TEXT_TOKENS

INCEPTION_FLOPS = 2 * 5.7e9  # Szegedy et al. 2016, Table 3 (5.72 G multiply-adds at 299 px)
DEFAULT_PEAK_FLOPS = 989e12  # one H100/H200 SXM, dense bf16 tensor cores
DEFAULT_MFU = 0.35  # ASSUMED until measured; the best open DiT-family figure we know is ~37% (U-ViT)
#: what benchmarks/gpu.py measured on a GPU machine (absent until one has run it)
MEASURED = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "gpu.json"


def measured_mfu(path: Path = MEASURED) -> tuple[float, str] | None:
    """(MFU, where it comes from) of the DiT-XL/2 training step that benchmarks/gpu.py measured on a GPU (the
    best of compiled / not, checkpointing off), or None when it has not run on one."""
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    steps = [r["mfu"] for r in result.get("rows", []) if r["what"].startswith("train dit-XL/2")
             and not r.get("checkpointing") and r.get("mfu")]
    return (max(steps), f"measured by {path.name} on {result['device']}") if steps else None
#: caption width of known text encoders (the real one is read at encode time); others are assumed 4096 wide
TEXT_DIMS = {"minilm": 384, "google/flan-t5-xl": 2048, "google/t5-v1_1-xxl": 4096,
             "openai/clip-vit-large-patch14": 768}


#: rules whose killed job keeps its work and the next attempt goes on from there: `ldm train` snapshots on the
#: time limit's SIGTERM (`--signal=TERM@T`) and resumes; `ldm sample` keeps its finished shares. A job of these
#: may need several allocations of its runtime, which the SLURM profile's `retries` grant (docs/slurm.md).
RESUMABLE_RULES = ("train", "sample")
#: the SLURM profile researchers submit with (`snakemake --profile slurm`)
PROFILE = Path(__file__).resolve().parent.parent / "slurm" / "config.yaml"


def profile_attempts(path: Path = PROFILE) -> int:
    """Allocations a job gets under the SLURM profile: its first, plus `retries` resubmissions (1 without it)."""
    if not path.is_file():
        return 1
    return 1 + int((yaml.safe_load(path.read_text()) or {}).get("retries", 0))


@dataclass(frozen=True)
class Job:
    """One job of the DAG with its FLOPs and the accelerator time its resources allow."""

    rule: str
    name: str
    flops: float
    gpus: int
    runtime_h: float

    @property
    def resumable(self) -> bool:
        return self.rule in RESUMABLE_RULES

    def hours(self, peak: float, mfu: float) -> float:
        """Accelerator hours (all of the job's accelerators together)."""
        return self.flops / (peak * mfu) / 3600.0

    def allocations(self, peak: float, mfu: float) -> int:
        """How many allocations of its resources (accelerators x runtime) the job's work takes."""
        return max(1, math.ceil(self.hours(peak, mfu) / (max(self.gpus, 1) * self.runtime_h)))

    def fits(self, peak: float, mfu: float, attempts: int = 1) -> bool:
        """Whether the job finishes within its runtime, or (a resumable job) within `attempts` allocations of it."""
        return self.allocations(peak, mfu) <= (attempts if self.resumable else 1)


def _meta_flops(module: torch.nn.Module, *args) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(*args)
    return float(counter.get_total_flops())


def vae_flops(config: dict, resolution: int) -> tuple[float, float]:
    """(encode, decode) FLOPs of one image with the scenario's autoencoder (SD-VAE's architecture when
    pretrained), counted on the meta device."""
    from diffusers import AutoencoderKL

    from .autoencoder import tiny_vae_config

    cfg = ({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
           if config["autoencoder"]["pretrained"] else tiny_vae_config())
    channels, factor = vae_geometry(config)
    with torch.device("meta"):
        vae = AutoencoderKL(**cfg).eval()
        x = torch.empty(1, 3, resolution, resolution)
        z = torch.empty(1, channels, resolution // factor, resolution // factor)
        return _meta_flops(lambda a: vae.encode(a).latent_dist.mean, x), _meta_flops(lambda a: vae.decode(a).sample, z)


def model_forward_flops(scenario: Scenario, run) -> tuple[float, object]:
    """FLOPs of one forward pass of the run's model on one latent, and the model (meta device)."""
    from .models.inventory import count_forward_flops
    from .recipe import build_run_model

    channels, factor = vae_geometry(scenario.config)
    latent = (channels, run.resolution // factor, run.resolution // factor)
    text_dim = TEXT_DIMS.get(scenario.config["text_encoder"], 4096) if scenario.recipe(run).text_conditional else None
    with torch.device("meta"):
        model = build_run_model(scenario, run, latent, num_classes=1000, text_dim=text_dim)
    return float(count_forward_flops(model.eval(), latent, TEXT_TOKENS)), model


def guidance_passes(semantic: float, control: float, uses_control: bool) -> int:
    """Model passes per step of the guidance formula (`ldm.sampling.guided_prediction`)."""
    need_control = uses_control and control != 1.0
    return 1 + int(semantic != 1.0 or need_control) + int(need_control)


def plan_jobs(scenario: Scenario, images: int | None) -> list[Job]:
    """Every costed job of the scenario (`images`: the dataset's size, for encode; None: not costed)."""
    config = scenario.config
    jobs: list[Job] = []

    def job(rule: str, name: str, flops: float, stage: str | None = None, recipe: str | None = None) -> None:
        res = job_resources(config, rule, stage, recipe)
        gpus = int(res.get("gpus", 0)) * int(res.get("nodes", 1))
        jobs.append(Job(rule, name, flops, gpus, float(res.get("runtime", 60)) / 60.0))

    evaluation = config["evaluation"]
    inception = [m for m in evaluation["metrics"] if m in ("fid_clean", "fid_legacy_tf")]
    resolutions = sorted({run.resolution for run in scenario.runs.values()})
    vae = {r: vae_flops(config, r) for r in resolutions}
    if images:
        for r in resolutions:
            job("encode", f"r{r}", 2 * images * vae[r][0])
    counted: dict[tuple, tuple] = {}  # the seeds and stages of a recipe at one resolution share one model
    for run in scenario.runs.values():
        recipe, tcfg, scfg = scenario.recipe(run), scenario.training(run), scenario.sampling(run)
        key = (run.recipe, run.resolution)
        if key not in counted:
            counted[key] = model_forward_flops(scenario, run)
        fwd, model = counted[key]
        steps = scenario.stage(run).steps
        per_image = 3 * fwd * (4 / 3 if recipe.gradient_checkpointing else 1)
        if getattr(model, "masks_tokens", False):  # mDT: a second pass on the kept tokens
            per_image *= 1 + (1 - float(model.config.get("mask_ratio", 0.0)))
        job("train", run.run_id, steps * tcfg["batch_size"] * per_image, run.stage, run.recipe)
        snapshots = snapshot_steps(steps, tcfg["snapshots"], with_zero=run.init_run is not None)
        seeds, samples = len(scfg["seeds"]), scfg["num_samples"]
        aux = min(scfg["aux_samples"] or samples, samples)
        passes = guidance_passes(scfg["guidance"], scfg["guidance_control"], recipe.uses_control)
        # (images, passes per step): every seed at the last snapshot, the first seed (aux images) at the others
        sets = [(samples, passes)] * seeds + [(aux, passes)] * (len(snapshots) - 1)
        sets += [(aux, guidance_passes(g, scfg["guidance_control"], recipe.uses_control))
                 for g in scfg["guidance_sweep"]]
        if scfg["guidance_sweep_joint"] and recipe.uses_control:
            sets += [(aux, guidance_passes(g, g, True)) for g in scfg["guidance_sweep"]]
        if recipe.uses_control:
            sets += [(aux, passes)] * (len(scfg["size_conditions"]) * seeds)
        job("sample", run.run_id, sum(n * (p * scfg["steps"] * fwd + vae[run.resolution][1]) for n, p in sets))
        scored = (seeds if evaluation["inception_seeds"] is None else min(seeds, evaluation["inception_seeds"]))
        scored *= samples
        if evaluation["inception_snapshots"] == "all":
            scored += (len(snapshots) - 1) * aux
        val = evaluation["val_loss"]
        val_flops = (val["timesteps"] * val["max_images"] * fwd * len(snapshots)
                     if "val_loss" in evaluation["metrics"] else 0.0)
        job("evaluate", run.run_id, len(inception) * scored * INCEPTION_FLOPS + val_flops)
    return jobs


def summarise(jobs: list[Job], peak: float, mfu: float, attempts: int = 1) -> dict:
    """Per rule: jobs, FLOPs, accelerator hours; the total; the jobs that cannot finish within their runtime (a
    resumable one: within `attempts` allocations), and the resumable ones that need more than one allocation."""
    rules: dict[str, dict] = {}
    for j in jobs:
        r = rules.setdefault(j.rule, {"jobs": 0, "flops": 0.0, "hours": 0.0})
        r["jobs"] += 1
        r["flops"] += j.flops
        r["hours"] += j.hours(peak, mfu)
    total = {"jobs": len(jobs), "flops": sum(j.flops for j in jobs), "hours": sum(j.hours(peak, mfu) for j in jobs)}
    too_long = [j for j in jobs if j.gpus and not j.fits(peak, mfu, attempts)]
    resumed = [j for j in jobs if j.gpus and j.fits(peak, mfu, attempts) and j.allocations(peak, mfu) > 1]
    return {"rules": rules, "total": total, "too_long": too_long, "resumed": resumed,
            "costliest": sorted(jobs, key=lambda j: j.flops, reverse=True)[:3]}
