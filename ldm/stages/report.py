"""`ldm report`: comparison tables (markdown + CSV) and plots from the metrics JSONs of a scenario.

Reads only `results/metrics/*.json` (the DVC `report` stage depends on nothing else), so the report can
be rebuilt anywhere the small results are checked out. With training seeds (`train_seeds`) a grid run has
one record per seed, sharing a `run_group`; the runs table, transfer table, curves and sweep figure show one
entry per run group: mean ± std over training seeds (each seed's value being its mean over sampling seeds),
and for a run trained once mean ± std over its sampling seeds, as before. Per-seed rows stay in
`tables/runs_per_seed.csv`, every run's curve points in one long table `plots/curves.csv` (a `run` column; what
`dvc plots show` overlays, one line per run, through `dvc_plots/by_run.json`), and one flat file of final numbers
per run in `summary/<run id>.json` (`dvc metrics show`: one row per run, one column per metric; `summary.json`
holds the same numbers in one file for scripts). Runs with a guidance sweep get
one combined sweep figure (`plots/guidance.png`: fd_evaluator and cond_accuracy against the semantic scale, the
chosen scale marked, the joint-scale sweep dashed) and a table of every sweep point.
One exception to "only the metrics": the training logs (`runs/<run>/log.jsonl` in the workdir), read when they
are there, give `plots/loss.png` (loss and gradient norm vs. step per run group) and `plots/loss.csv` (every
logged value of every run, a `run` column, for `dvc plots show`).
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..config import load_scenario  # noqa: E402
from ..layout import Layout  # noqa: E402
from ..metrics.registry import curve_metrics, direction_word, lower_is_better  # noqa: E402
from ..provenance import atomic_write_bytes, atomic_write_json  # noqa: E402
from ..seed_groups import compare, format_stat, group_records, group_stat, run_group, train_seed  # noqa: E402
from ..spec import expand_runs  # noqa: E402
from ..html_report import write_html_report  # noqa: E402
from ..study import write_study_report  # noqa: E402
from ..verdicts import DEFAULT_MARGIN  # noqa: E402

SWEEP_KEYS = ("guidance_sweep", "guidance_sweep_joint")  # a record's guidance sweeps: two-scale, joint scale

CURVE_METRICS = curve_metrics()  # registry order; directions: ldm.metrics.registry (unknown names raise)


def load_metrics(config: dict) -> list[dict]:
    layout = Layout.of(config)
    records = []
    for run in expand_runs(config):
        path = layout.metrics(run.run_id)
        if not path.exists():
            raise FileNotFoundError(f"metrics of run {run.run_id} missing: {path} (run the pipeline first)")
        records.append(json.loads(path.read_text()))
    return records


def _groups(records: list[dict]) -> dict[str, list[dict]]:
    """{run group: its records ordered by training seed}, groups in the records' (grid) order; a run trained
    once is a group of one (records without `run_group` are their own group)."""
    out: dict[str, list[dict]] = {}
    for rec in records:
        out.setdefault(run_group(rec), []).append(rec)
    return {g: sorted(recs, key=train_seed) for g, recs in out.items()}


def runs_per_seed_table(records: list[dict]) -> pd.DataFrame:
    """One row per training run (per training seed): mean ± std over its sampling seeds."""
    rows = []
    for rec in records:
        row = {"run": rec["run_id"], "run_group": run_group(rec), "train_seed": train_seed(rec),
               "recipe": rec["recipe"], "stage": rec["stage"], "resolution": rec["resolution"],
               "init": rec["init_run"] or "", "step": rec["step"], "samples_per_seed": rec["num_samples"],
               "seeds": len(rec["seeds"]), "chance_accuracy": rec["chance_accuracy"]}
        for name, stats in rec["metrics"].items():
            row[name] = stats["mean"]
            row[f"{name}_std"] = stats["std"]
        if "guidance_sweep" in rec:
            row["chosen_guidance"] = rec["guidance_sweep"]["chosen_scale"]
        rows.append(row)
    return pd.DataFrame(rows)


def _one(values: list):
    """The common value of a list, or its distinct values joined (seeds that differ say so)."""
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else ",".join(map(str, distinct))


def runs_table(records: list[dict]) -> pd.DataFrame:
    """One row per run group: each metric's mean over training seeds (of each seed's mean over sampling
    seeds) and its std over training seeds; for a run trained once, mean ± std over its sampling seeds
    (`std_over` says which). Per-seed rows: `runs_per_seed_table`."""
    by_run = {r.get("run_id"): r for r in records}
    rows = []
    for group, recs in _groups(records).items():
        first = recs[0]
        init = first["init_run"]
        row = {"run": group, "recipe": first["recipe"], "stage": first["stage"], "resolution": first["resolution"],
               "init": run_group(by_run[init]) if init in by_run else (init or ""),
               "step": _one([r["step"] for r in recs]), "samples_per_seed": _one([r["num_samples"] for r in recs]),
               "seeds": _one([len(r["seeds"]) for r in recs]), "train_seeds": len(recs),
               "train_seed_list": ",".join(str(train_seed(r)) for r in recs),
               "std_over": "training seeds" if len(recs) > 1 else "sampling seeds",
               "chance_accuracy": first["chance_accuracy"]}
        names = list(dict.fromkeys(n for r in recs for n in r["metrics"]))
        for name in names:
            values = [r["metrics"][name]["mean"] for r in recs if name in r["metrics"]]
            row[name] = float(np.mean(values))
            if len(recs) > 1:
                row[f"{name}_std"] = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
            else:
                row[f"{name}_std"] = first["metrics"][name]["std"]
            if len(values) != len(recs):
                row[f"{name}_n"] = len(values)
        if any("guidance_sweep" in r for r in recs):
            row["chosen_guidance"] = _one([r["guidance_sweep"]["chosen_scale"] for r in recs if "guidance_sweep" in r])
        rows.append(row)
    return pd.DataFrame(rows)


def transfer_table(config: dict, records: list[dict]) -> pd.DataFrame:
    """Each stage initialised from another against every from-scratch stage at the same resolution, for the
    recipes that ran both (recipes may run a subset of the stages). Per run group: mean ± std over training
    seeds (n shown; a run trained once: over sampling seeds), the delta of the means (transfer - scratch), its
    95% interval and the verdict for "transfer is better" (`ldm.study.compare`, margin
    `study.equivalence_margin`)."""
    by_key = {tuple(ref.split("/")): group for ref, group in group_records(records).items()}
    margin = float((config.get("study") or {}).get("equivalence_margin", DEFAULT_MARGIN))
    stages = config["stages"]
    rows = []
    for recipe in config["recipes"]:
        for name, spec in stages.items():
            if not spec.get("init"):
                continue
            for other, other_spec in stages.items():
                if other_spec.get("init") or other_spec["resolution"] != spec["resolution"]:
                    continue
                if (recipe, name) not in by_key or (recipe, other) not in by_key:
                    continue
                a, b = by_key[(recipe, name)], by_key[(recipe, other)]
                row = {"recipe": recipe, "resolution": a[0]["resolution"], "transfer": name, "scratch": other,
                       "transfer_steps": spec["steps"], "scratch_steps": other_spec["steps"],
                       "pretrain_steps": stages[spec["init"]]["steps"], "pos_embed": spec["pos_embed"],
                       "train_seeds (transfer/scratch)": f"{len(a)}/{len(b)}"}
                for metric in a[0]["metrics"]:
                    row[f"{metric} (transfer)"] = format_stat(group_stat(a, metric))
                    row[f"{metric} (scratch)"] = format_stat(group_stat(b, metric))
                    c = compare(a, b, metric, default_margin=margin)  # baseline: transfer (the claimed better)
                    if c["delta"] is None:
                        continue
                    row[f"{metric} delta"] = round(-c["delta"], 4)
                    row[f"{metric} 95% CI"] = ("n/a" if c["lo"] is None else
                                               f"[{-c['hi']:+.4f}, {-c['lo']:+.4f}]"
                                               + ("" if c["result"].interval.training else " (sampling noise only)"))
                    better = c["delta"] > 0 if lower_is_better(metric) else c["delta"] < 0
                    row[f"{metric} transfer better"] = "yes" if better else "no"
                    row[f"{metric} verdict"] = c["label"]
                rows.append(row)
    return pd.DataFrame(rows)


def write_table(frame: pd.DataFrame, stem: Path, title: str) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(stem.with_suffix(".csv"), frame.to_csv(index=False).encode())
    body = frame.to_markdown(index=False, floatfmt=".4f") if not frame.empty else "(no rows)"
    atomic_write_bytes(stem.with_suffix(".md"), f"# {title}\n\n{body}\n".encode())


def _curve_points(recs: list[dict], metric: str) -> tuple[list, list, list]:
    """(steps, mean, error) of a run group's curve: with several training seeds the mean and std over the
    seeds at each step they share; with one, the run's own points (error: their std over sampling seeds,
    0 where a snapshot had one seed)."""
    if len(recs) == 1:
        curve = [p for p in recs[0]["curve"] if metric in p]
        return ([p["step"] for p in curve], [p[metric] for p in curve], [p.get(f"{metric}_std", 0.0) for p in curve])
    per_step: dict[int, list[float]] = {}
    for rec in recs:
        for p in rec["curve"]:
            if metric in p:
                per_step.setdefault(p["step"], []).append(p[metric])
    steps = sorted(s for s, v in per_step.items() if len(v) == len(recs))
    return (steps, [float(np.mean(per_step[s])) for s in steps],
            [float(np.std(per_step[s], ddof=1)) for s in steps])


def plot_curves(records: list[dict], path: Path) -> None:
    metrics = [m for m in CURVE_METRICS if m in records[0]["metrics"]]
    groups = _groups(records)
    several = any(len(recs) > 1 for recs in groups.values())
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for group, recs in groups.items():
            steps, mean, err = _curve_points(recs, metric)
            label = group if len(recs) == 1 else f"{group} (n={len(recs)})"
            ax.errorbar(steps, mean, yerr=err, marker="o", capsize=3, label=label)
        _finish_axes(ax, metric, records[0]["chance_accuracy"], "training steps of the run's own stage")
    title = "metric vs. training step (first sampling seed; final point: mean ± std over all seeds)"
    if several:
        title = ("metric vs. training step (mean ± std over training seeds, n in the legend; each seed: first "
                 "sampling seed, final point: mean over all)")
    _save_figure(fig, title, path)


#: the training log's curves in plots/loss.png (plots/loss.csv keeps every column of every run's log.jsonl)
LOG_CURVES = ("loss", "grad_norm")


def plot_training_logs(config: dict, records: list[dict], png: Path, csv: Path) -> bool:
    """Training loss and gradient norm vs. step of every run group (mean over training seeds at the steps they
    share), from the runs' `log.jsonl` in the workdir; and the long table of every logged value. False when no
    run has a log here (results copied without their workdir)."""
    layout = Layout.of(config)
    # json, not pd.read_json: pandas' default float parser rounds the last digits
    logs = [pd.DataFrame([json.loads(line) for line in layout.run(r["run_id"]).log.read_text().splitlines() if line])
            .assign(run=r["run_id"]) for r in records
            if layout.run(r["run_id"]).log.is_file() and layout.run(r["run_id"]).log.stat().st_size]
    if not logs:
        return False
    # a resumed run logs the steps after its snapshot again: the last record of a step is the one kept
    table = pd.concat(logs, ignore_index=True).drop_duplicates(["run", "step"], keep="last")
    atomic_write_bytes(csv, table[["run", *[c for c in table if c != "run"]]].to_csv(index=False).encode())
    groups = _groups(records)
    fig, axes = plt.subplots(1, len(LOG_CURVES), figsize=(5.5 * len(LOG_CURVES) + 4, 4 + 0.12 * len(groups)),
                             squeeze=False)
    for ax, column in zip(axes[0], LOG_CURVES):
        for group, recs in groups.items():
            runs = table[table["run"].isin([r["run_id"] for r in recs])]
            if runs.empty:
                continue
            shared = runs.groupby("step")[column].agg(["mean", "count"])
            shared = shared[shared["count"] == runs["run"].nunique()]
            ax.plot(shared.index, shared["mean"], label=group if runs["run"].nunique() == 1 else
                    f"{group} (n={runs['run'].nunique()})")
        ax.set(xlabel="training step of the run's own stage", ylabel=column, yscale="log")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)  # one legend for both panels, beside them
    fig.subplots_adjust(right=0.7)
    _save_figure(fig, "training log (each logged step: mean over the logging interval; mean over training seeds)",
                 png, tight=False)
    return True


def _finish_axes(ax, metric: str, chance: float, xlabel: str) -> None:
    """Labels with the metric's direction, chance level on accuracy axes, grid and legend."""
    if metric == "cond_accuracy" and chance is not None:  # None: caption-only data, no classes
        ax.axhline(chance, color="gray", linestyle=":", label="chance")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} ({direction_word(metric)} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save_figure(fig, title: str, path: Path, tight: bool = True) -> None:
    """Title, layout and an atomic PNG write without the matplotlib version in its metadata (stable bytes)."""
    fig.suptitle(title)
    if tight:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)


