"""The paper's claims (PAPER.md) judged on a study's records: one verdict per claim item (metric, compute,
trade-off), combined into one verdict per claim, with the evidence text REPORT.md prints.

Verdicts (`ldm.verdicts`, which documents the statistics): a claim item compares a baseline (the run the
claim says is better) with a variant: a 95% interval of the difference over training seeds (paired t
when both runs share their seeds, Welch t otherwise; with one training seed, ± 2 standard errors over
sampling seeds, labelled as such), judged supported / contradicted / equivalent (inside a margin fixed
in the config) / inconclusive (with the seeds that would resolve it). Item kinds: `metric` (default),
`compute` (training FLOPs to reach a level: claim 6) and `tradeoff` (a guidance sweep's best quality at
a conditioning-accuracy level: claim 5). Items combine into one claim verdict (`ldm.verdicts.combine`;
claims in `ANY_OF` say "and/or").
"""
from __future__ import annotations

import numpy as np

from . import verdicts as V
from .efficiency import efficiency_costs, per_seed_costs
from .metrics import registry
from .seed_groups import as_group, compare, group_stat, markdown_table, train_seed

#: PAPER.md, "Claims a small-scale run can test" (abbreviated).
CLAIMS = {
    "1": "Changing only the size condition changes semantics under additive adaLN, much less under disentangled conditioning",
    "2": "Disentangled conditioning improves FID over additive adaLN at equal compute",
    "3": "Time-scheduled control beats unscheduled control",
    "4": "Noisy replicate padding beats zero padding (FID and/or text alignment)",
    "5": "Separate semantic/control guidance gives a better trade-off than one joint scale",
    "6": "Low-res pre-training + high-res fine-tuning reaches a given high-res FID with less compute than high-res from scratch",
    "7": "PE resampling transfers better than extrapolation; noise-schedule shift helps at high res",
    "8": "Architecture ranking under one protocol can differ from the ranking of their own papers",
}
#: claims whose items are alternatives ("and/or"): one supported item suffices (`ldm.verdicts.combine`)
ANY_OF = {"4"}
ACCURACY = "cond_accuracy"  # the accuracy axis of a trade-off item


def _advantage_text(result: V.Verdict, sign: int, digits: int = 3, scale: str = "f") -> str:
    """'advantage +x [lo, hi] (basis)': the baseline's advantage, > 0 reads in the claimed direction."""
    i = result.interval
    fmt = (lambda x: f"{x + 0.0:+.{digits}f}") if scale == "f" else (lambda x: f"{x + 0.0:+.3g}")  # noqa: E731 (no -0)
    adv = -sign * i.delta
    if i.lo is None:
        return f"advantage {fmt(adv)} ({i.basis})"
    lo, hi = V.advantage_interval(i, sign)
    return f"advantage {fmt(adv)} [95% CI {fmt(lo)}, {fmt(hi)}] ({i.basis})"


def _verdict_tail(result: V.Verdict) -> str:
    """' → verdict (why)'; the basis is already printed with the interval."""
    tail = f" → **{result.verdict}**"
    if result.verdict == "equivalent":
        tail += f" ({result.reason})"
    elif result.verdict == "inconclusive":
        tail += f" ({result.reason}" + (f"; would need {result.needed}" if result.needed else "") + ")"
    return tail


def metric_item(item: dict, by_ref: dict, default_margin: float) -> tuple[V.Verdict, str]:
    metric = item["metric"]
    c = compare(by_ref.get(item["baseline"]), by_ref.get(item["variant"]), metric, item.get("margin"), default_margin)
    head = (f"`{item['baseline']}` over `{item['variant']}` on {metric} "
            f"({registry.direction_word(metric)} is better)")
    if c["delta"] is None:
        return c["result"], f"{head}: no data → not tested"
    return c["result"], f"{head}: {_advantage_text(c['result'], registry.better_sign(metric))}{_verdict_tail(c['result'])}"


