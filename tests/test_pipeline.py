"""The whole DAG on config/smoke.yaml, end to end, inside pytest (the slow tier: about two minutes).

Numbers are meaningless at this size; what is checked is that every stage ran through the real code, the
outputs carry their provenance, a rerun has nothing to do, and deleting one checkpoint schedules exactly
the jobs downstream of it.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.pipeline


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
                           "--directory", str(workdir), "--configfile", str(REPO / "config" / "smoke.yaml"),
                           "--cores", "2", *args], capture_output=True, text=True, env=env)


def planned_jobs(workdir: Path) -> dict[str, int]:
    out = snakemake(workdir, "-n", "--quiet", "rules")
    assert out.returncode == 0, out.stderr[-2000:]
    counts = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("smoke")
    out = snakemake(workdir)
    logs = "\n".join(p.read_text()[-1500:] for p in sorted((workdir / "work" / "smoke" / "logs").rglob("*.log"))) \
        if (workdir / "work").exists() else ""
    assert out.returncode == 0, out.stderr[-3000:] + logs
    return workdir


RUNS = ["dit.synthetic.pretrain.16", "dit.synthetic.transfer.32", "dit.synthetic.scratch.32"]


def test_every_stage_produced_its_output(smoke_run):
    work = smoke_run / "work" / "smoke"
    results = work / "results"
    for res in (16, 32):
        report = json.loads((work / "prepared" / "synthetic" / f"r{res}" / "report.json").read_text())
        assert report["kept"] == 96  # every good synthetic image survives
        assert sum(report["skipped"].values()) == 1  # the corrupt file is skipped and counted
        manifest = json.loads((work / "latents" / "synthetic" / f"r{res}" / "manifest.json").read_text())
        assert manifest["count"] == 96
    for run in RUNS:
        assert (work / "runs" / run / "final.safetensors").exists()
        assert (results / "plots" / f"samples_{run}.png").exists()
    assert (results / "tables" / "runs.md").exists()
    assert (results / "tables" / "transfer_vs_scratch.csv").exists()
    assert (results / "plots" / "curves.png").exists()
    summary = json.loads((results / "summary.json").read_text())
    assert sorted(summary) == sorted(RUNS)


def test_metrics_carry_provenance(smoke_run):
    record = json.loads((smoke_run / "work" / "smoke" / "results" / "metrics" / f"{RUNS[1]}.json").read_text())
    for key in ("run_id", "config_hash", "code_version", "protocol", "sampler", "steps", "guidance",
                "num_samples", "seeds", "reference", "curve"):
        assert key in record, key
    assert record["seeds"] == [0, 1] and record["num_samples"] == 8
    stats = record["metrics"]["cond_accuracy"]
    assert len(stats["per_seed"]) == 2 and 0.0 <= stats["mean"] <= 1.0
    assert record["metrics"]["fd_evaluator"]["mean"] > 0
    # transfer runs are also evaluated at step 0 (the pre-trained weights, pos-emb resampled)
    assert [p["step"] for p in record["curve"]] == [0, 3, 6]


def test_rerun_has_nothing_to_do(smoke_run):
    assert planned_jobs(smoke_run) == {}


def test_deleting_a_checkpoint_reruns_only_downstream_jobs(smoke_run):
    (smoke_run / "work" / "smoke" / "runs" / RUNS[0] / "final.safetensors").unlink()
    assert planned_jobs(smoke_run) == {"train": 2, "sample": 2, "evaluate": 2, "report": 1, "all": 1}
