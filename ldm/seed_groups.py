"""Metrics records grouped by run over training seeds, and comparisons between two groups.

A grid run may be trained once per training seed (`train_seeds`); its metrics records share `recipe/stage`
and carry `train_seed` and `run_group` (records without them: one seed, seed 0, group = run id). A *group*
is the records of one `recipe/stage` ordered by seed: a seed's value is its mean over sampling seeds, a
group's statistic is mean ± std over training seeds (n shown), or for a run trained once mean ± std over its
sampling seeds. `compare` gives the interval and verdict of `ldm.verdicts` for two groups.
"""
from __future__ import annotations

from . import verdicts as V
from .metrics import registry


# ------------------------------------------------------------------------------------ records and groups
def train_seed(record: dict) -> int:
    """The record's training seed; 0 for records from before training seeds (no `train_seed`, or None)."""
    seed = record.get("train_seed")
    return 0 if seed is None else int(seed)


def run_group(record: dict) -> str:
    """The run id without its seed suffix; the run id itself for records without `run_group`."""
    return record.get("run_group") or record["run_id"]


def group_records(records: list[dict]) -> dict[str, list[dict]]:
    """{"recipe/stage": [records ordered by training seed]}; two records of one seed in a group raise."""
    groups: dict[str, list[dict]] = {}
    for rec in records:
        groups.setdefault(f"{rec['recipe']}/{rec['stage']}", []).append(rec)
    for ref, group in groups.items():
        group.sort(key=train_seed)
        seeds = [train_seed(r) for r in group]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"{ref}: two metrics records of one training seed ({[r['run_id'] for r in group]})")
    return groups


def as_group(value) -> list[dict] | None:
    """A group from a `by_ref` value: a list of records, or one record (callers from before seeds)."""
    if value is None:
        return None
    group = [value] if isinstance(value, dict) else list(value)
    return group or None


def metric_side(group, metric: str) -> V.Side | None:
    """The per-training-seed values (means over sampling seeds) of `metric` in a group; for a group of one
    seed also its std and count of sampling seeds. None: no record of the group has the metric."""
    recs = [r for r in (as_group(group) or []) if metric in r.get("metrics", {})]
    if not recs:
        return None
    values = {train_seed(r): float(r["metrics"][metric]["mean"]) for r in recs}
    if len(recs) > 1:
        return V.Side(values)
    s = recs[0]["metrics"][metric]
    n = len(s.get("per_seed", [])) or len(recs[0].get("seeds", [])) or 1
    return V.Side(values, float(s["std"]), n)


def group_stat(group, metric: str) -> tuple[float, float, int] | None:
    """(mean, std, n training seeds): std over training seeds, or over sampling seeds with one seed."""
    side = metric_side(group, metric)
    if side is None:
        return None
    return side.mean, (side.sd if side.n > 1 else float(side.sampling_std or 0.0)), side.n


def format_stat(stat: tuple[float, float, int] | None, digits: int = 3) -> str:
    """'mean ± std', with ' (n=k)' where the std is over k > 1 training seeds."""
    if stat is None:
        return "n/a"
    text = f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"
    return text if stat[2] == 1 else f"{text} (n={stat[2]})"


# -------------------------------------------------------------------------------------------- comparing
#: metrics read through the offline evaluator: their values depend on its weights, so they compare only
#: between records scored by the same evaluator (`evaluator_weights_sha256`)
EVALUATOR_NEEDS = frozenset({registry.Need.FEATURES, registry.Need.PREDICTIONS, registry.Need.REFERENCE_STATS,
                             registry.Need.REAL_FEATURES, registry.Need.CAPTION_TOWER})


def instrument_mismatch(groups: list, metric: str) -> str | None:
    """Why `metric` cannot compare these groups' records (None: it can): their latents came from different
    autoencoders (`vae_weights_sha256`; a record from before that field counts as one more, unknown one:
    different autoencoders make different data, so no metric compares the runs), or an evaluator metric was
    scored by different evaluator weights (a retrained evaluator is another instrument)."""
    recs = [r for g in groups for r in (as_group(g) or []) if metric in r.get("metrics", {})]
    vaes = {r.get("vae_weights_sha256") for r in recs}
    if len(vaes) > 1:
        names = sorted("unrecorded" if v is None else v[:8] for v in vaes)
        return f"encoded by {len(vaes)} different autoencoders ({', '.join(names)}): {metric} values are not comparable"
    if not registry.metric(metric).needs & EVALUATOR_NEEDS:
        return None
    weights = {r.get("evaluator_weights_sha256") for r in recs} - {None}
    if len(weights) < 2:
        return None
    return (f"scored by {len(weights)} different evaluator weights ({', '.join(sorted(w[:8] for w in weights))}): "
            f"{metric} values are not comparable")


def compare(baseline, variant, metric: str, margin: dict | None = None,
            default_margin: float = V.DEFAULT_MARGIN) -> dict:
    """Variant minus baseline over training seeds (records or groups of records), its interval and the
    verdict for "the baseline is better". Keys: verdict, label (with the basis where it is not training
    seeds), delta, se, lo, hi, basis, margin, reason, needed, result (the `ldm.verdicts.Verdict`)."""
    sign = registry.better_sign(metric)  # unknown metric names raise before anything else
    b, v = metric_side(baseline, metric), metric_side(variant, metric)
    mismatch = instrument_mismatch([baseline, variant], metric)
    if b is None or v is None or mismatch:
        why = mismatch or "a side has no data"
        return {"verdict": "not tested", "label": "not tested", "delta": None, "se": None, "lo": None, "hi": None,
                "basis": "", "margin": None, "reason": why, "needed": None,
                "result": V.Verdict("not tested", reason=why)}
    interval = V.difference_interval(b, v)
    value, text = V.resolve_margin(margin, default_margin, b.mean)
    result = V.judge(interval, sign, value)
    return {"verdict": result.verdict, "label": result.label, "delta": interval.delta, "se": interval.se,
            "lo": interval.lo, "hi": interval.hi, "basis": interval.basis, "margin": value, "margin_text": text,
            "reason": result.reason, "needed": result.needed, "result": result}


def format_delta(c: dict, digits: int = 3) -> str:
    """Δ [95% interval]; † marks an interval from sampling seeds only (a run trained once)."""
    if c["delta"] is None:
        return "n/a (not comparable: other instruments)" if "not comparable" in c["reason"] else "n/a"
    if c["lo"] is None:
        return f"{c['delta']:+.{digits}f} (no noise estimate)"
    mark = "" if c["result"].interval.training else "†"
    return f"{c['delta']:+.{digits}f} [{c['lo']:+.{digits}f}, {c['hi']:+.{digits}f}]{mark}"


def metric_names(records: list[dict]) -> list[str]:
    """The records' metrics in the registry's REPORT.md order; a metric the registry does not know raises
    instead of silently dropping out (by-products such as size_consistency_pairwise stay in tables/runs.md)."""
    present = {registry.metric(m).name for r in records for m in r.get("metrics", {})}
    return [m for m in registry.report_order() if m in present]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
