"""`results/REPORT.md`: the page a researcher reads first, answering the paper's questions at a glance.

Built from the metrics JSONs and the config's `study` section only (no checkpoints), so it regenerates
wherever the small results are checked out. It holds: the architecture table in the layout of the paper's
Table 1 (with the architectures' own published numbers beside ours, labelled), one table per ablation with
deltas against its baseline, a training-efficiency table, links to the plots, and a checklist of the
claims in PAPER.md with the evidence each verdict rests on.

Verdicts compare two runs on one metric: the difference of their means against its standard error
(sampling seeds of each run, combined in quadrature). "supported" needs the claimed direction by more than
two standard errors, "contradicted" the opposite, anything else is "inconclusive". Every run is one
training run: the error bars measure sampling noise, not training-seed noise, and the report says so.
"""
from __future__ import annotations

import math
from pathlib import Path

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



def _better_sign(metric: str) -> int:
    """+1 where larger is better, -1 where smaller is better (the registry's direction; unknown names raise)."""
    return registry.better_sign(metric)


def _stat(record: dict | None, metric: str) -> tuple[float, float, int] | None:
    if record is None or metric not in record.get("metrics", {}):
        return None
    s = record["metrics"][metric]
    n = len(s.get("per_seed", [])) or len(record.get("seeds", [])) or 1
    return float(s["mean"]), float(s["std"]), n


def _fmt(stat: tuple[float, float, int] | None, digits: int = 3) -> str:
    return "n/a" if stat is None else f"{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}"


def compare(baseline: dict | None, variant: dict | None, metric: str) -> dict:
    """Variant minus baseline, its standard error, and the verdict for "baseline is better"."""
    a, b = _stat(baseline, metric), _stat(variant, metric)
    if a is None or b is None:
        return {"verdict": "not tested", "delta": None, "se": None}
    delta = b[0] - a[0]
    se = math.sqrt(a[1] ** 2 / a[2] + b[1] ** 2 / b[2])
    advantage = -delta * _better_sign(metric)  # > 0 when the baseline is better
    if se == 0:
        verdict = "inconclusive" if advantage == 0 else ("supported" if advantage > 0 else "contradicted")
    else:
        verdict = "supported" if advantage > 2 * se else "contradicted" if advantage < -2 * se else "inconclusive"
    return {"verdict": verdict, "delta": delta, "se": se}


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
            row += [_fmt(_stat(by_ref.get(f"{recipe}/{stage}"), m)) for m in metrics]
        value, source = published.get(rcfg["arch"], (None, ""))
        row.append(f"{value} ({source})" if value is not None else (source or "—"))
        rows.append(row)
    return _table(header, rows)


def ablation_section(name: str, spec: dict, by_ref: dict, metrics: list[str]) -> str:
    base = by_ref.get(spec["baseline"])
    header = ["run", *metrics, *[f"Δ {m} vs baseline" for m in metrics]]
    rows = []
    for ref in [spec["baseline"], *spec["variants"]]:
        rec = by_ref.get(ref)
        cells = [_fmt(_stat(rec, m)) for m in metrics]
        if ref == spec["baseline"]:
            deltas = ["baseline"] * len(metrics)
        else:
            deltas = []
            for m in metrics:
                c = compare(base, rec, m)
                deltas.append("n/a" if c["delta"] is None else f"{c['delta']:+.3f} ± {c['se']:.3f}")
        rows.append([f"`{ref}`", *cells, *deltas])
    title = f"### {name}\n{spec.get('question', '')}\n\n"
    return title + _table(header, rows)


def first_reach(record: dict, metric: str, level: float) -> int | None:
    """First snapshot step whose metric is at least as good as `level` (curve points: one seed, final: all)."""
    sign = _better_sign(metric)
    for point in sorted(record.get("curve", []), key=lambda p: p["step"]):
        if metric in point and sign * (point[metric] - level) >= 0:
            return int(point["step"])
    return None


