"""Verdicts on the paper's claims from repeated training runs: pure statistics (numpy and scipy only).

Terms. A *training seed* is one training run of a grid run (`train_seeds`: its own initial weights, data
order and training noise; ids `<run>.s<seed>`). A *sampling seed* is one draw of sampling noise from one
trained model. A run's *value* for a metric at one training seed is the mean over its sampling seeds (so
sampling noise is nested inside every per-seed value). Every difference is `delta = variant - baseline`;
a claim item says the *baseline* is better, in the metric's direction (`better_sign`: +1 higher is better,
-1 lower is better), so its *advantage* is `-better_sign * delta` (> 0 reads in the claimed direction).

Interval (`difference_interval`), two-sided, level `LEVEL` (95%):
- *paired t*: both sides have the same set of training seeds, at least 2: the t interval of the per-seed
  differences, df = n - 1. Seed s of two runs shares its random numbers (common random numbers per seed),
  so pairing removes the part of the seed-to-seed variation the two runs share.
- *Welch t*: otherwise, when each side has at least 2 training seeds: Welch-Satterthwaite df.
- *sampling noise only*: a side with 1 training seed: delta ± 2 standard errors, the standard errors of
  the two means over their sampling seeds combined in quadrature (REPORT.md's rule before training seeds).
  Its basis is always printed ("1 training seed: sampling noise only"); it cannot give "equivalent".
- *none*: a side with 1 training seed and fewer than 2 sampling seeds (a guidance sweep, val_loss): no
  noise estimate at all, so no interval and the verdict is "inconclusive".
No bootstrap: with 2-5 training seeds a resampling interval has only n^n distinct resamples and is
narrower than the t interval (it ignores the uncertainty of the standard deviation), i.e. it over-claims
exactly where these studies live. The t intervals assume roughly normal per-seed values (means over
sampling seeds, which helps).

Verdict (`judge`), with a margin fixed in the config before the runs (`margin`):
1. no interval: "inconclusive" (or "not tested" where a side has no data).
2. *equivalent*: training-seed basis only, and the whole interval lies strictly inside (-margin, +margin).
   Precedence: this is checked first, so an interval inside the margin that also excludes 0 is
   "equivalent" (a real but smaller-than-the-margin difference); the reason line says that it excludes 0.
   The margin is the smallest difference the study decided to care about, so a difference below it is
   not evidence for "better". On the sampling-only basis this step is skipped (sampling noise understates
   run-to-run variance several-fold) and an interval inside the margin reads "inconclusive".
3. *supported*: the advantage interval lies above 0; *contradicted*: below 0.
4. otherwise *inconclusive*, with the number of training seeds per run that would resolve it at the
   observed variance and delta (`seeds_needed`), "more than 50" where that is absurd.

Compute items (`censored_cost_verdict`): a cost known only between two snapshots. Parts of a claim combine
into one verdict (`combine`, called by `ldm.claims`), see its docstring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

LEVEL = 0.95
#: the sampling-only fallback: delta ± 2 SE, as REPORT.md's verdicts were before training seeds
SAMPLING_Z = 2.0
MAX_SEEDS = 50
DEFAULT_MARGIN = 0.02  # relative to the baseline's mean (study.equivalence_margin)

SAMPLING_ONLY = "1 training seed: sampling noise only"
NO_NOISE = "1 training seed and 1 sampling seed: no noise estimate"
VERDICTS = ("supported", "contradicted", "equivalent", "inconclusive", "not tested")


@dataclass(frozen=True)
class Side:
    """One run group's per-training-seed values of one quantity. For a group of one training seed,
    `sampling_std` / `sampling_n` describe that seed's sampling seeds (std ddof=1, count)."""

    values: dict  # training seed -> value (mean over sampling seeds)
    sampling_std: float | None = None
    sampling_n: int = 0

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def seeds(self) -> tuple:
        return tuple(sorted(self.values))

    @property
    def array(self) -> np.ndarray:
        return np.array([self.values[s] for s in self.seeds], dtype=float)

    @property
    def mean(self) -> float:
        return float(self.array.mean())

    @property
    def sd(self) -> float:
        """Std over training seeds (ddof=1); 0 with one seed."""
        return float(self.array.std(ddof=1)) if self.n > 1 else 0.0

    @property
    def sampling_se(self) -> float | None:
        """Standard error of the single seed's mean over its sampling seeds (None: no estimate)."""
        if self.n != 1 or self.sampling_std is None or self.sampling_n < 2:
            return None
        return self.sampling_std / math.sqrt(self.sampling_n)


