"""Where a study's noise comes from: each metric's variance split into sampling noise (a new draw of
samples from the same weights) and training noise (retraining with a new seed), from the records' nested
values (training seeds, each with its sampling seeds' values in `metrics[m].per_seed`).

Why: an inconclusive verdict needs one of two remedies, and they cost differently. If sampling noise
dominates, more images per sampling seed (or more sampling seeds) narrow the interval for the price of
sampling; if training noise dominates, only more training seeds do. "The FID Lottery" (arXiv 2606.20536)
measured retraining moving FID 3.2x more than resampling on SiT; this section measures the same ratio here.

Estimator (one-way random effects, method of moments, pooled over run groups with the same number of
sampling seeds k >= 2 and training seeds n >= 2, one evaluator per group): within = mean over groups of the
within-seed variance
(ddof 1) of one sampling seed's value; between = mean over groups of the variance (ddof 1) of the seed
means; training variance = max(0, between - within / k) (a negative estimate means the seed means vary
no more than their sampling noise explains, i.e. no detectable training noise).
"""
from __future__ import annotations

import math

import numpy as np

from .seed_groups import as_group, instrument_mismatch, markdown_table


def components(records_by_group: dict, metric: str) -> dict | None:
    """{sampling_sd, training_sd, k, groups, ratio} for one metric (None: too few nested values)."""
    within, between, ks = [], [], []
    for group in records_by_group.values():
        group = as_group(group) or []
        values = [r["metrics"][metric]["per_seed"] for r in group if metric in r.get("metrics", {})]
        if len(values) < 2 or len({len(v) for v in values}) != 1 or instrument_mismatch([group], metric):
            continue
        k = len(values[0])
        means = [float(np.mean(v)) for v in values]
        between.append(float(np.var(means, ddof=1)))
        within.append(float(np.mean([np.var(v, ddof=1) for v in values])) if k > 1 else 0.0)
        ks.append(k)
    if not between:
        return None
    k = min(ks)
    w, b = float(np.mean(within)), float(np.mean(between))
    training = max(0.0, b - w / k)
    sampling_sd, training_sd = math.sqrt(w), math.sqrt(training)
    # a retrained model scored on one sample set, against the same model resampled (The FID Lottery's ratio)
    ratio = math.sqrt(training + w) / sampling_sd if w > 0 else None
    return {"sampling_sd": sampling_sd, "training_sd": training_sd, "between_sd": math.sqrt(b), "k": k,
            "groups": len(between), "ratio": ratio, "raw_training_var": b - w / k}


def remedy(c: dict) -> str:
    """What narrows this metric's intervals most cheaply."""
    if c["sampling_sd"] == 0:
        return "more training seeds (no sampling noise: fixed evaluation noise)"
    if c["training_sd"] ** 2 < c["sampling_sd"] ** 2 / c["k"]:
        return "more images per sampling seed or more sampling seeds (sampling noise dominates the seed means)"
    return "more training seeds (training noise dominates the seed means)"


def variance_section(records_by_group: dict, metrics: list[str]) -> str:
    rows = []
    for metric in metrics:
        c = components(records_by_group, metric)
        if c is None:
            continue
        ratio = f"{c['ratio']:.2f}x" if c["ratio"] is not None else "n/a"
        rows.append([metric, f"{c['sampling_sd']:.4g}", f"{c['sampling_sd'] / math.sqrt(c['k']):.4g}",
                     f"{c['between_sd']:.4g}", f"{c['training_sd']:.4g}", ratio, str(c["groups"]), remedy(c)])
    if not rows:
        return "(needs runs with at least 2 training seeds)"
    header = ["metric", "sampling sd (one sampling seed)", "sampling sd of a seed mean", "sd of seed means",
              "training sd (estimate)", "retrain / resample", "run groups", "narrows intervals"]
    note = ("Each metric's noise split into sampling and training parts (method of moments over every run group "
            "with ≥ 2 training seeds; `ldm/variance_components.py`). *retrain / resample*: the spread of a "
            "retrained model scored once over that of the same model resampled (The FID Lottery, arXiv "
            "2606.20536, measured 3.2x for FID on SiT). A training sd of 0 means the seed means vary no more "
            "than their sampling noise explains.\n\n")
    return note + markdown_table(header, rows)
