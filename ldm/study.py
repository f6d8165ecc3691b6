"""`results/REPORT.md`: the page a researcher reads first, answering the paper's questions at a glance.

Built from the metrics JSONs and the config's `study` section only (no checkpoints), so it regenerates
wherever the small results are checked out. It holds: the architecture table in the layout of the paper's
Table 1 (with the architectures' own published numbers beside ours, labelled), one table per ablation with
deltas against its baseline, a training-efficiency table, links to the plots, and a checklist of the
claims in PAPER.md with the evidence each verdict rests on.

Training seeds. A grid run may be trained once per training seed (`train_seeds`); its metrics records
share `recipe/stage` and carry `train_seed` and `run_group` (records without them: one seed, seed 0,
group = run id). Everything here works on *groups*, the records of one `recipe/stage` ordered by seed: a
seed's value is its mean over sampling seeds, tables show mean ± std over training seeds (n shown), or
for a run trained once mean ± std over its sampling seeds, as before.

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

from pathlib import Path

import numpy as np

from . import verdicts as V
from .metrics import registry
from .provenance import atomic_write_bytes

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
SWEEP_KEYS = ("guidance_sweep", "guidance_sweep_joint")


def _better_sign(metric: str) -> int:
    """+1 where larger is better, -1 where smaller is better (the registry's direction; unknown names raise)."""
    return registry.better_sign(metric)


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


def _as_group(value) -> list[dict] | None:
    """A group from a `by_ref` value: a list of records, or one record (callers from before seeds)."""
    if value is None:
        return None
    group = [value] if isinstance(value, dict) else list(value)
    return group or None


def metric_side(group, metric: str) -> V.Side | None:
    """The per-training-seed values (means over sampling seeds) of `metric` in a group; for a group of one
    seed also its std and count of sampling seeds. None: no record of the group has the metric."""
    recs = [r for r in (_as_group(group) or []) if metric in r.get("metrics", {})]
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


_stat, _fmt = group_stat, format_stat  # the names from before training seeds


# -------------------------------------------------------------------------------------------- comparing
def compare(baseline, variant, metric: str, margin: dict | None = None,
            default_margin: float = V.DEFAULT_MARGIN) -> dict:
    """Variant minus baseline over training seeds (records or groups of records), its interval and the
    verdict for "the baseline is better". Keys: verdict, label (with the basis where it is not training
    seeds), delta, se, lo, hi, basis, margin, reason, needed, result (the `ldm.verdicts.Verdict`)."""
    sign = _better_sign(metric)  # unknown metric names raise before anything else
    b, v = metric_side(baseline, metric), metric_side(variant, metric)
    if b is None or v is None:
        return {"verdict": "not tested", "label": "not tested", "delta": None, "se": None, "lo": None, "hi": None,
                "basis": "", "margin": None, "reason": "a side has no data", "needed": None,
                "result": V.judge(None, sign, None)}
    interval = V.difference_interval(b, v)
    value, text = V.resolve_margin(margin, default_margin, b.mean)
    result = V.judge(interval, sign, value)
    return {"verdict": result.verdict, "label": result.label, "delta": interval.delta, "se": interval.se,
            "lo": interval.lo, "hi": interval.hi, "basis": interval.basis, "margin": value, "margin_text": text,
            "reason": result.reason, "needed": result.needed, "result": result}


def _fmt_delta(c: dict, digits: int = 3) -> str:
    """Δ [95% interval]; † marks an interval from sampling seeds only (a run trained once)."""
    if c["delta"] is None:
        return "n/a"
    if c["lo"] is None:
        return f"{c['delta']:+.{digits}f} (no noise estimate)"
    mark = "" if c["result"].interval.training else "†"
    return f"{c['delta']:+.{digits}f} [{c['lo']:+.{digits}f}, {c['hi']:+.{digits}f}]{mark}"


def _metric_names(records: list[dict]) -> list[str]:
    """The records' metrics in the registry's REPORT.md order; a metric the registry does not know raises
    instead of silently dropping out (by-products such as size_consistency_pairwise stay in tables/runs.md)."""
    present = {registry.metric(m).name for r in records for m in r.get("metrics", {})}
    return [m for m in registry.report_order() if m in present]


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def architecture_section(study: dict, by_ref: dict, metrics: list[str], config: dict) -> str:
    spec = study["architectures"]
    header = ["recipe", "arch", "size"]
    for stage in spec["stages"]:
        px = config["resolutions"][config["stages"][stage]["resolution"]]
        header += [f"{m} ({stage}, {px} px)" for m in metrics]
    header += ["own paper's ImageNet-256 FID (not this setting)"]
    # Numbers published by each architecture's own paper (ImageNet 256 px FID-50k with guidance) live in its
    # model file (`ldm.models` registry); imported here only, since the models pull in torch and diffusers.
    from .models import published_fid

    published = published_fid()
    rows = []
    for recipe in spec["recipes"]:
        rcfg = config["recipes"][recipe]
        row = [recipe, rcfg["arch"], rcfg["size"]]
        for stage in spec["stages"]:
            row += [format_stat(group_stat(by_ref.get(f"{recipe}/{stage}"), m)) for m in metrics]
        value, source = published.get(rcfg["arch"], (None, ""))
        row.append(f"{value} ({source})" if value is not None else (source or "—"))
        rows.append(row)
    return _table(header, rows)


def ablation_section(name: str, spec: dict, by_ref: dict, metrics: list[str],
                     default_margin: float = V.DEFAULT_MARGIN) -> str:
    base = by_ref.get(spec["baseline"])
    header = ["run", *metrics, *[f"Δ {m} vs baseline [95% CI]" for m in metrics]]
    rows = []
    for ref in [spec["baseline"], *spec["variants"]]:
        rec = by_ref.get(ref)
        cells = [format_stat(group_stat(rec, m)) for m in metrics]
        if ref == spec["baseline"]:
            deltas = ["baseline"] * len(metrics)
        else:
            deltas = [_fmt_delta(compare(base, rec, m, default_margin=default_margin)) for m in metrics]
        rows.append([f"`{ref}`", *cells, *deltas])
    title = f"### {name}\n{spec.get('question', '')}\n\n"
    return title + _table(header, rows)


# ------------------------------------------------------------------------------------------- efficiency
def first_reach(record: dict, metric: str, level: float) -> int | None:
    """First snapshot step whose metric is at least as good as `level` (curve points: one seed, final: all)."""
    sign = _better_sign(metric)
    for point in sorted(record.get("curve", []), key=lambda p: p["step"]):
        if metric in point and sign * (point[metric] - level) >= 0:
            return int(point["step"])
    return None


def efficiency_costs(spec: dict, by_ref: dict, by_run: dict, config: dict) -> tuple[float | None, dict]:
    """(level, {run ref: {training seed: (first step reaching it or None, images seen, training FLOPs or
    None)}}). The level is the worst final value over every training seed of the compared runs, so every
    record reaches it by its last snapshot; transferred runs are charged for their pre-training (the init
    run of the same seed, `init_run`)."""
    metric = spec["metric"]
    groups = {ref: _as_group(by_ref.get(ref)) for ref in spec["runs"]}
    if len(groups) < 2 or any(g is None for g in groups.values()):
        return None, {}
    finals = [r["metrics"][metric]["mean"] for g in groups.values() for r in g if metric in r.get("metrics", {})]
    if len(finals) != sum(len(g) for g in groups.values()):
        return None, {}
    level = min(finals) if _better_sign(metric) > 0 else max(finals)
    batch = config["training"]["batch_size"]

    def cost(record: dict, steps: int) -> tuple[int, float | None]:
        images = steps * batch
        gflops = (record.get("model") or {}).get("train_gflops_per_image")
        flops = None if gflops is None else images * gflops * 1e9
        init = by_run.get(record.get("init_run") or "")
        if init is not None:
            init_images, init_flops = cost(init, int(init["step"]))
            images += init_images
            flops = None if flops is None or init_flops is None else flops + init_flops
        return images, flops

    out = {}
    for ref, group in groups.items():
        out[ref] = {}
        for rec in group:
            step = first_reach(rec, metric, level)
            out[ref][train_seed(rec)] = (step, *cost(rec, step)) if step is not None else (None, None, None)
    return level, out


def _per_seed_costs(efficiency, ref: str) -> dict:
    """{seed: (step, images, flops)} of one ref (also accepts the old {ref: (step, images, flops)} shape)."""
    costs = efficiency[1].get(ref) or {}
    return {0: costs} if isinstance(costs, tuple) else costs


def efficiency_section(metric: str, efficiency: tuple[float | None, dict]) -> str:
    """Images seen (and training FLOPs where the metrics carry the model's cost) to reach one metric level:
    the worst final value among the compared runs (every training seed), so that every run reaches it.
    Transferred runs are charged for their pre-training too. With several training seeds each cell is
    mean ± std over the seeds that reached the level. `efficiency` is `efficiency_costs`'s result."""
    level, costs = efficiency
    if level is None:
        return f"(not enough runs with `{metric}` yet)"
    rows = []
    for ref in costs:
        seeds = _per_seed_costs(efficiency, ref)
        reached = [c for c in seeds.values() if c[0] is not None]
        count = f"{len(reached)} of {len(seeds)}"
        if not reached:
            rows.append([f"`{ref}`", "not reached", "—", "—", count])
        elif len(seeds) == 1:
            step, images, flops = reached[0]
            rows.append([f"`{ref}`", str(step), f"{images:,}", "n/a" if flops is None else f"{flops:.3g}", count])
        else:
            steps, images = np.array([c[0] for c in reached], float), np.array([c[1] for c in reached], float)
            flops = [c[2] for c in reached]
            sd = (lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0)  # noqa: E731
            flop_cell = "n/a"
            if all(f is not None for f in flops):
                f = np.array(flops, float)
                flop_cell = f"{f.mean():.3g} ± {sd(f):.2g}"
            rows.append([f"`{ref}`", f"{steps.mean():.0f} ± {sd(steps):.0f}",
                         f"{images.mean():,.0f} ± {sd(images):,.0f}", flop_cell, count])
    header = ["run", "first snapshot step reaching it", "images seen (incl. pre-training)", "training FLOPs",
              "training seeds reaching it"]
    note = (f"Level: `{metric}` = {level:.3f} (the worst final value among these runs and their training seeds). "
            f"Steps are snapshot steps, so reaching is resolved only to the snapshot spacing; snapshots before "
            f"the last are scored on one sampling seed. With several training seeds: mean ± std over the seeds.\n\n")
    return note + _table(header, rows)


# ----------------------------------------------------------------------------------------- claim items
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
    return c["result"], f"{head}: {_advantage_text(c['result'], _better_sign(metric))}{_verdict_tail(c['result'])}"


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
    cb, cv = _per_seed_costs(efficiency, base), _per_seed_costs(efficiency, var)
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
    sign = _better_sign(metric)
    keys = item.get("baseline_sweep", "guidance_sweep"), item.get("variant_sweep", "guidance_sweep")
    sides = []
    for ref, key in zip((item["baseline"], item["variant"]), keys):
        group = _as_group(by_ref.get(ref)) or []
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
    return _table(["#", "claim (PAPER.md)", "verdict here", "evidence"], rows)


def _arch_ranking(study: dict, by_ref: dict) -> list[tuple[str, float]] | None:
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


def write_study_report(config: dict, records: list[dict], results: Path) -> Path | None:
    """Write `results/REPORT.md` when the config has a `study` section; return its path."""
    study = config.get("study")
    if not study:
        return None
    by_ref = group_records(records)
    by_run = {r["run_id"]: r for r in records}
    metrics = _metric_names(records)
    code = sorted({r.get("code_version", "?") for r in records})
    margin = float(study.get("equivalence_margin", V.DEFAULT_MARGIN))
    seeds = sorted({train_seed(r) for r in records})
    several = any(len(g) > 1 for g in by_ref.values())
    groups = sorted({run_group(r) for r in records})
    if several:
        noise = (f"Each run is trained once per training seed ({', '.join(map(str, seeds))}); metrics are mean ± std "
                 "over training seeds (n shown) of each seed's mean over its sampling seeds of the final EMA "
                 "weights; a run trained once shows mean ± std over its sampling seeds.")
    else:
        noise = ("Metrics are mean ± std over the sampling seeds of each run's final EMA weights; each run is "
                 "trained once, so the error bars are sampling noise only.")
    parts = [
        f"# {config['name']}: results at a glance",
        "",
        f"Scenario `{config['name']}` ({len(groups)} runs, {len(records)} trainings, code version "
        f"{', '.join(code)}). {noise} `fd_evaluator` is a Fréchet distance on the offline evaluator's features "
        "(lower is better), not Inception FID; `cond_accuracy` is the share of samples the evaluator assigns to "
        "their conditioning class. Protocol details: `metrics/<run>.json`.",
        "",
    ]
    if "architectures" in study:
        parts += ["## Architectures (the paper's Table 1 layout)", "",
                  architecture_section(study, by_ref, metrics, config), "",
                  "The last column is each architecture's own published number at paper scale, for orientation "
                  "only: it is not comparable to the toy-scale values beside it.", ""]
    if study.get("ablations"):
        parts += ["## Ablations", "",
                  "Δ = variant − baseline with its 95% interval: paired t over training seeds where both runs "
                  "share them, Welch t otherwise; † = interval from sampling seeds only (a run trained once).", ""]
        for name, spec in study["ablations"].items():
            parts += [ablation_section(name, spec, by_ref, metrics, margin), ""]
    # computed once: the efficiency table and claim 6's compute evidence both read it
    efficiency = efficiency_costs(study["efficiency"], by_ref, by_run, config) if "efficiency" in study else None
    if efficiency is not None:
        parts += ["## Training efficiency", "", efficiency_section(study["efficiency"]["metric"], efficiency), ""]
    plots = [("metric vs. training step, every run", "plots/curves.png"),
             ("guidance sweeps", "plots/guidance.png"),
             ("transfer vs. scratch", "tables/transfer_vs_scratch.md"),
             ("all runs", "tables/runs.md"),
             ("all runs, one row per training seed", "tables/runs_per_seed.csv")]
    parts += ["## Plots and tables", ""]
    parts += [f"- [{label}]({path})" for label, path in plots if (results / path).exists()]
    parts += [f"- samples of `{r['run_id']}`: [{Path(r['sample_grid']).name}](plots/{Path(r['sample_grid']).name})"
              for r in records if r.get("sample_grid") and (results / "plots" / Path(r["sample_grid"]).name).exists()]
    parts += ["", "## Claims checklist", "", method_paragraph(study, seeds, several), "",
              claims_section(study, by_ref, _arch_ranking(study, by_ref), efficiency, by_run, config), ""]
    path = results / "REPORT.md"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path