@dataclass(frozen=True)
class Interval:
    """`delta` = variant - baseline (paired: mean of per-seed differences) and its two-sided interval."""

    delta: float
    lo: float | None
    hi: float | None
    se: float | None
    df: float | None
    method: str  # "paired t" | "Welch t" | "sampling ±2 SE" | "none"
    n_baseline: int
    n_variant: int
    level: float = LEVEL
    sd_baseline: float = 0.0  # per-seed std used by the seeds-needed estimate
    sd_variant: float = 0.0
    sd_diff: float | None = None  # paired: std of the per-seed differences

    @property
    def training(self) -> bool:
        """True when the interval rests on training seeds (paired or Welch)."""
        return self.method in ("paired t", "Welch t")

    @property
    def basis(self) -> str:
        if self.method == "paired t":
            return f"paired t over {self.n_baseline} training seeds"
        if self.method == "Welch t":
            return f"Welch t over {self.n_baseline} + {self.n_variant} training seeds"
        if self.method == "sampling ±2 SE":
            return SAMPLING_ONLY
        return NO_NOISE


def t_quantile(level: float, df: float) -> float:
    return float(stats.t.ppf(0.5 + level / 2, df))


def paired_interval(baseline, variant, level: float = LEVEL) -> tuple[float, float, float, float, float]:
    """(mean difference, se, df, lo, hi) of variant - baseline, paired by position; the interval of
    `scipy.stats.ttest_rel(variant, baseline).confidence_interval(level)`."""
    d = np.asarray(variant, float) - np.asarray(baseline, float)
    n = len(d)
    if n < 2:
        raise ValueError("a paired interval needs at least 2 pairs")
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(n))
    half = t_quantile(level, n - 1) * se
    return mean, se, float(n - 1), mean - half, mean + half


def welch_df(var_b: float, n_b: int, var_v: float, n_v: int) -> float:
    a, b = var_b / n_b, var_v / n_v
    if a + b == 0:
        return math.inf
    return (a + b) ** 2 / (a**2 / (n_b - 1) + b**2 / (n_v - 1))


def welch_interval(baseline, variant, level: float = LEVEL) -> tuple[float, float, float, float, float]:
    """(difference of means, se, Welch-Satterthwaite df, lo, hi) of variant - baseline; the interval of
    `scipy.stats.ttest_ind(variant, baseline, equal_var=False).confidence_interval(level)`."""
    b, v = np.asarray(baseline, float), np.asarray(variant, float)
    if len(b) < 2 or len(v) < 2:
        raise ValueError("a Welch interval needs at least 2 values per side")
    var_b, var_v = float(b.var(ddof=1)), float(v.var(ddof=1))
    delta = float(v.mean() - b.mean())
    se = math.sqrt(var_b / len(b) + var_v / len(v))
    df = welch_df(var_b, len(b), var_v, len(v))
    half = (t_quantile(level, df) if math.isfinite(df) else float(stats.norm.ppf(0.5 + level / 2))) * se
    return delta, se, df, delta - half, delta + half