def efficiency_costs(spec: dict, by_ref: dict, by_run: dict, config: dict) -> tuple[float | None, dict]:
    """(level, {run ref: (first step reaching it or None, images seen, training FLOPs or None)})."""
    metric = spec["metric"]
    records = {ref: by_ref.get(ref) for ref in spec["runs"]}
    finals = [_stat(r, metric) for r in records.values()]
    if len(finals) < 2 or any(f is None for f in finals):
        return None, {}
    level = min(f[0] for f in finals) if _better_sign(metric) > 0 else max(f[0] for f in finals)
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
    for ref, rec in records.items():
        step = first_reach(rec, metric, level)
        out[ref] = (step, *cost(rec, step)) if step is not None else (None, None, None)
    return level, out


def efficiency_section(metric: str, efficiency: tuple[float | None, dict]) -> str:
    """Images seen (and training FLOPs where the metrics carry the model's cost) to reach one metric level:
    the worst final value among the compared runs, so that every run reaches it. Transferred runs are
    charged for their pre-training too. `efficiency` is `efficiency_costs`'s result."""
    level, costs = efficiency
    if level is None:
        return f"(not enough runs with `{metric}` yet)"
    rows = []
    for ref, (step, images, flops) in costs.items():
        if step is None:
            rows.append([f"`{ref}`", "not reached", "—", "—"])
        else:
            rows.append([f"`{ref}`", str(step), f"{images:,}", "n/a" if flops is None else f"{flops:.3g}"])
    header = ["run", "first snapshot step reaching it", "images seen (incl. pre-training)", "training FLOPs"]
    note = (f"Level: `{metric}` = {level:.3f} (the worst final value among these runs). Steps are snapshot "
            f"steps, so reaching is resolved only to the snapshot spacing; snapshots before the last are "
            f"scored on one sampling seed.\n\n")
    return note + _table(header, rows)


def _compute_evidence(efficiency: tuple[float | None, dict] | None, baseline: str, variant: str):
    """Training-FLOPs ratio baseline / variant to reach the efficiency level, when both reached it."""
    if not efficiency or efficiency[0] is None:
        return None
    costs = efficiency[1]
    (_, _, fb), (_, _, fv) = costs.get(baseline, (None,) * 3), costs.get(variant, (None,) * 3)
    return None if not fb or not fv else fb / fv


def claims_section(study: dict, by_ref: dict, arch_order: list[tuple[str, float]] | None,
                   efficiency: tuple[float | None, dict] | None = None) -> str:
    """Claim 6 is about compute: a quality win at equal high-res steps counts as "supported" only when
    the baseline also reached the efficiency level with clearly less training compute (< 0.9x)."""
    rows = []
    for number, text in CLAIMS.items():
        items = study.get("claims", {}).get(number, [])
        if number == "8" and arch_order:
            ours = " < ".join(a for a, _ in arch_order)
            rows.append([number, text, "tested at toy scale",
                         f"fd_evaluator ranking here (best first): {ours}; own papers (ImageNet-256 FID): mdt < dit < unet"])
            continue
        if not items:
            rows.append([number, text, "not tested at this scale", "no run pair in this grid"])
            continue
        verdicts, evidence = [], []
        for item in items:
            c = compare(by_ref.get(item["baseline"]), by_ref.get(item["variant"]), item["metric"])
            verdicts.append(c["verdict"])
            delta = "n/a" if c["delta"] is None else f"Δ = {c['delta']:+.3f} ± {c['se']:.3f}"
            evidence.append(f"`{item['variant']}` vs `{item['baseline']}` on {item['metric']}: {delta} ({c['verdict']})")
        if number == "6" and items:
            ratio = _compute_evidence(efficiency, items[0]["baseline"], items[0]["variant"])
            if ratio is not None:
                evidence.append(f"training FLOPs to reach the efficiency level: {ratio:.2f}x of `{items[0]['variant']}`")
                if ratio >= 0.9:
                    verdicts = ["partly supported" if v == "supported" else v for v in verdicts]
        if all(v == "not tested" for v in verdicts):
            verdict = "not tested at this scale"
        elif "partly supported" in verdicts:
            verdict = "partly supported"
        elif all(v == "supported" for v in verdicts if v != "not tested"):
            verdict = "supported"
        elif all(v == "contradicted" for v in verdicts if v != "not tested"):
            verdict = "not supported"
        elif "supported" in verdicts and "contradicted" not in verdicts:
            verdict = "partly supported"
        else:
            verdict = "inconclusive" if "contradicted" not in verdicts else "not supported"
        rows.append([number, text, verdict, "; ".join(evidence)])
    return _table(["#", "claim (PAPER.md)", "verdict here", "evidence"], rows)