def _sweep_groups(records: list[dict]) -> list[tuple[str, str, list[dict]]]:
    """(run group, sweep key, the group's sweeps) for every group and sweep key present, in grid order."""
    out = []
    for group, recs in _groups(records).items():
        for key in SWEEP_KEYS:
            sweeps = [r[key] for r in recs if r.get(key)]
            if sweeps:
                out.append((group, key, sweeps))
    return out


def _mean_sweep(sweeps: list[dict], metric: str) -> tuple[list, list, list]:
    """(scales, mean, std over training seeds) of one group's sweeps (the first seed's scales; seeds with
    other scales are left out)."""
    scales = sweeps[0]["scales"]
    same = [s for s in sweeps if s["scales"] == scales]
    values = np.array([s[metric] for s in same], float)
    std = values.std(axis=0, ddof=1) if len(same) > 1 else np.zeros(len(scales))
    return scales, list(values.mean(axis=0)), list(std)


def plot_guidance_sweeps(records: list[dict], path: Path) -> bool:
    """fd_evaluator and cond_accuracy vs. semantic guidance scale, one line per run group (mean ± std over
    training seeds), the joint-scale sweep dashed, the chosen scale (lowest mean fd_evaluator) starred."""
    swept = _sweep_groups(records)
    if not swept:
        return False
    # cond_accuracy is None per scale on caption-only data (no classes): then fd_evaluator alone
    metrics = [m for m in ("fd_evaluator", "cond_accuracy")
               if all(v is not None for _, _, sweeps in swept for sweep in sweeps for v in sweep[m])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for group, key, sweeps in swept:
            scales, mean, std = _mean_sweep(sweeps, metric)
            label = group + (" (joint scale)" if key == "guidance_sweep_joint" else "") + (
                f" (n={len(sweeps)})" if len(sweeps) > 1 else "")
            line = ax.errorbar(scales, mean, yerr=std if len(sweeps) > 1 else None, marker="o", capsize=3,
                               label=label, linestyle="--" if key == "guidance_sweep_joint" else "-")
            chosen = int(np.argmin(_mean_sweep(sweeps, "fd_evaluator")[1]))
            ax.plot([scales[chosen]], [mean[chosen]], marker="*", markersize=14, color=line[0].get_color())
        _finish_axes(ax, metric, records[0]["chance_accuracy"], "semantic guidance scale")
    _save_figure(fig, "guidance sweep (final weights, first sampling seed; mean over training seeds; "
                      "star: lowest fd_evaluator; dashed: one joint scale)", path)
    return True


def guidance_table(records: list[dict]) -> pd.DataFrame:
    """Every sweep point of every training run (one row per run, sweep and scale)."""
    rows = []
    for rec in records:
        for key in SWEEP_KEYS:
            sweep = rec.get(key)
            if not sweep:
                continue
            for g, fd, acc in zip(sweep["scales"], sweep["fd_evaluator"], sweep["cond_accuracy"]):
                rows.append({"run": rec["run_id"], "run_group": run_group(rec), "train_seed": train_seed(rec),
                             "sweep": "joint" if key == "guidance_sweep_joint" else "semantic",
                             "guidance": g, "fd_evaluator": fd, "cond_accuracy": acc,
                             "chosen": "yes" if g == sweep.get("chosen_scale") else ""})
    return pd.DataFrame(rows)


def build_report(config: dict) -> dict:
    layout = Layout.of(config)
    records = load_metrics(config)
    runs = runs_table(records)
    write_table(runs, layout.table("runs"), f"All runs ({config['name']}; mean ± std over training seeds)")
    per_seed = layout.table("runs_per_seed").with_suffix(".csv")  # every training run, one row per seed
    per_seed.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(per_seed, runs_per_seed_table(records).to_csv(index=False).encode())
    transfer = transfer_table(config, records)
    write_table(transfer, layout.table("transfer_vs_scratch"),
                "Low-res pre-training + transfer vs. from scratch (each stage's steps in its columns)")
    plot_curves(records, layout.plot("curves.png"))
    plot_training_logs(config, records, layout.plot("loss.png"), layout.plot("loss.csv"))
    if plot_guidance_sweeps(records, layout.plot("guidance.png")):
        write_table(guidance_table(records), layout.table("guidance_sweep"),
                    "Guidance sweep (final weights, first seed)")
    curves = pd.concat([pd.DataFrame(rec["curve"]).assign(run=rec["run_id"]) for rec in records], ignore_index=True)
    atomic_write_bytes(layout.plot("curves.csv"), curves[["run", *[c for c in curves if c != "run"]]]
                       .to_csv(index=False).encode())
    summary = {rec["run_id"]: {name: round(stats["mean"], 6) for name, stats in rec["metrics"].items()}
               for rec in records}
    for rec in records:
        if rec.get("guidance_sweep"):
            summary[rec["run_id"]]["chosen_guidance"] = rec["guidance_sweep"]["chosen_scale"]
        if rec.get("weights_sha256"):  # beside the numbers in `dvc metrics show` / `dvc exp show`: which weights
            summary[rec["run_id"]]["weights_sha256"] = rec["weights_sha256"]
    write_study_report(config, records, layout.results)  # REPORT.md, when the config has a `study` section
    write_html_report(layout.results, f"{config['name']}: results")  # the same page, figures inside, for a browser
    for stale in (layout.results / "summary").glob("*.json"):
        if stale.stem not in summary:
            stale.unlink()
    for run_id, numbers in summary.items():
        atomic_write_json(layout.results / "summary" / f"{run_id}.json", numbers)
    atomic_write_json(layout.summary, summary)
    return summary


def run(args) -> None:
    print(json.dumps(build_report(load_scenario(args.config).config), indent=2))