def difference_interval(baseline: Side, variant: Side, level: float = LEVEL) -> Interval:
    """variant - baseline over training seeds: paired, Welch, sampling-only or none (module docstring)."""
    if baseline.n == 0 or variant.n == 0:
        raise ValueError("both sides need at least one value")
    common = dict(n_baseline=baseline.n, n_variant=variant.n, level=level,
                  sd_baseline=baseline.sd, sd_variant=variant.sd)
    if baseline.seeds == variant.seeds and baseline.n >= 2:
        b, v = baseline.array, variant.array
        delta, se, df, lo, hi = paired_interval(b, v, level)
        return Interval(delta, lo, hi, se, df, "paired t", sd_diff=float((v - b).std(ddof=1)), **common)
    if baseline.n >= 2 and variant.n >= 2:
        delta, se, df, lo, hi = welch_interval(baseline.array, variant.array, level)
        return Interval(delta, lo, hi, se, df, "Welch t", **common)
    delta = variant.mean - baseline.mean
    se_b = baseline.sampling_se if baseline.n == 1 else baseline.sd / math.sqrt(baseline.n)
    se_v = variant.sampling_se if variant.n == 1 else variant.sd / math.sqrt(variant.n)
    if se_b is None or se_v is None:
        return Interval(delta, None, None, None, None, "none", **common)
    se = math.sqrt(se_b**2 + se_v**2)
    # the per-seed std the seeds-needed estimate assumes: a single seed's value varies at least by the
    # standard error of its sampling mean (a lower bound: training-seed noise comes on top)
    common.update(sd_baseline=baseline.sd if baseline.n > 1 else se_b,
                  sd_variant=variant.sd if variant.n > 1 else se_v)
    return Interval(delta, delta - SAMPLING_Z * se, delta + SAMPLING_Z * se, se, None, "sampling ±2 SE", **common)


# --------------------------------------------------------------------------------------------- margins
def resolve_margin(item_margin: dict | None, default_relative: float, baseline_mean: float) -> tuple[float, str]:
    """(absolute margin, its description). `item_margin` is a claim item's `margin:` ({relative: x} or
    {absolute: y}); otherwise `default_relative` (study.equivalence_margin) times |baseline mean|."""
    if item_margin and "absolute" in item_margin:
        value = float(item_margin["absolute"])
        return value, f"±{value:.4g} (absolute, claim item)"
    if item_margin and "relative" in item_margin:
        rel, where = float(item_margin["relative"]), "claim item"
    else:
        rel, where = float(default_relative), "study.equivalence_margin"
    value = rel * abs(baseline_mean)
    return value, f"±{rel:.3g} x |baseline mean| = ±{value:.4g} ({where})"


# ------------------------------------------------------------------------------------------ seeds needed
def _first_n(halfwidth, target: float) -> int | None:
    """Smallest n in 2..MAX_SEEDS with halfwidth(n) < target (None: none)."""
    if target <= 0:
        return None
    for n in range(2, MAX_SEEDS + 1):
        if halfwidth(n) < target:
            return n
    return None


def seeds_needed_paired(sd_diff: float, delta: float, level: float = LEVEL) -> int | None:
    """Smallest training seeds per run n with t_{(1+level)/2, n-1} * sd_diff / sqrt(n) < |delta| (the
    paired interval would exclude 0 if delta and sd_diff stayed as observed); None: more than MAX_SEEDS."""
    return _first_n(lambda n: t_quantile(level, n - 1) * sd_diff / math.sqrt(n), abs(delta))


def _welch_halfwidth(sd_b: float, sd_v: float, level: float):
    def half(n: int) -> float:
        df = welch_df(sd_b**2, n, sd_v**2, n)
        q = t_quantile(level, df) if math.isfinite(df) else float(stats.norm.ppf(0.5 + level / 2))
        return q * math.sqrt((sd_b**2 + sd_v**2) / n)
    return half


def seeds_needed_welch(sd_b: float, sd_v: float, delta: float, level: float = LEVEL) -> int | None:
    """As `seeds_needed_paired` for unpaired runs of n seeds each (Welch interval, Satterthwaite df)."""
    return _first_n(_welch_halfwidth(sd_b, sd_v, level), abs(delta))