def _arch_ranking(study: dict, by_ref: dict) -> list[tuple[str, float]] | None:
    spec = study.get("architectures")
    if not spec:
        return None
    stage = spec["stages"][-1]
    scored = [(r, _stat(by_ref.get(f"{r}/{stage}"), "fd_evaluator")) for r in spec["recipes"]]
    scored = [(r, s[0]) for r, s in scored if s is not None]
    return sorted(scored, key=lambda x: x[1]) or None


def write_study_report(config: dict, records: list[dict], results: Path) -> Path | None:
    """Write `results/REPORT.md` when the config has a `study` section; return its path."""
    study = config.get("study")
    if not study:
        return None
    by_ref = {f"{r['recipe']}/{r['stage']}": r for r in records}
    by_run = {r["run_id"]: r for r in records}
    metrics = _metric_names(records)
    code = sorted({r.get("code_version", "?") for r in records})
    parts = [
        f"# {config['name']}: results at a glance",
        "",
        f"Scenario `{config['name']}` ({len(records)} runs, code version {', '.join(code)}). "
        "Metrics are mean ± std over the sampling seeds of each run's final EMA weights; each run is trained "
        "once, so the error bars are sampling noise only. `fd_evaluator` is a Fréchet distance on the "
        "offline evaluator's features (lower is better), not Inception FID; `cond_accuracy` is the share of "
        "samples the evaluator assigns to their conditioning class. Protocol details: `metrics/<run>.json`.",
        "",
    ]
    if "architectures" in study:
        parts += ["## Architectures (the paper's Table 1 layout)", "",
                  architecture_section(study, by_ref, metrics, config), "",
                  "The last column is each architecture's own published number at paper scale, for orientation "
                  "only: it is not comparable to the toy-scale values beside it.", ""]
    if study.get("ablations"):
        parts += ["## Ablations", ""]
        for name, spec in study["ablations"].items():
            parts += [ablation_section(name, spec, by_ref, metrics), ""]
    # computed once: the efficiency table and claim 6's compute evidence both read it
    efficiency = efficiency_costs(study["efficiency"], by_ref, by_run, config) if "efficiency" in study else None
    if efficiency is not None:
        parts += ["## Training efficiency", "", efficiency_section(study["efficiency"]["metric"], efficiency), ""]
    plots = [("metric vs. training step, every run", "plots/curves.png"),
             ("guidance sweeps", "plots/guidance.png"),
             ("transfer vs. scratch", "tables/transfer_vs_scratch.md"),
             ("all runs", "tables/runs.md")]
    parts += ["## Plots and tables", ""]
    parts += [f"- [{label}]({path})" for label, path in plots if (results / path).exists()]
    parts += [f"- samples of `{r['run_id']}`: [{Path(r['sample_grid']).name}](plots/{Path(r['sample_grid']).name})"
              for r in records if r.get("sample_grid") and (results / "plots" / Path(r["sample_grid"]).name).exists()]
    parts += ["", "## Claims checklist", "",
              "Verdicts: the claimed direction by more than two standard errors is *supported*, the opposite "
              "*not supported*, anything between *inconclusive*.", "",
              claims_section(study, by_ref, _arch_ranking(study, by_ref), efficiency), ""]
    path = results / "REPORT.md"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path
