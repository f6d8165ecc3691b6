"""ldm.verdicts: intervals against scipy's own, each verdict kind, precedence, seeds needed, combination."""
import math

import numpy as np
import pytest
from scipy import stats

from ldm import verdicts as V
from ldm.claim_items import common_accuracy_level, tradeoff_summary

BASE = [100.0, 104.0, 98.0]
VAR = [103.0, 108.5, 100.0]  # per-seed differences 3.0, 4.5, 2.0


def test_paired_interval_is_scipys_ttest_rel_interval():
    delta, se, df, lo, hi = V.paired_interval(BASE, VAR)
    ci = stats.ttest_rel(VAR, BASE).confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-12)
    d = np.subtract(VAR, BASE)
    assert delta == pytest.approx(d.mean()) and df == 2
    assert se == pytest.approx(d.std(ddof=1) / math.sqrt(3))
    assert hi - delta == pytest.approx(stats.t.ppf(0.975, 2) * se)  # closed form: t_{0.975, n-1} sd / sqrt(n)


def test_welch_interval_is_scipys_ttest_ind_unequal_var_interval():
    b, v = [1.0, 2.0, 4.0, 3.5], [3.0, 7.0, 4.0]
    delta, se, df, lo, hi = V.welch_interval(b, v)
    ci = stats.ttest_ind(v, b, equal_var=False).confidence_interval(0.95)
    assert (lo, hi) == pytest.approx((ci.low, ci.high), rel=1e-12)
    vb, vv = np.var(b, ddof=1) / 4, np.var(v, ddof=1) / 3
    assert df == pytest.approx((vb + vv) ** 2 / (vb**2 / 3 + vv**2 / 2))


def test_difference_interval_picks_paired_welch_sampling_or_none():
    paired = V.difference_interval(V.Side(dict(enumerate(BASE))), V.Side(dict(enumerate(VAR))))
    assert paired.method == "paired t" and paired.basis == "paired t over 3 training seeds"
    assert (paired.lo, paired.hi) == pytest.approx(V.paired_interval(BASE, VAR)[3:])
    # other seeds on one side: no pairing, Welch over all seeds
    welch = V.difference_interval(V.Side(dict(enumerate(BASE))), V.Side({3: 103.0, 4: 108.5, 5: 100.0}))
    assert welch.method == "Welch t" and (welch.lo, welch.hi) == pytest.approx(V.welch_interval(BASE, VAR)[3:])
    assert welch.hi - welch.lo > paired.hi - paired.lo  # pairing removes the shared seed-to-seed part
    # one training seed: delta ± 2 SE over sampling seeds, as REPORT.md did before training seeds
    single = V.difference_interval(V.Side({0: 100.0}, 3.0, 3), V.Side({0: 104.0}, 4.0, 4))
    se = math.sqrt(9 / 3 + 16 / 4)
    assert single.method == "sampling ±2 SE" and single.basis == V.SAMPLING_ONLY and not single.training
    assert (single.lo, single.hi) == pytest.approx((4 - 2 * se, 4 + 2 * se))
    # one training seed with one sampling seed (a guidance sweep): no noise estimate, no interval
    none = V.difference_interval(V.Side({0: 1.0}, None, 1), V.Side({0: 2.0}, None, 1))
    assert none.lo is None and none.method == "none"
    with pytest.raises(ValueError):
        V.difference_interval(V.Side({}), V.Side({0: 1.0}))


def _iv(lo, hi, method="paired t", n=3):
    return V.Interval((lo + hi) / 2, lo, hi, (hi - lo) / 4, n - 1.0, method, n, n, sd_diff=1.0)


def test_each_verdict_kind_and_direction():
    # fd_evaluator (lower is better, sign -1): the claim says the baseline is better, i.e. delta = var - base > 0
    assert V.judge(_iv(1.0, 3.0), -1, 0.5).verdict == "supported"
    assert V.judge(_iv(-3.0, -1.0), -1, 0.5).verdict == "contradicted"
    assert V.judge(_iv(-3.0, -1.0), +1, 0.5).verdict == "supported"  # higher is better: variant lower
    inconclusive = V.judge(_iv(-1.0, 3.0), -1, 0.5)
    assert inconclusive.verdict == "inconclusive" and "training seeds per run" in inconclusive.needed
    equivalent = V.judge(_iv(-0.4, 0.3), -1, 0.5)
    assert equivalent.verdict == "equivalent" and "inside ±0.5" in equivalent.reason
    assert V.judge(None, -1, 0.5).verdict == "not tested"


