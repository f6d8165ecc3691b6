"""`results/REPORT.md`: the page a researcher reads first, answering the paper's questions at a glance.

Built from the metrics JSONs and the config's `study` section only (no checkpoints), so it regenerates
wherever the small results are checked out. It holds: the architecture table in the layout of the paper's
Table 1 (with the architectures' own published numbers beside ours, labelled), one table per ablation with
deltas against its baseline, a training-efficiency table, links to the plots, and a checklist of the
claims in PAPER.md with the evidence each verdict rests on.

Tables show groups of records over training seeds (`ldm.seed_groups`); the claims checklist is
`ldm.claims`, the efficiency table `ldm.efficiency`.
"""
from __future__ import annotations

from pathlib import Path

from . import verdicts as V
from .claim_items import val_loss_refusal
from .claims import claims_section, draws_section, method_paragraph
from .efficiency import efficiency_costs, efficiency_section
from .provenance import atomic_write_bytes
from .variance_components import variance_section
from .seed_groups import (compare, format_delta, format_stat, group_records, group_stat, instrument_mismatch,
                          markdown_table, metric_names, run_group, train_seed)



def _under_results(path: str) -> Path:
    """A record's sample grid relative to the results folder (records store it from the working directory:
    `results/plots/samples/<run>.png` -> `plots/samples/<run>.png`; older ones `plots/samples_<run>.png`)."""
    parts = Path(path).parts
    return Path(*parts[max(i for i, part in enumerate(parts) if part == "plots"):])

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
    return markdown_table(header, rows)


def ablation_section(name: str, spec: dict, by_ref: dict, metrics: list[str],
                     default_margin: float = V.DEFAULT_MARGIN, config: dict | None = None) -> str:
    base = by_ref.get(spec["baseline"])
    header = ["run", *metrics, *[f"Δ {m} vs baseline [95% CI]" for m in metrics]]
    rows = []
    for ref in [spec["baseline"], *spec["variants"]]:
        rec = by_ref.get(ref)
        cells = [format_stat(group_stat(rec, m)) for m in metrics]
        if ref == spec["baseline"]:
            deltas = ["baseline"] * len(metrics)
        else:
            deltas = ["not comparable (val_loss: another schedule or objective)"
                      if m == "val_loss" and val_loss_refusal(config, [spec["baseline"], ref])
                      else format_delta(compare(base, rec, m, default_margin=default_margin)) for m in metrics]
        rows.append([f"`{ref}`", *cells, *deltas])
    title = f"### {name}\n{spec.get('question', '')}\n\n"
    return title + markdown_table(header, rows)


def write_study_report(config: dict, records: list[dict], results: Path) -> Path | None:
    """Write `results/REPORT.md` when the config has a `study` section; return its path."""
    study = config.get("study")
    if not study:
        return None
    by_ref = group_records(records)
    by_run = {r["run_id"]: r for r in records}
    metrics = metric_names(records)
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
        stage = study["architectures"]["stages"][-1]
        groups = [by_ref.get(f"{r}/{stage}") for r in study["architectures"]["recipes"]]
        apart = [r for r, g in zip(study["architectures"]["recipes"], groups)
                 if instrument_mismatch([groups[0], g], "fd_evaluator")]
        parts += ["## Architectures (the paper's Table 1 layout)", "",
                  architecture_section(study, by_ref, metrics, config), ""]
        if apart:
            parts += [f"Not comparable with the first row (other autoencoder or evaluator weights, see "
                      f"`metrics/<run>.json`): {', '.join(apart)}.", ""]
        parts += ["The last column is each architecture's own published number at paper scale, for orientation "
                  "only: it is not comparable to the toy-scale values beside it.", ""]
    if study.get("ablations"):
        parts += ["## Ablations", "",
                  "Δ = variant − baseline with its 95% interval: paired t over training seeds where both runs "
                  "share them, Welch t otherwise; † = interval from sampling seeds only (a run trained once).", ""]
        for name, spec in study["ablations"].items():
            parts += [ablation_section(name, spec, by_ref, metrics, margin, config), ""]
    # computed once: the efficiency table and claim 6's compute evidence both read it
    efficiency = efficiency_costs(study["efficiency"], by_ref, by_run, config) if "efficiency" in study else None
    if efficiency is not None:
        spec = study["efficiency"]
        mismatch = instrument_mismatch([by_ref.get(ref) for ref in spec["runs"]], spec["metric"])
        table = f"(not comparable: these runs were {mismatch})" if mismatch else efficiency_section(spec["metric"],
                                                                                                   efficiency)
        parts += ["## Training efficiency", "", table, ""]
    plots = [("metric vs. training step, every run", "plots/curves.png"),
             ("training loss and gradient norm vs. step", "plots/loss.png"),
             ("guidance sweeps", "plots/guidance.png"),
             ("transfer vs. scratch", "tables/transfer_vs_scratch.md"),
             ("all runs", "tables/runs.md"),
             ("all runs, one row per training seed", "tables/runs_per_seed.csv")]
    parts += ["## Plots and tables", ""]
    parts += [f"- [{label}]({path})" for label, path in plots if (results / path).exists()]
    for r in records:
        grid = _under_results(r["sample_grid"]) if r.get("sample_grid") else None
        if grid is not None and (results / grid).exists():
            parts.append(f"- samples of `{r['run_id']}`: [{grid.name}]({grid.as_posix()})")
            # text-to-image grids: the prompt of each image, in grid order (row by row)
            parts += [f"  {k + 1}. {prompt[:120]}" for k, prompt in enumerate(r.get("sample_grid_prompts") or [])]
    if several:
        parts += ["", "## Variance components", "", variance_section(by_ref, metrics)]
    parts += ["", "## Claims checklist", "", method_paragraph(study, seeds, several), "",
              claims_section(study, by_ref, efficiency, by_run, config), ""]
    if study.get("draws"):
        parts += ["## Replication across draws of training seeds", "", draws_section(study, records, config), ""]
    path = results / "REPORT.md"
    atomic_write_bytes(path, "\n".join(parts).encode())
    return path

