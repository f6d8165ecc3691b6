"""config/rehearsal.yaml is config/paper.yaml's study, differing only in sizes, steps, paths and offline stand-ins."""
from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

# key paths whose values may differ (sizes, steps, sample counts, paths, resources of a laptop, and the offline
# stand-ins for pretrained weights); '*' matches one key
MAY_DIFFER = [
    "name", "description", "scenarios.*.workdir", "scenarios.*.results", "scenarios.*.threads",
    "scenarios.*.dataset.source", "scenarios.*.dataset.heldout", "scenarios.*.resolutions.*",
    "scenarios.*.autoencoder", "scenarios.*.text_encoder", "scenarios.*.evaluator.*",
    "scenarios.*.recipes.*.size", "scenarios.*.stages.*.steps", "scenarios.*.stages.*.init_checkpoint",
    "scenarios.*.stages.*.resources.*", "scenarios.*.recipes.*.resources.*", "scenarios.*.resources.*.*",
    "scenarios.*.training.batch_size", "scenarios.*.training.warmup", "scenarios.*.training.snapshots",
    "scenarios.*.training.checkpoint_every",
    "scenarios.*.sampling.steps", "scenarios.*.sampling.num_samples", "scenarios.*.sampling.aux_samples",
    "scenarios.*.sampling.original_size", "scenarios.*.sampling.batch_size", "scenarios.*.sampling.size_conditions",
]
# keys only the rehearsal has: the baselines' own batch and sampling steps scaled down (their published ones are
# paper-sized)
ONLY_IN_REHEARSAL = ["scenarios.*.recipes.*.training", "scenarios.*.recipes.*.sampling"]


def _leaves(node, prefix=""):
    """{dotted key path: value} of every leaf (a dict is walked; lists and scalars are leaves)."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def _matches(path: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(path, p + ".*") for p in patterns)


def test_rehearsal_is_the_paper_study_at_toy_scale():
    paper, rehearsal = (_leaves(yaml.safe_load((REPO / "config" / f"{n}.yaml").read_text()))
                        for n in ("paper", "rehearsal"))
    missing = sorted(k for k in paper if k not in rehearsal and not _matches(k, MAY_DIFFER))
    extra = sorted(k for k in rehearsal if k not in paper and not _matches(k, MAY_DIFFER + ONLY_IN_REHEARSAL))
    changed = sorted(k for k in paper if k in rehearsal and paper[k] != rehearsal[k] and not _matches(k, MAY_DIFFER))
    assert not missing, f"paper.yaml keys the rehearsal lacks: {missing}"
    assert not extra, f"rehearsal keys paper.yaml lacks: {extra}"
    assert not changed, "values that differ beyond sizes/steps/paths: " + "; ".join(
        f"{k}: {paper[k]!r} -> {rehearsal[k]!r}" for k in changed)


@pytest.mark.pipeline
def test_a_slice_of_the_rehearsal_runs_end_to_end_on_both_layouts(tmp_path):
    """CI's smaller rehearsal (the whole one takes about 12 minutes on 2 cores): config/rehearsal.yaml itself, on
    smaller generated datasets, through Snakemake to two runs' metrics: ImageNet's improved model transferred to
    2x the resolution (an ILSVRC class tree: class metrics, both Inception FIDs), and the CC12M fine-tune of that
    ImageNet pre-training (img2dataset tars without classes: prompted by held-out captions, caption metrics, FID
    on the caption data's own images). Together they run every rule but the report."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    data = tmp_path / "data" / "rehearsal"
    for layout, extra in (("imagenet", ["--classes", "4", "--num-images", "48", "--val-per-class", "1"]),
                          ("cc12m", ["--num-images", "48", "--world", "rich"])):
        subprocess.run([sys.executable, "-m", "ldm.cli", "synthesize", "--layout", layout, "--out", str(data / layout),
                        *extra], check=True, capture_output=True, env=env)
    targets = ["work/rehearsal/imagenet1k/results/metrics/improved.imagenet1k.transfer.32.json",
               "work/rehearsal/cc12m/results/metrics/improved.cc12m.from_imagenet.16.json"]
    out = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                          "--directory", str(tmp_path), "--configfile", str(REPO / "config" / "rehearsal.yaml"),
                          "--cores", "2", *targets], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    ran = set(re.findall(r"^(?:local)?rule (\w+):", out.stderr, re.M))  # a study's rules carry its scenario's name
    assert ran >= {f"{scenario}_{rule}" for scenario in ("imagenet1k", "cc12m")
                   for rule in ("prepare", "check_data", "train_vae", "encode", "train_evaluator", "reference_stats",
                                "train", "sample", "evaluate")}, ran

    imagenet, cc12m = (json.loads((tmp_path / t).read_text()) for t in targets)
    assert {"fid_clean", "fid_legacy_tf", "fd_evaluator", "cond_accuracy", "size_consistency", "precision", "recall",
            "val_loss"} <= set(imagenet["metrics"])
    assert (imagenet["resolution"], imagenet["init_run"]) == (32, "improved.imagenet1k.pretrain.16")
    assert {"fid_clean", "caption_score", "caption_accuracy", "fd_evaluator", "val_loss"} <= set(cc12m["metrics"])
    assert "cond_accuracy" not in cc12m["metrics"] and "not available offline" in cc12m["skipped"]["clip_score"]
    assert cc12m["prompts"]["source"] == "held-out captions" and len(cc12m["sample_grid_prompts"]) > 0
    assert cc12m["stage"] == "from_imagenet"  # initialised from the ImageNet scenario's pre-training (its input)
