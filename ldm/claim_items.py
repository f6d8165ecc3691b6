"""One piece of evidence for a claim, judged: a metric difference, a compute comparison, a guidance
trade-off or an architecture ranking, each with the evidence text REPORT.md prints.

A claim item compares a baseline (the run the claim says is better) with a variant; the statistics are
`ldm.verdicts`. How items combine into one verdict per claim is `ldm.claims`.
"""
from __future__ import annotations

import math

import numpy as np

from . import verdicts as V
from .efficiency import efficiency_costs, per_seed_costs
from .metrics import registry
from .seed_groups import as_group, compare, instrument_mismatch, train_seed

ACCURACY = "cond_accuracy"  # the accuracy axis of a trade-off item
#: own papers' ImageNet-256 FID order, best first (MDT-v2 1.58, DiT-XL/2 2.27, LDM-4 3.60; ldm.models)
OWN_PAPER_ORDER = ("mdt", "dit", "unet")


def advantage_text(result: V.Verdict, sign: int, digits: int = 3, scale: str = "f") -> str:
    """'advantage +x [lo, hi] (basis)': the baseline's advantage, > 0 reads in the claimed direction."""
    i = result.interval
    fmt = (lambda x: f"{x + 0.0:+.{digits}f}") if scale == "f" else (lambda x: f"{x + 0.0:+.3g}")  # noqa: E731 (no -0)
    adv = -sign * i.delta
    if i.lo is None:
        return f"advantage {fmt(adv)} ({i.basis})"
    lo, hi = V.advantage_interval(i, sign)
    return f"advantage {fmt(adv)} [95% CI {fmt(lo)}, {fmt(hi)}] ({i.basis})"


def verdict_tail(result: V.Verdict) -> str:
    """' → verdict (why)'; the basis is already printed with the interval."""
    tail = f" → **{result.verdict}**"
    if result.verdict in ("equivalent", "not tested"):
        tail += f" ({result.reason})"
    elif result.verdict == "inconclusive":
        tail += f" ({result.reason}" + (f"; would need {result.needed}" if result.needed else "") + ")"
    return tail


# ------------------------------------------------------------------------------------ val_loss validity
def val_loss_key(scenario, ref: str) -> tuple | None:
    """What makes two runs' val_loss comparable (ldm/metrics/val_loss.py): objective, beta schedule, variance
    head, noise-schedule shift and resolution. The shift counts for flow runs too: flow times are noise levels,
    but a shifted run trains on another time distribution, and the uniform grid favours the unshifted one."""
    recipe, stage = ref.split("/")
    run = next((r for r in scenario.runs.values() if r.recipe == recipe and r.stage == stage), None)
    if run is None:
        return None
    own = scenario.recipe(run)
    return (own.objective, own.beta_schedule or "linear", bool((own.options or {}).get("learn_sigma")),
            scenario.schedule_shift(run), run.resolution)


VAL_LOSS_KEY_NAMES = ("objective", "beta schedule", "learned sigma", "schedule shift", "resolution")


def val_loss_refusal(config: dict | None, refs: list[str]) -> str | None:
    """Why val_loss cannot compare these runs (None: it can, or no config to tell)."""
    if config is None:
        return None
    from .spec import Scenario  # the grid expansion; imported here only, the statistics need no config

    scenario = Scenario(config)
    keys = {val_loss_key(scenario, ref) for ref in refs}
    if len(keys) <= 1:
        return None
    known = [k for k in keys if k is not None]
    differ = [n for i, n in enumerate(VAL_LOSS_KEY_NAMES) if len({k[i] for k in known}) > 1]
    return ("val_loss compares runs of one objective, schedule and training time distribution only; these differ "
            f"in {', '.join(differ) or 'their grid'}")


# ------------------------------------------------------------------------------------------ item kinds
def metric_item(item: dict, by_ref: dict, default_margin: float, config: dict | None = None) -> tuple[V.Verdict, str]:
    metric = item["metric"]
    head = (f"`{item['baseline']}` over `{item['variant']}` on {metric} "
            f"({registry.direction_word(metric)} is better)")
    refused = val_loss_refusal(config, [item["baseline"], item["variant"]]) if metric == "val_loss" else None
    if refused:
        return V.Verdict("not tested", reason=refused), f"{head} → **not tested** ({refused})"
    c = compare(by_ref.get(item["baseline"]), by_ref.get(item["variant"]), metric, item.get("margin"), default_margin)
    if c["delta"] is None:
        return c["result"], f"{head} → **not tested** ({c['reason']})"
    result = c["result"]
    return result, f"{head}: {advantage_text(result, registry.better_sign(metric))}{verdict_tail(result)}"