def seeds_needed_equivalence(interval: Interval, margin: float) -> int | None:
    """Smallest n with |delta| + halfwidth(n) < margin: the interval would fit inside ±margin."""
    if interval.sd_diff is not None:
        half = lambda n: t_quantile(interval.level, n - 1) * interval.sd_diff / math.sqrt(n)  # noqa: E731
    else:
        half = _welch_halfwidth(interval.sd_baseline, interval.sd_variant, interval.level)
    return _first_n(half, margin - abs(interval.delta))


def seeds_needed(interval: Interval, margin: float | None) -> str:
    """How many training seeds per run would resolve an inconclusive comparison at the observed variance
    and delta: to exclude 0, or (training-seed basis, |delta| < margin) to fit inside ±margin."""
    if interval.lo is None:
        return "unknown (no noise estimate)"
    if interval.sd_diff is not None:
        exclude = seeds_needed_paired(interval.sd_diff, interval.delta, interval.level)
    else:
        exclude = seeds_needed_welch(interval.sd_baseline, interval.sd_variant, interval.delta, interval.level)
    equivalent = seeds_needed_equivalence(interval, margin) if (interval.training and margin) else None
    options = [(n, what) for n, what in ((exclude, "to exclude 0"), (equivalent, "to show equivalence"))
               if n is not None]
    prefix = "at least " if not interval.training else "about "
    suffix = " (lower bound: sampling noise only)" if not interval.training else " at the observed variance"
    if not options:
        return "more than 50 training seeds per run" + (suffix if not interval.training else "")
    n, what = min(options)
    return f"{prefix}{n} training seeds per run {what}{suffix}"


# --------------------------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class Verdict:
    """One claim item's verdict: `verdict` is one of VERDICTS; `label` adds the basis where it is not
    training seeds; `reason` is the one-line why."""

    verdict: str
    interval: Interval | None = None
    margin: float | None = None
    reason: str = ""
    needed: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def basis(self) -> str:
        return self.interval.basis if self.interval is not None else ""

    @property
    def label(self) -> str:
        if self.interval is not None and not self.interval.training and self.verdict in ("supported", "contradicted"):
            return f"{self.verdict} ({self.interval.basis})"
        return self.verdict


def advantage_interval(interval: Interval, better_sign: int) -> tuple[float, float]:
    """The interval of the baseline's advantage (-better_sign * delta): > 0 is the claimed direction."""
    a, b = -better_sign * interval.lo, -better_sign * interval.hi
    return min(a, b), max(a, b)


def judge(interval: Interval | None, better_sign: int, margin: float | None) -> Verdict:
    """The verdict for "the baseline is better" (module docstring: precedence and fallbacks)."""
    if interval is None:
        return Verdict("not tested", reason="a side has no data")
    if interval.lo is None:
        return Verdict("inconclusive", interval, margin, f"{NO_NOISE}: no interval", seeds_needed(interval, margin))
    lo, hi = advantage_interval(interval, better_sign)
    inside = margin is not None and margin > 0 and -margin < interval.lo and interval.hi < margin
    if inside and interval.training:
        also = " and excludes 0 (a difference smaller than the margin)" if (lo > 0 or hi < 0) else ""
        return Verdict("equivalent", interval, margin,
                       f"the interval lies inside ±{margin:.4g}{also}")
    if lo > 0:
        return Verdict("supported", interval, margin, "the interval excludes 0 in the claimed direction")
    if hi < 0:
        return Verdict("contradicted", interval, margin, "the interval excludes 0 against the claimed direction")
    reason = "the interval contains 0"
    if inside:
        reason += f" and lies inside ±{margin:.4g}, but on sampling noise only: equivalence needs ≥ 2 training seeds"
    return Verdict("inconclusive", interval, margin, reason, seeds_needed(interval, margin))


