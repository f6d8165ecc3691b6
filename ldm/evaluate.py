"""`ldm evaluate`: metrics of every snapshot of a run, mean ± std over sampling seeds, with provenance.

Metrics are named by protocol (`fd_evaluator`, `cond_accuracy`, `fid_clean`, `fid_legacy_tf`) so numbers
computed differently never share a column. The final numbers are those of the last snapshot; the curve
holds every snapshot for metric-vs-step plots. A sample grid of the last snapshot goes to the plots.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from .config import config_fingerprint, digest, eval_section, get_run
from .generate import load_samples, read_index
from .metrics.evaluator import load_evaluator
from .metrics.fid import cond_accuracy, fd_evaluator, inception_fid, load_stats
from .prepare import load_prepared
from .provenance import atomic_write_json, code_version, file_sha256
from .train import run_dir


def reference_path(config: dict, resolution: int) -> Path:
    return Path(config["workdir"]) / "reference" / config["dataset"]["name"] / f"r{resolution}.npz"


def prepared_path(config: dict, resolution: int) -> Path:
    return Path(config["workdir"]) / "prepared" / config["dataset"]["name"] / f"r{resolution}"


def _metrics_of(images: np.ndarray, labels: np.ndarray, wanted: list[str], evaluator, ref_stats,
                config: dict, resolution: int) -> dict[str, float]:
    values = {}
    if "fd_evaluator" in wanted:
        values["fd_evaluator"] = float(fd_evaluator(images, ref_stats, evaluator))
    if "cond_accuracy" in wanted:
        values["cond_accuracy"] = float(cond_accuracy(evaluator.predict(images), {"class": labels})["class"])
    for name, mode in (("fid_clean", "clean"), ("fid_legacy_tf", "legacy_tensorflow")):
        if name in wanted:
            real, _ = load_prepared(prepared_path(config, resolution))
            values[name] = float(inception_fid(images, real, mode=mode))
    return values


def evaluate_run(config: dict, run_id: str, log=print) -> Path:
    run = get_run(config, run_id)
    wanted = config["evaluation"]["metrics"]
    samples_dir = run_dir(config, run_id) / "samples"
    index = read_index(samples_dir)
    evaluator = load_evaluator(Path(config["workdir"]) / "evaluator")
    ref_file = reference_path(config, run.resolution)
    mu, sigma, ref_meta = load_stats(ref_file)
    curve, final = [], None
    for entry in index["snapshots"]:
        data = load_samples(samples_dir, entry)
        per_seed: dict[str, list[float]] = {}
        for seed in entry["seeds"]:
            pick = data["seeds"] == seed
            values = _metrics_of(data["images"][pick], data["labels"][pick], wanted, evaluator, (mu, sigma),
                                 config, run.resolution)
            for name, value in values.items():
                per_seed.setdefault(name, []).append(value)
        summary = {name: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                          "per_seed": v} for name, v in per_seed.items()}
        curve.append({"step": entry["step"], "num_seeds": len(entry["seeds"]), **{n: s["mean"] for n, s in summary.items()},
                      **{f"{n}_std": s["std"] for n, s in summary.items()}})
        final = (entry, data, summary)
        log(f"{run_id} step {entry['step']}: " + ", ".join(f"{n}={s['mean']:.4f}±{s['std']:.4f}" for n, s in summary.items()))
    entry, data, summary = final
    grid_path = Path(config["results"]) / "plots" / f"samples_{run_id}.png"
    save_sample_grid(data, index["classes"], grid_path)
    record = {
        "run_id": run_id,
        "recipe": run.recipe, "stage": run.stage, "resolution": run.resolution, "init_run": run.init_run,
        "config_hash": digest(eval_section(config, run_id)),
        "scenario": config["name"], "config_fingerprint": config_fingerprint(config),
        "code_version": code_version(),
        "protocol": {
            "fd_evaluator": "Frechet distance (clean-fid frechet_distance) on offline-evaluator features, "
                            f"samples vs. all real prepared images at {run.resolution}px",
            "cond_accuracy": "share of samples whose evaluator-predicted class equals the conditioning class",
        },
        "sampler": index["sampler"], "steps": index["steps"], "guidance": index["guidance"],
        "num_samples": index["num_samples"], "seeds": index["seeds"], "original_size": index["original_size"],
        "reference": {"file": str(ref_file), "sha256": file_sha256(ref_file), **ref_meta},
        "evaluator_heldout_accuracy": evaluator.config.get("heldout_accuracy"),
        "chance_accuracy": 1.0 / len(index["classes"]),
        "step": entry["step"],
        "metrics": summary,
        "curve": curve,
        "sample_grid": str(grid_path),
    }
    out = Path(config["results"]) / "metrics" / f"{run_id}.json"
    atomic_write_json(out, record)
    return out


def save_sample_grid(data: dict, classes: list[str], path: Path, per_class: int = 8, min_side: int = 64) -> None:
    """One row per class (first sampling seed), upscaled with nearest-neighbour to at least `min_side` px."""
    first = data["seeds"] == data["seeds"][0]
    images, labels = data["images"][first], data["labels"][first]
    rows = []
    for k in range(len(classes)):
        chosen = images[labels == k][:per_class]
        rows.extend(torch.from_numpy(chosen).permute(0, 3, 1, 2))
    grid = make_grid(torch.stack(rows), nrow=per_class, padding=2, pad_value=255)
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    scale = max(1, -(-min_side // images.shape[1]))
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    picture.save(tmp)
    tmp.replace(path)