def compute_item(item: dict, study: dict, by_ref: dict, by_run: dict | None, config: dict | None,
                 efficiency, derived: bool = False) -> tuple[V.Verdict, str]:
    """Training FLOPs (pre-training included) to reach the efficiency level, where every record carries the
    model's cost (else not tested: images seen at two resolutions are no measure of compute); lower is
    better. Each seed's cost is known only between the snapshot before the level and the one at it, so
    the comparison is `ldm.verdicts.censored_cost_verdict`."""
    base, var, metric = item["baseline"], item["variant"], item["metric"]
    spec = study.get("efficiency") or {}
    if not (efficiency and spec.get("metric") == metric and {base, var} <= set(spec.get("runs", []))):
        efficiency = (efficiency_costs({"runs": [base, var], "metric": metric}, by_ref, by_run, config)
                      if by_run is not None and config is not None else None)
    label = "compute" + (" (derived from study.efficiency)" if derived else "")
    mismatch = instrument_mismatch([by_ref.get(base), by_ref.get(var)], metric)
    if mismatch:
        return V.Verdict("not tested", reason=mismatch), f"{label}: the runs were {mismatch} → **not tested**"
    if not efficiency or efficiency[0] is None:
        return V.Verdict("not tested", reason="no efficiency costs"), f"{label}: no efficiency costs → not tested"
    cb, cv = per_seed_costs(efficiency, base), per_seed_costs(efficiency, var)
    if not all(c[3] is not None for c in [*cb.values(), *cv.values()]):
        why = "the records carry no model.train_gflops_per_image (images seen are no compute across resolutions)"
        return V.Verdict("not tested", reason=why), f"{label}: {why} → not tested"
    bounds = [{s: (float(c[3]), math.inf if c[2] is None else float(c[2])) for s, c in side.items()}
              for side in (cb, cv)]
    reached = [sum(c[0] is not None for c in side.values()) for side in (cb, cv)]
    head = (f"{label}: training FLOPs to reach {metric} = {efficiency[0]:.3f}, `{base}` vs `{var}` (lower is better; "
            f"{reached[0]} of {len(cb)} and {reached[1]} of {len(cv)} training seeds reached it)")
    span = "; ".join(f"`{ref}` ({', '.join(f'{lo:.3g}–{hi:.3g}' for lo, hi in b.values())}]"
                     for ref, b in zip((base, var), bounds))
    result = V.censored_cost_verdict(*bounds)
    lo, hi = result.extra["bounds"]
    return result, (f"{head}: cost between the snapshot before and the one at the level, per seed: {span}; "
                    f"advantage in [{lo + 0.0:+.3g}, {hi + 0.0:+.3g}] ({result.extra['basis']}){verdict_tail(result)}")


def common_accuracy_level(sweeps: list[tuple[list, list]]) -> float | None:
    """The highest accuracy every sweep reaches (min over sweeps of their max accuracy): the default
    level of `tradeoff_summary`, so that every compared sweep has a value. `sweeps`: (quality, accuracy)."""
    tops = [max(acc) for _, acc in sweeps if len(acc)]
    return min(tops) if tops else None


def tradeoff_summary(quality: list, accuracy: list, level: float, better_sign: int = -1) -> float | None:
    """The best quality (e.g. lowest fd_evaluator) a guidance sweep reaches at accuracy >= `level`: over
    the sweep's points with accuracy >= level and the points where the piecewise-linear path through the
    sweep (in scale order) crosses accuracy = level (linear interpolation of quality there). None when
    the sweep never reaches `level`. One number per sweep, so sweeps compare like any metric."""
    q, a = np.asarray(quality, float), np.asarray(accuracy, float)
    candidates = list(q[a >= level])
    for i in range(len(a) - 1):
        lo, hi = sorted((a[i], a[i + 1]))
        if lo < level < hi:
            w = (level - a[i]) / (a[i + 1] - a[i])
            candidates.append(q[i] + w * (q[i + 1] - q[i]))
    if not candidates:
        return None
    return float(max(candidates) if better_sign > 0 else min(candidates))