def compute_item(item: dict, study: dict, by_ref: dict, by_run: dict | None, config: dict | None,
                 efficiency, default_margin: float, derived: bool = False) -> tuple[V.Verdict, str]:
    """Training FLOPs (pre-training included) to reach the efficiency level, where every record carries the
    model's cost (else not tested: images seen at two resolutions are no measure of compute); lower is
    better, so the advantage is variant cost - baseline cost. On one training seed per side
    the cost ratio rule (`ldm.verdicts.cost_ratio_verdict`) decides, labelled as such."""
    base, var, metric = item["baseline"], item["variant"], item["metric"]
    spec = study.get("efficiency") or {}
    if not (efficiency and spec.get("metric") == metric and {base, var} <= set(spec.get("runs", []))):
        efficiency = (efficiency_costs({"runs": [base, var], "metric": metric}, by_ref, by_run, config)
                      if by_run is not None and config is not None else None)
    label = "compute" + (" (derived from study.efficiency)" if derived else "")
    if not efficiency or efficiency[0] is None:
        return V.Verdict("not tested", reason="no efficiency costs"), f"{label}: no efficiency costs → not tested"
    cb, cv = per_seed_costs(efficiency, base), per_seed_costs(efficiency, var)
    if not all(c[2] for c in [*cb.values(), *cv.values()] if c[0] is not None):
        why = "the records carry no model.train_gflops_per_image (images seen are no compute across resolutions)"
        return V.Verdict("not tested", reason=why), f"{label}: {why} → not tested"
    sb = {s: float(c[2]) for s, c in cb.items() if c[0] is not None}
    sv = {s: float(c[2]) for s, c in cv.items() if c[0] is not None}
    head = (f"{label}: training FLOPs to reach {metric} = {efficiency[0]:.3f}, `{base}` vs `{var}` "
            f"(lower is better; {len(sb)} of {len(cb)} and {len(sv)} of {len(cv)} training seeds reached it)")
    if not sb or not sv:
        return V.Verdict("not tested", reason="a side never reached the level"), f"{head} → not tested"
    mb, mv = float(np.mean(list(sb.values()))), float(np.mean(list(sv.values())))
    ratio = f"{mb:.3g} vs {mv:.3g}, ratio {mb / mv:.2f}x"
    if len(sb) == 1 and len(sv) == 1:
        result = V.cost_ratio_verdict(mb, mv)
        return result, f"{head}: {ratio} → **{result.verdict} (1 training seed, cost-ratio rule)** ({result.reason})"
    value, _ = V.resolve_margin(item.get("margin"), default_margin, mb)
    result = V.judge(V.difference_interval(V.Side(sb), V.Side(sv)), -1, value)
    return result, f"{head}: {ratio}; {_advantage_text(result, -1, scale='g')}{_verdict_tail(result)}"