def test_equivalence_takes_precedence_over_a_tiny_significant_difference():
    both = V.judge(_iv(0.1, 0.4), -1, 0.5)  # excludes 0 and lies inside ±0.5
    assert both.verdict == "equivalent" and "excludes 0" in both.reason
    assert V.judge(_iv(0.1, 0.6), -1, 0.5).verdict == "supported"  # sticks out of the margin
    assert V.judge(_iv(-0.4, 0.3), -1, 0.0).verdict == "inconclusive"  # margin 0: never equivalent


def test_sampling_only_basis_is_labelled_and_never_equivalent():
    inside = V.judge(_iv(-0.4, 0.3, method="sampling ±2 SE", n=1), -1, 0.5)
    assert inside.verdict == "inconclusive" and "equivalence needs ≥ 2 training seeds" in inside.reason
    sup = V.judge(_iv(1.0, 3.0, method="sampling ±2 SE", n=1), -1, 0.5)
    assert sup.verdict == "supported" and sup.label == f"supported ({V.SAMPLING_ONLY})"
    assert V.judge(_iv(1.0, 3.0), -1, 0.5).label == "supported"  # training seeds: no label needed
    no_noise = V.judge(V.difference_interval(V.Side({0: 1.0}, None, 1), V.Side({0: 9.0}, None, 1)), -1, 0.5)
    assert no_noise.verdict == "inconclusive" and "no noise estimate" in no_noise.reason


def _brute_paired(sd, delta):
    return next((n for n in range(2, 51) if stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) < abs(delta)), None)


@pytest.mark.parametrize("sd, delta", [(1.0, 1.0), (2.0, 1.0), (1.0, 3.0), (5.0, 0.5), (1.0, 0.0)])
def test_seeds_needed_paired_is_the_smallest_n_that_excludes_zero(sd, delta):
    n = V.seeds_needed_paired(sd, delta)
    assert n == _brute_paired(sd, delta)
    if n is not None:
        assert stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) < abs(delta)
        assert n == 2 or stats.t.ppf(0.975, n - 2) * sd / math.sqrt(n - 1) >= abs(delta)
    assert V.seeds_needed_paired(1.0, 1.0) == 7  # t(5)/sqrt(6) = 1.05, t(6)/sqrt(7) = 0.925


def test_seeds_needed_text_for_inconclusive_comparisons():
    b, v = V.Side({0: 10.0, 1: 11.0, 2: 12.0}), V.Side({0: 10.5, 1: 10.5, 2: 13.5})  # d = .5, -.5, 1.5
    i = V.difference_interval(b, v)
    result = V.judge(i, -1, 0.01)
    n = V.seeds_needed_paired(float(np.std([0.5, -0.5, 1.5], ddof=1)), 0.5)
    assert result.verdict == "inconclusive" and result.needed == f"about {n} training seeds per run to exclude 0 at the observed variance"
    # no difference at all: equivalence is reachable, exclusion is not
    flat = V.difference_interval(V.Side({0: 10.0, 1: 11.0, 2: 12.0}), V.Side({0: 10.5, 1: 10.5, 2: 12.0}))
    assert "to show equivalence" in V.seeds_needed(flat, 1.0)
    assert V.seeds_needed(flat, 0.0) == "more than 50 training seeds per run"
    # sampling-only basis: a lower bound
    single = V.difference_interval(V.Side({0: 100.0}, 3.0, 3), V.Side({0: 101.0}, 3.0, 3))
    assert V.seeds_needed(single, 2.0).startswith("at least ") and "lower bound" in V.seeds_needed(single, 2.0)


def test_margins_relative_absolute_and_default():
    assert V.resolve_margin(None, 0.02, -150.0)[0] == pytest.approx(3.0)
    assert V.resolve_margin({"relative": 0.1}, 0.02, 150.0)[0] == pytest.approx(15.0)
    value, text = V.resolve_margin({"absolute": 0.01}, 0.02, 150.0)
    assert value == 0.01 and "absolute" in text