def tradeoff_item(item: dict, by_ref: dict, default_margin: float) -> tuple[V.Verdict, str]:
    """Claim 5: each record's guidance sweep (`baseline_sweep` / `variant_sweep`, default `guidance_sweep`)
    summarised as the best `metric` at cond_accuracy ≥ `accuracy_level` (`tradeoff_summary`; default
    level: the highest accuracy every compared sweep reaches), compared like a metric. A sweep is scored
    on one sampling seed, so with one training seed there is no noise estimate."""
    metric = item.get("metric", "fd_evaluator")
    sign = registry.better_sign(metric)
    keys = item.get("baseline_sweep", "guidance_sweep"), item.get("variant_sweep", "guidance_sweep")
    sides = []
    for ref, key in zip((item["baseline"], item["variant"]), keys):
        group = as_group(by_ref.get(ref)) or []
        sweeps = {train_seed(r): r[key] for r in group if r.get(key)}
        sides.append((ref, key, sweeps, len(group)))
    head = (f"trade-off: `{sides[0][0]}` {keys[0]} over `{sides[1][0]}` {keys[1]}, best {metric} at "
            f"{ACCURACY} ≥ level")
    for ref, key, sweeps, n in sides:
        if not sweeps:
            why = f"no record of `{ref}` carries `{key}`" + (" (set sampling.guidance_sweep_joint and re-evaluate)"
                                                             if key == "guidance_sweep_joint" else "")
            return V.Verdict("not tested", reason=why), f"{head}: {why} → not tested"
    level = item.get("accuracy_level")
    source = "claim item"
    if level is None:
        level = common_accuracy_level([(s[metric], s[ACCURACY]) for _, _, sw, _ in sides for s in sw.values()])
        source = "highest level every sweep reaches"
    values = [{seed: tradeoff_summary(s[metric], s[ACCURACY], level, sign) for seed, s in sw.items()}
              for _, _, sw, _ in sides]
    missed = sum(v is None for side in values for v in side.values())
    values = [{k: v for k, v in side.items() if v is not None} for side in values]
    head = head.replace("≥ level", f"≥ {level:.3f} ({source})")
    if missed:
        head += f"; {missed} sweep(s) never reach it"
    if not values[0] or not values[1]:
        return V.Verdict("not tested", reason="a side never reaches the level"), f"{head} → not tested"
    b, v = V.Side(values[0], None, 1), V.Side(values[1], None, 1)
    margin, _ = V.resolve_margin(item.get("margin"), default_margin, b.mean)
    result = V.judge(V.difference_interval(b, v), sign, margin)
    means = f"{b.mean:.3f} vs {v.mean:.3f}"
    return result, f"{head}: {means}; {advantage_text(result, sign)}{verdict_tail(result)}"


def ranking_item(study: dict, by_ref: dict, default_margin: float, config: dict | None = None) -> tuple[V.Verdict, str]:
    """Claim 8 ("the ranking under one protocol can differ from the own papers'"), tested pair by pair on
    `study.architectures.metric` (default fd_evaluator) at the last compared stage: each pair of the own
    papers' order (OWN_PAPER_ORDER) is a metric item with the better-published architecture as baseline.
    supported: some pair is reversed (contradicted) or tied (equivalent within the margin); contradicted:
    every pair keeps the own papers' order (supported); otherwise inconclusive."""
    spec = study["architectures"]
    metric, stage = spec.get("metric", "fd_evaluator"), spec["stages"][-1]
    arch_of = {r: (config["recipes"][r]["arch"] if config else r) for r in spec["recipes"]}
    ordered = [next(r for r in spec["recipes"] if arch_of[r] == a) for a in OWN_PAPER_ORDER if a in arch_of.values()]
    pairs = [(a, b) for i, a in enumerate(ordered) for b in ordered[i + 1:]]
    head = (f"own papers' order (ImageNet-256 FID, best first): {' < '.join(ordered)}; each pair on {metric} "
            f"at {stage}")
    if len(pairs) == 0:
        why = "fewer than 2 architectures with published numbers"
        return V.Verdict("not tested", reason=why), f"{head} → not tested ({why})"
    results = [metric_item({"baseline": f"{a}/{stage}", "variant": f"{b}/{stage}", "metric": metric}, by_ref,
                           default_margin, config) for a, b in pairs]
    verdicts = [r.verdict for r, _ in results]
    evidence = "; ".join(f"[{i + 1}] {text}" for i, (_, text) in enumerate(results))
    if "not tested" in verdicts:
        return V.Verdict("not tested", reason="a pair was not tested"), f"{head}: {evidence}"
    if "contradicted" in verdicts or "equivalent" in verdicts:
        verdict, why = "supported", "a pair is reversed or tied under this protocol"
    elif all(v == "supported" for v in verdicts):
        verdict, why = "contradicted", "every pair keeps the own papers' order"
    else:
        verdict, why = "inconclusive", "no pair reversed or tied, not every pair in order"
    return V.Verdict(verdict, reason=why), f"{head}: {evidence} ⇒ **{verdict}** ({why})"