def censored_cost_verdict(baseline: dict, variant: dict, level: float = LEVEL) -> Verdict:
    """A compute comparison ("the baseline reaches the level with fewer FLOPs") from interval-censored costs:
    `baseline` / `variant` map a training seed to (lower, upper): the cost at the last snapshot before the
    level and at the first snapshot at it (upper = inf where a seed never reached it, lower = its total).
    The advantage is variant - baseline cost. Its interval takes the worst case of the censoring on each
    end: lower end from the t interval (`difference_interval`) of variant lower - baseline upper, upper end
    from that of variant upper - baseline lower; one training seed per side gives the bounds alone (no
    noise estimate, said so). supported: the lower end > 0; contradicted: the upper end < 0; never
    "equivalent": a snapshot-quantised cost says nothing about a difference smaller than the spacing."""
    def end(base: int, var: int, which: str) -> float:
        b = {s: c[base] for s, c in baseline.items()}
        v = {s: c[var] for s, c in variant.items()}
        if not all(map(math.isfinite, [*b.values(), *v.values()])):
            return math.inf if which == "hi" else -math.inf
        interval = difference_interval(Side(b), Side(v), level)
        return interval.delta if interval.lo is None else getattr(interval, which)

    lo, hi = end(1, 0, "lo"), end(0, 1, "hi")
    one = len(baseline) == 1 or len(variant) == 1
    basis = "1 training seed: cost bounds only, no noise estimate" if one else (
        f"censoring-aware t over {len(baseline)} + {len(variant)} training seeds")
    extra = {"bounds": (lo, hi), "basis": basis}
    if lo > 0:
        return Verdict("supported", reason="even at the censoring's worst case the baseline needs fewer FLOPs",
                       extra=extra)
    if hi < 0:
        return Verdict("contradicted", reason="even at the censoring's best case the baseline needs more FLOPs",
                       extra=extra)
    return Verdict("inconclusive", reason="the interval contains 0: each cost is known only between two snapshots",
                   needed="more snapshots near the level (`training.snapshots`) to narrow each seed's bounds, "
                          "more training seeds for the noise", extra=extra)


# --------------------------------------------------------------------------------------------- combining
def combine(verdicts: list[str], mode: str = "all") -> tuple[str, str]:
    """One claim verdict from its items' verdicts ("not tested" items are ignored; none tested: "not
    tested"). Both modes: a supported and a contradicted item -> "inconclusive (items disagree)".
    mode "all" (the claim asserts every item): all supported -> supported; any contradicted -> contradicted;
    all equivalent -> equivalent; some supported, the rest equivalent/inconclusive -> partly supported;
    else inconclusive.
    mode "any" (the claim says "and/or": one item suffices): any supported -> supported; all contradicted,
    or contradicted with the rest equivalent -> contradicted; all equivalent -> equivalent; else
    inconclusive. Returns (verdict, one-line rule that fired)."""
    tested = [v for v in verdicts if v != "not tested"]
    k = f"{len(tested)} of {len(verdicts)} items tested"
    if not tested:
        return "not tested", "no item has data"
    has = {v: tested.count(v) for v in VERDICTS}
    if has["supported"] and has["contradicted"]:
        return "inconclusive (items disagree)", f"one item supports and another contradicts the claim ({k})"
    if mode == "any":
        if has["supported"]:
            return "supported", f"at least one item supported, none contradicted (and/or claim; {k})"
        if has["contradicted"] and has["contradicted"] + has["equivalent"] == len(tested):
            return "contradicted", f"no item supports it and at least one contradicts it (and/or claim; {k})"
        if has["equivalent"] == len(tested):
            return "equivalent", f"every item equivalent ({k})"
        return "inconclusive", f"no item decides it (and/or claim; {k})"
    if has["supported"] == len(tested):
        return "supported", f"every item supported ({k})"
    if has["contradicted"]:
        return "contradicted", f"an item the claim asserts is contradicted ({k})"
    if has["equivalent"] == len(tested):
        return "equivalent", f"every item equivalent ({k})"
    if has["supported"]:
        return "partly supported", f"{has['supported']} item(s) supported, the others not ({k})"
    return "inconclusive", f"no item decides it ({k})"
