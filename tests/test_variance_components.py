"""ldm.variance_components against one-way ANOVA (scipy.stats.f_oneway) and a simulated closed form."""
import math

import numpy as np
import pytest
from scipy import stats

from ldm.variance_components import components, remedy


def group(values_per_seed, metric="fd_evaluator"):
    return [{"run_id": f"r.s{s}", "run_group": "r", "train_seed": s,
             "metrics": {metric: {"mean": float(np.mean(v)), "per_seed": list(map(float, v))}}}
            for s, v in enumerate(values_per_seed)]


def test_components_are_the_anova_mean_squares():
    values = [[10.0, 12.0, 11.0], [15.0, 14.0, 17.0], [9.0, 8.0, 12.0], [13.0, 13.5, 12.0]]
    c = components({"r": group(values)}, "fd_evaluator")
    k = 3
    ms_within = np.mean([np.var(v, ddof=1) for v in values])
    f = stats.f_oneway(*values).statistic  # = MS_between / MS_within, MS_between = k * var(seed means)
    assert c["sampling_sd"] == pytest.approx(math.sqrt(ms_within))
    assert c["training_sd"] ** 2 == pytest.approx((f * ms_within - ms_within) / k)
    assert c["ratio"] == pytest.approx(math.sqrt(c["training_sd"] ** 2 + ms_within) / math.sqrt(ms_within))


def test_a_simulated_study_recovers_its_training_and_sampling_noise():
    rng = np.random.default_rng(0)
    groups = {}
    for g in range(200):  # training sd 3, sampling sd 1, 4 seeds x 2 sampling seeds
        seeds = rng.normal(0, 3.0, size=4)
        groups[f"g{g}"] = group([[s + rng.normal(0, 1.0) for _ in range(2)] for s in seeds])
    c = components(groups, "fd_evaluator")
    assert c["training_sd"] == pytest.approx(3.0, rel=0.1) and c["sampling_sd"] == pytest.approx(1.0, rel=0.1)
    assert remedy(c).startswith("more training seeds")
    # seed means that vary less than their sampling noise explains: no training noise, more images help
    flat = {f"g{g}": group([[rng.normal(0, 5.0) for _ in range(2)] for _ in range(4)]) for g in range(200)}
    c = components(flat, "fd_evaluator")
    assert c["training_sd"] < 1.0 and remedy(c).startswith("more images")
    # val_loss: one value per seed (fixed evaluation noise), so all of its spread is training noise
    fixed = components({"r": group([[0.2], [0.21], [0.19]], "val_loss")}, "val_loss")
    assert fixed["sampling_sd"] == 0 and fixed["training_sd"] == pytest.approx(0.01) and fixed["ratio"] is None
    assert components({"r": group([[1.0, 2.0]])}, "fd_evaluator") is None  # one training seed: nothing to split