def tradeoff_item(item: dict, by_ref: dict, default_margin: float) -> tuple[V.Verdict, str]:
    """Claim 5: each record's guidance sweep (`baseline_sweep` / `variant_sweep`, default `guidance_sweep`)
    summarised as the best `metric` at cond_accuracy ≥ `accuracy_level` (`ldm.verdicts.tradeoff_summary`;
    default level: the highest accuracy every compared sweep reaches), compared like a metric. A sweep is
    scored on one sampling seed, so with one training seed there is no noise estimate."""
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
        level = V.common_accuracy_level([(s[metric], s[ACCURACY]) for _, _, sw, _ in sides for s in sw.values()])
        source = "highest level every sweep reaches"
    values = [{seed: V.tradeoff_summary(s[metric], s[ACCURACY], level, sign) for seed, s in sw.items()}
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
    return result, f"{head}: {means}; {_advantage_text(result, sign)}{_verdict_tail(result)}"


def claim_items(number: str, study: dict) -> list[tuple[dict, bool]]:
    """The claim's items, plus for claim 6 a compute item derived from study.efficiency when the config
    names none (True marks it derived)."""
    items = [(item, False) for item in study.get("claims", {}).get(number, [])]
    eff = study.get("efficiency")
    if (number == "6" and items and eff and not any(i.get("kind") == "compute" for i, _ in items)
            and {items[0][0]["baseline"], items[0][0]["variant"]} <= set(eff["runs"])):
        first = items[0][0]
        items.append(({"kind": "compute", "baseline": first["baseline"], "variant": first["variant"],
                       "metric": eff["metric"]}, True))
    return items


def evaluate_claim(number: str, study: dict, by_ref: dict, efficiency=None, by_run: dict | None = None,
                   config: dict | None = None) -> tuple[str, list[tuple[V.Verdict, str]], str]:
    """(claim verdict, [(item verdict, evidence text)], the combination rule that fired)."""
    margin = float(study.get("equivalence_margin", V.DEFAULT_MARGIN))
    evaluated = []
    for item, derived in claim_items(number, study):
        kind = item.get("kind", "metric")
        if kind == "compute":
            evaluated.append(compute_item(item, study, by_ref, by_run, config, efficiency, margin, derived))
        elif kind == "tradeoff":
            evaluated.append(tradeoff_item(item, by_ref, margin))
        else:
            evaluated.append(metric_item(item, by_ref, margin))
    verdict, rule = V.combine([r.verdict for r, _ in evaluated], "any" if number in ANY_OF else "all")
    short = {V.SAMPLING_ONLY: "sampling noise only", V.NO_NOISE: "no noise estimate"}
    bases = sorted({short[r.basis] for r, _ in evaluated if r.verdict != "not tested" and r.interval is not None
                    and not r.interval.training} | {"cost-ratio rule" for r, _ in evaluated if "ratio" in r.extra})
    if bases and verdict != "not tested":  # every basis that is not training seeds rests on one training seed
        verdict = f"{verdict}; basis: 1 training seed: {', '.join(bases)}"
    return verdict, evaluated, rule


def claims_section(study: dict, by_ref: dict, arch_order: list[tuple[str, float]] | None,
                   efficiency: tuple[float | None, dict] | None = None, by_run: dict | None = None,
                   config: dict | None = None) -> str:
    """One verdict per claim with its evidence; each item shows the baseline's advantage (> 0 reads in the
    claimed direction), its interval, basis and verdict, and the cell ends with the combination rule."""
    rows = []
    for number, text in CLAIMS.items():
        if number == "8" and arch_order:
            ours = " < ".join(a for a, _ in arch_order)
            rows.append([number, text, "tested at toy scale",
                         f"fd_evaluator ranking here (best first; means over training seeds where several): {ours}; "
                         f"own papers (ImageNet-256 FID): mdt < dit < unet"])
            continue
        if not study.get("claims", {}).get(number):
            rows.append([number, text, "not tested at this scale", "no run pair in this grid"])
            continue
        verdict, evaluated, rule = evaluate_claim(number, study, by_ref, efficiency, by_run, config)
        if verdict == "not tested":
            verdict = "not tested at this scale"
        evidence = "; ".join(f"({i + 1}) {text_}" for i, (_, text_) in enumerate(evaluated))
        rows.append([number, text, verdict, f"{evidence}. Claim: {rule}"])
    return markdown_table(["#", "claim (PAPER.md)", "verdict here", "evidence"], rows)


def arch_ranking(study: dict, by_ref: dict) -> list[tuple[str, float]] | None:
    spec = study.get("architectures")
    if not spec:
        return None
    stage = spec["stages"][-1]
    scored = [(r, group_stat(by_ref.get(f"{r}/{stage}"), "fd_evaluator")) for r in spec["recipes"]]
    scored = [(r, s[0]) for r, s in scored if s is not None]
    return sorted(scored, key=lambda x: x[1]) or None


def method_paragraph(study: dict, seeds: list[int], several: bool) -> str:
    """REPORT.md's statement of the verdict method (interval, level, margin, pairing, what a seed is)."""
    margin = float(study.get("equivalence_margin", V.DEFAULT_MARGIN))
    trained = (f"Runs here are trained with training seeds {', '.join(map(str, seeds))}." if several else
               "Every run here is trained once (one training seed), so every verdict rests on sampling noise only "
               "and says so.")
    return (
        "**Method.** A *training seed* is one training run of a grid run (its own initial weights, data order "
        "and training noise; runs of the same seed share their random numbers); a *sampling seed* is one draw "
        f"of sampling noise from one trained model. {trained} A run's value at one training seed is its mean "
        "over its sampling seeds. Each claim item compares a baseline (the run the claim says is better) with a "
        "variant: Δ = variant − baseline with a two-sided 95% interval, a paired t interval on the per-seed "
        "differences (df = n − 1) when both runs have the same training seeds, a Welch t interval otherwise; "
        "with one training seed on a side, Δ ± 2 standard errors over the sampling seeds (marked † in the "
        "tables, \"1 training seed: sampling noise only\" in the verdicts: it understates run-to-run "
        "variation), and no interval where a side has a single sampling seed as well. No bootstrap (with a "
        "handful of seeds it is narrower than the t interval). The evidence shows the baseline's *advantage* "
        "(Δ signed so that > 0 reads as the claim). *supported*: the interval excludes 0 in the claimed "
        "direction; *contradicted*: it excludes 0 the other way; *equivalent*: the whole interval lies inside "
        "±margin, the margin fixed in the config before the runs (`study.equivalence_margin` = "
        f"{margin:g} × |baseline mean| unless an item sets its own `margin`); equivalence is checked first, so a "
        "difference that excludes 0 but lies inside the margin is *equivalent*, and it is never declared on "
        "sampling noise alone; anything else is *inconclusive*, with the training seeds per run that would "
        "resolve it at the observed variance and difference. A claim's items combine: all must hold (claim 4, "
        "\"and/or\": one suffices); one item supporting and another contradicting gives \"inconclusive (items "
        "disagree)\". Claim 6 has a compute item (from `study.efficiency` unless the config names one): training "
        "FLOPs, pre-training included, to reach the efficiency level, lower is better, not tested where the "
        "records carry no FLOPs; on one training seed a cost ratio within 0.9–1.11x is inconclusive (snapshot "
        "resolution). Claim 5's trade-off item summarises each guidance sweep as the best fd_evaluator at "
        "cond_accuracy ≥ a level (linear interpolation along the sweep) and compares the two sweeps like a "
        "metric; a sweep is scored on one sampling seed, so it needs training seeds for an interval.")