@pytest.mark.parametrize("items, mode, expected", [
    (["supported", "supported"], "all", "supported"),
    (["supported", "inconclusive"], "all", "partly supported"),
    (["supported", "equivalent"], "all", "partly supported"),
    (["supported", "equivalent"], "any", "supported"),
    (["supported", "contradicted"], "all", "inconclusive (items disagree)"),
    (["supported", "contradicted"], "any", "inconclusive (items disagree)"),
    (["contradicted", "inconclusive"], "all", "contradicted"),
    (["contradicted", "inconclusive"], "any", "inconclusive"),
    (["contradicted", "equivalent"], "any", "contradicted"),
    (["equivalent", "equivalent"], "all", "equivalent"),
    (["equivalent", "not tested"], "all", "equivalent"),
    (["inconclusive", "equivalent"], "all", "inconclusive"),
    (["not tested", "not tested"], "all", "not tested"),
])
def test_combination_rules(items, mode, expected):
    assert V.combine(items, mode)[0] == expected


def test_censored_costs_decide_only_when_the_bounds_separate():
    # one seed per side: the bounds alone. Baseline cost in (10, 20], variant in (30, 40]: advantage in [10, 30]
    one = V.censored_cost_verdict({0: (10.0, 20.0)}, {0: (30.0, 40.0)})
    assert one.verdict == "supported" and one.extra["bounds"] == (10.0, 30.0) and "1 training seed" in one.extra["basis"]
    assert V.censored_cost_verdict({0: (30.0, 40.0)}, {0: (10.0, 20.0)}).verdict == "contradicted"
    overlap = V.censored_cost_verdict({0: (10.0, 35.0)}, {0: (30.0, 40.0)})  # advantage in [-5, 30]
    assert overlap.verdict == "inconclusive" and "snapshots" in overlap.needed
    # never reached: upper bound infinite, so the variant can still be shown dearer, never the baseline
    assert V.censored_cost_verdict({0: (10.0, 20.0)}, {0: (25.0, math.inf)}).verdict == "supported"
    unreached = V.censored_cost_verdict({0: (25.0, math.inf)}, {0: (10.0, 20.0)})  # already dearer when it stopped
    assert unreached.verdict == "contradicted" and unreached.extra["bounds"] == (-math.inf, -5.0)
    # several seeds: each end is scipy's paired t interval of the worst-case differences
    base, var = {0: (10.0, 20.0), 1: (12.0, 22.0), 2: (10.0, 21.0)}, {0: (40.0, 50.0), 1: (45.0, 55.0), 2: (41.0, 49.0)}
    result = V.censored_cost_verdict(base, var)
    low = stats.ttest_rel([40.0, 45.0, 41.0], [20.0, 22.0, 21.0]).confidence_interval(0.95).low
    high = stats.ttest_rel([50.0, 55.0, 49.0], [10.0, 12.0, 10.0]).confidence_interval(0.95).high
    assert result.verdict == "supported" and result.extra["bounds"] == pytest.approx((low, high))
    assert V.censored_cost_verdict({s: (c, c) for s, c in enumerate([10.0, 10.0])},
                                   {s: (c, c) for s, c in enumerate([10.0, 10.0])}).verdict == "inconclusive"


def test_tradeoff_summary_interpolates_along_the_sweep():
    fd, acc = [100.0, 80.0, 90.0, 120.0], [0.2, 0.5, 0.7, 0.9]
    # at acc >= 0.6: points 90 (0.7), 120 (0.9) and the crossing between (80, 0.5) and (90, 0.7): 85
    assert tradeoff_summary(fd, acc, 0.6) == pytest.approx(85.0)
    assert tradeoff_summary(fd, acc, 0.5) == pytest.approx(80.0)
    assert tradeoff_summary(fd, acc, 0.95) is None
    assert tradeoff_summary([0.1, 0.3], [0.5, 0.9], 0.7, better_sign=+1) == pytest.approx(0.3)
    assert common_accuracy_level([(fd, acc), ([1.0, 2.0], [0.3, 0.6])]) == 0.6
