"""DVCLive curves of a training run: the same numbers as log.jsonl, and a resumed run shows no lost steps."""
from __future__ import annotations

import csv
import json

import pytest

from ldm.errors import ConfigError
from ldm.tracking import Trackers


def _records(steps):
    return [{"step": s, "loss": 1.0 / s, "grad_norm": 0.5, "lr": 1e-3, "images_per_s": 10.0 + s,
             "world_size": 1, "grad_accum": 1, "nonfinite_skips": 0} for s in steps]


def _tsv(run_dir, name):
    with open(run_dir / "dvclive" / "plots" / "metrics" / "train" / f"{name}.tsv") as handle:
        return [(int(row["step"]), float(row[name])) for row in csv.DictReader(handle, delimiter="\t")]


def test_dvclive_curves_follow_the_log_and_a_resume_drops_lost_steps(tmp_path):
    log = tmp_path / "log.jsonl"
    trackers = Trackers(["dvclive"], tmp_path, log)
    for record in _records([25, 50, 75]):  # as the trainer does: log.jsonl first, then the trackers
        log.open("a").write(json.dumps(record) + "\n")
        trackers.log(record)
    trackers.close()
    assert _tsv(tmp_path, "loss") == [(25, 1 / 25), (50, 1 / 50), (75, 1 / 75)]
    assert json.loads((tmp_path / "dvclive" / "metrics.json").read_text())["train"]["loss"] == 1 / 75
    # killed after step 75, resumed from the snapshot at step 50: the trainer trims log.jsonl to step 50 ...
    log.write_text("".join(json.dumps(r) + "\n" for r in _records([25, 50])))
    resumed = Trackers(["dvclive"], tmp_path, log, resume_step=50)
    record = _records([75])[0] | {"loss": 0.5}
    resumed.log(record)
    resumed.close()
    # ... and the curve is rebuilt from it: step 75 once, with the resumed run's value
    assert _tsv(tmp_path, "loss") == [(25, 1 / 25), (50, 1 / 50), (75, 0.5)]
    assert [s for s, _ in _tsv(tmp_path, "images_per_s")] == [25, 50, 75]


def test_unknown_tracker_is_one_line_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=r"tracking: unknown tracker\(s\) \['wandb'\]; valid: dvclive, tensorboard"):
        Trackers(["wandb"], tmp_path, tmp_path / "log.jsonl")


def test_every_snapshot_metric_reaches_dvclive_and_a_reevaluation_leaves_no_stale_point(tmp_path):
    from ldm.tracking import log_snapshot_metrics

    curve = [{"step": 0, "num_seeds": 2, "fd_evaluator": 90.5, "fd_evaluator_std": 1.0, "cond_accuracy": 0.25},
             {"step": 150, "num_seeds": 2, "fd_evaluator": 60.0, "fd_evaluator_std": 2.0, "cond_accuracy": 0.75}]
    log_snapshot_metrics(["dvclive"], tmp_path, curve)
    log_snapshot_metrics(["dvclive"], tmp_path, curve[1:])  # re-evaluated with one snapshot fewer
    folder = tmp_path / "dvclive-eval" / "plots" / "metrics" / "eval"
    assert sorted(p.stem for p in folder.glob("*.tsv")) == ["cond_accuracy", "fd_evaluator"]
    rows = (folder / "fd_evaluator.tsv").read_text().splitlines()
    assert rows == ["step\tfd_evaluator", "150\t60.0"]
