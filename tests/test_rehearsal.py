"""config/rehearsal.yaml is config/paper.yaml's study, differing only in sizes, steps, paths and offline stand-ins."""
from __future__ import annotations

import fnmatch
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

# key paths whose values may differ (sizes, steps, sample counts, paths, resources of a laptop, and the offline
# stand-ins for pretrained weights); '*' matches one key
MAY_DIFFER = [
    "name", "description", "scenarios.*.workdir", "scenarios.*.results", "scenarios.*.threads",
    "scenarios.*.dataset.source", "scenarios.*.dataset.heldout", "scenarios.*.resolutions.*",
    "scenarios.*.autoencoder", "scenarios.*.text_encoder", "scenarios.*.evaluator.*",
    "scenarios.*.recipes.*.size", "scenarios.*.stages.*.steps", "scenarios.*.stages.*.init_checkpoint",
    "scenarios.*.stages.*.resources.*", "scenarios.*.resources.*.*",
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
