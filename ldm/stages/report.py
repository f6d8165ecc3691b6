"""`ldm report`: comparison tables (markdown + CSV) and plots from the metrics JSONs of a scenario.

Reads only `results/metrics/*.json` (the DVC `report` stage depends on nothing else), so the report can
be rebuilt anywhere the small results are checked out. Every metric is shown as mean ± std over the
sampling seeds; runs with a guidance sweep get one combined sweep figure (`plots/guidance.png`: fd_evaluator
and cond_accuracy against the semantic scale, the chosen scale marked) and a table of chosen scales.
"""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from ..config import load_scenario  # noqa: E402
from ..layout import Layout  # noqa: E402
from ..metrics.registry import curve_metrics, direction_word, lower_is_better  # noqa: E402
from ..provenance import atomic_write_bytes, atomic_write_json  # noqa: E402
from ..spec import expand_runs  # noqa: E402
from ..study import write_study_report  # noqa: E402

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


def _fmt(stats: dict) -> str:
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def runs_table(records: list[dict]) -> pd.DataFrame:
    rows = []
    for rec in records:
        row = {"run": rec["run_id"], "recipe": rec["recipe"], "stage": rec["stage"], "resolution": rec["resolution"],
               "init": rec["init_run"] or "", "step": rec["step"], "samples_per_seed": rec["num_samples"],
               "seeds": len(rec["seeds"]), "chance_accuracy": rec["chance_accuracy"]}
        for name, stats in rec["metrics"].items():
            row[name] = stats["mean"]
            row[f"{name}_std"] = stats["std"]
        if "guidance_sweep" in rec:
            row["chosen_guidance"] = rec["guidance_sweep"]["chosen_scale"]
        rows.append(row)
    return pd.DataFrame(rows)


def transfer_table(config: dict, records: list[dict]) -> pd.DataFrame:
    """Each stage initialised from another against every from-scratch stage at the same resolution, for the
    recipes that ran both (recipes may run a subset of the stages)."""
    by_key = {(r["recipe"], r["stage"]): r for r in records}
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
                row = {"recipe": recipe, "resolution": a["resolution"], "transfer": name, "scratch": other,
                       "transfer_steps": spec["steps"], "scratch_steps": other_spec["steps"],
                       "pretrain_steps": stages[spec["init"]]["steps"], "pos_embed": spec["pos_embed"]}
                for metric in a["metrics"]:
                    row[f"{metric} (transfer)"] = _fmt(a["metrics"][metric])
                    row[f"{metric} (scratch)"] = _fmt(b["metrics"][metric])
                    delta = a["metrics"][metric]["mean"] - b["metrics"][metric]["mean"]
                    row[f"{metric} delta"] = round(delta, 4)
                    better = delta < 0 if lower_is_better(metric) else delta > 0
                    row[f"{metric} transfer better"] = "yes" if better else "no"
                rows.append(row)
    return pd.DataFrame(rows)


def write_table(frame: pd.DataFrame, stem: Path, title: str) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(stem.with_suffix(".csv"), frame.to_csv(index=False).encode())
    body = frame.to_markdown(index=False, floatfmt=".4f") if not frame.empty else "(no rows)"
    atomic_write_bytes(stem.with_suffix(".md"), f"# {title}\n\n{body}\n".encode())


def plot_curves(records: list[dict], path: Path) -> None:
    metrics = [m for m in CURVE_METRICS if m in records[0]["metrics"]]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for rec in records:
            steps = [p["step"] for p in rec["curve"]]
            mean = [p[metric] for p in rec["curve"]]
            std = [p[f"{metric}_std"] for p in rec["curve"]]  # 0 where a snapshot had one seed
            ax.errorbar(steps, mean, yerr=std, marker="o", capsize=3, label=rec["run_id"])
        _finish_axes(ax, metric, records[0]["chance_accuracy"], "training steps of the run's own stage")
    _save_figure(fig, "metric vs. training step (first sampling seed; final point: mean ± std over all seeds)", path)


def _finish_axes(ax, metric: str, chance: float, xlabel: str) -> None:
    """Labels with the metric's direction, chance level on accuracy axes, grid and legend."""
    if metric == "cond_accuracy":
        ax.axhline(chance, color="gray", linestyle=":", label="chance")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} ({direction_word(metric)} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _save_figure(fig, title: str, path: Path) -> None:
    """Title, layout and an atomic PNG write without the matplotlib version in its metadata (stable bytes)."""
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)


def plot_guidance_sweeps(records: list[dict], path: Path) -> bool:
    """fd_evaluator and cond_accuracy vs. semantic guidance scale, one line per run, chosen scale marked."""
    swept = [r for r in records if r.get("guidance_sweep")]
    if not swept:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), squeeze=False)
    for ax, metric in zip(axes[0], ("fd_evaluator", "cond_accuracy")):
        for rec in swept:
            sweep = rec["guidance_sweep"]
            line, = ax.plot(sweep["scales"], sweep[metric], marker="o", label=rec["run_id"])
            chosen = sweep["scales"].index(sweep["chosen_scale"])
            ax.plot([sweep["chosen_scale"]], [sweep[metric][chosen]], marker="*", markersize=14,
                    color=line.get_color())
        _finish_axes(ax, metric, swept[0]["chance_accuracy"], "semantic guidance scale")
    _save_figure(fig, "guidance sweep (final weights, first sampling seed; star: chosen = lowest fd_evaluator)", path)
    return True


def guidance_table(records: list[dict]) -> pd.DataFrame:
    rows = []
    for rec in records:
        sweep = rec.get("guidance_sweep")
        if not sweep:
            continue
        for g, fd, acc in zip(sweep["scales"], sweep["fd_evaluator"], sweep["cond_accuracy"]):
            rows.append({"run": rec["run_id"], "guidance": g, "fd_evaluator": fd, "cond_accuracy": acc,
                         "chosen": "yes" if g == sweep["chosen_scale"] else ""})
    return pd.DataFrame(rows)


def build_report(config: dict) -> dict:
    layout = Layout.of(config)
    records = load_metrics(config)
    runs = runs_table(records)
    write_table(runs, layout.table("runs"), f"All runs ({config['name']})")
    transfer = transfer_table(config, records)
    write_table(transfer, layout.table("transfer_vs_scratch"),
                "Low-res pre-training + transfer vs. from scratch at equal high-res steps")
    plot_curves(records, layout.plot("curves.png"))
    if plot_guidance_sweeps(records, layout.plot("guidance.png")):
        write_table(guidance_table(records), layout.table("guidance_sweep"),
                    "Guidance sweep (final weights, first seed)")
    for rec in records:  # per-run curve data for `dvc plots`
        atomic_write_bytes(layout.plot("curves") / f"{rec['run_id']}.csv",
                           pd.DataFrame(rec["curve"]).to_csv(index=False).encode())
    summary = {rec["run_id"]: {name: round(stats["mean"], 6) for name, stats in rec["metrics"].items()}
               for rec in records}
    for rec in records:
        if rec.get("guidance_sweep"):
            summary[rec["run_id"]]["chosen_guidance"] = rec["guidance_sweep"]["chosen_scale"]
    write_study_report(config, records, layout.results)  # REPORT.md, when the config has a `study` section
    atomic_write_json(layout.summary, summary)
    return summary


def run(args) -> None:
    print(json.dumps(build_report(load_scenario(args.config).config), indent=2))
