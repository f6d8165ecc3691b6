"""Training efficiency: images seen and training FLOPs to reach one metric level (claim 6), per training
seed, charging a transferred run for its pre-training."""
from __future__ import annotations

import numpy as np

from .metrics import registry
from .seed_groups import as_group, markdown_table, train_seed


def first_reach(record: dict, metric: str, level: float) -> int | None:
    """First snapshot step whose metric is at least as good as `level` (curve points: one seed, final: all)."""
    sign = registry.better_sign(metric)
    for point in sorted(record.get("curve", []), key=lambda p: p["step"]):
        if metric in point and sign * (point[metric] - level) >= 0:
            return int(point["step"])
    return None


def step_before(record: dict, metric: str, step: int | None) -> int:
    """The last snapshot step before `step` that scored `metric` (0: none, the run's start); with `step`
    None (never reached), the run's last step. Reaching is known only between these two snapshots."""
    if step is None:
        return int(record["step"])
    earlier = [int(p["step"]) for p in record.get("curve", []) if metric in p and p["step"] < step]
    return max(earlier, default=0)


def efficiency_costs(spec: dict, by_ref: dict, by_run: dict, config: dict) -> tuple[float | None, dict]:
    """(level, {run ref: {training seed: (first step reaching it or None, images seen, training FLOPs or
    None, training FLOPs at the snapshot before or None)}}). The level is the worst final value over every
    training seed of the compared runs, so every record reaches it by its last snapshot; transferred runs
    are charged for their pre-training (the init run of the same seed, `init_run`). The last element bounds
    the cost from below (`step_before`; a seed that never reached the level: its total cost)."""
    metric = spec["metric"]
    groups = {ref: as_group(by_ref.get(ref)) for ref in spec["runs"]}
    if len(groups) < 2 or any(g is None for g in groups.values()):
        return None, {}
    finals = [r["metrics"][metric]["mean"] for g in groups.values() for r in g if metric in r.get("metrics", {})]
    if len(finals) != sum(len(g) for g in groups.values()):
        return None, {}
    level = min(finals) if registry.better_sign(metric) > 0 else max(finals)
    def batch(record: dict) -> int:  # a recipe's own batch (`recipes.<name>.training`), else `training`
        own = (config["recipes"].get(record["recipe"], {}).get("training") or {}).get("batch_size")
        return own or config["training"]["batch_size"]

    def cost(record: dict, steps: int) -> tuple[int, float | None]:
        images = steps * batch(record)
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
            before = cost(rec, step_before(rec, metric, step))[1]
            reached = (step, *cost(rec, step)) if step is not None else (None, None, None)
            out[ref][train_seed(rec)] = (*reached, before)
    return level, out


def per_seed_costs(efficiency, ref: str) -> dict:
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
        seeds = per_seed_costs(efficiency, ref)
        reached = [c for c in seeds.values() if c[0] is not None]
        count = f"{len(reached)} of {len(seeds)}"
        if not reached:
            rows.append([f"`{ref}`", "not reached", "—", "—", count])
        elif len(seeds) == 1:
            step, images, flops = reached[0][:3]
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
    return note + markdown_table(header, rows)
