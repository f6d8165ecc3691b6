"""A study shared through DVC and taken up in a fresh clone (the slow tier: about four minutes).

The origin is a git + DVC repository holding this project's workflow, package and the real dvc.yaml (its stages
unchanged, its scenarios narrowed to a smoke config). `dvc repro` runs it, `dvc push` fills the default remote
(a folder beside the repository), `git clone` + `dvc pull` + `ldm artifacts restore` take it up elsewhere. Checked:
the pulled weights are the pushed bytes, Snakemake and DVC plan nothing, and a metric added to the config reruns
only the evaluation jobs (and the report).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_pipeline import REPO, RUNS

pytestmark = pytest.mark.pipeline

PROJECT = ["Snakefile", "workflow", "ldm", "params.yaml", "dvc_plots", ".gitignore"]


def _env() -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def sh(cwd: Path, *command: str) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, env=_env())
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


def snakemake_plan(cwd: Path, config: str) -> dict[str, int]:
    out = sh(cwd, sys.executable, "-m", "snakemake", "-n", "--quiet", "rules", "--cores", "2", "--configfile", config)
    return {p[0]: int(p[1]) for p in (line.split() for line in out.splitlines())
            if len(p) == 2 and p[1].isdigit() and p[0] != "total"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def shared_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    origin = root / "origin"
    for name in PROJECT:
        source, target = REPO / name, origin / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__")) if source.is_dir()
         else shutil.copy(source, target))
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config["results"] = "results/smoke"
    config["evaluation"]["metrics"] = ["fd_evaluator", "val_loss"]
    config["artifacts"] = {"samples": True, "latents": True}  # so that re-evaluating needs no resampling
    # what makes every output of the real `report` stage: a study (REPORT.md) and a guidance sweep (guidance.png)
    config["study"] = yaml.safe_load((REPO / "config" / "default.yaml").read_text())["study"]
    config["sampling"]["guidance_sweep"] = [1.0, 3.0]
    (origin / "config").mkdir()
    (origin / "config" / "smoke.yaml").write_text(yaml.safe_dump(config))
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc_yaml["vars"] = [{"scenarios": {"smoke": {"config": "config/smoke.yaml", "results": "results/smoke"}}}]
    dvc_yaml.pop("plots")  # they name the committed results of the real scenarios
    (origin / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    sh(origin, "git", "init", "-q")
    sh(origin, "dvc", "init", "-q")
    shutil.copy(REPO / ".dvc" / "config", origin / ".dvc" / "config")  # the project's remote, after `dvc init`
    sh(origin, "git", "add", "-A")
    sh(origin, "git", "commit", "-qm", "project")
    sh(origin, "dvc", "repro")
    sh(origin, "git", "add", "-A")
    sh(origin, "git", "commit", "-qm", "study")
    pushed = sh(origin, "dvc", "push")
    clone = root / "clone"
    sh(root, "git", "clone", "-q", str(origin), str(clone))
    pulled = sh(clone, "dvc", "pull")
    restored = sh(clone, sys.executable, "-m", "ldm.cli", "artifacts", "restore", "--config", "config/smoke.yaml")
    return {"root": root, "origin": origin, "clone": clone, "push": pushed, "pull": pulled, "restore": restored}


def test_the_remote_is_a_folder_beside_the_repository(shared_study):
    remote = shared_study["root"] / "ldm-recipes-dvc"
    assert remote.is_dir() and any(remote.rglob("*")), shared_study["push"]


def test_pulled_weights_are_the_pushed_bytes(shared_study):
    for run in RUNS:
        relative = Path("work/smoke/runs") / run / "final.safetensors"
        assert _sha(shared_study["clone"] / relative) == _sha(shared_study["origin"] / relative)
        # the published numbers name the weights they came from (`dvc metrics show` / `dvc exp show`)
        summary = json.loads((shared_study["clone"] / "results/smoke/summary" / f"{run}.json").read_text())
        assert summary["weights_sha256"] == _sha(shared_study["clone"] / relative)


def test_the_registry_names_every_run_with_its_labels(shared_study):
    registry = yaml.safe_load((shared_study["clone"] / "results" / "smoke" / "dvc.yaml").read_text())["artifacts"]
    assert sorted(registry) == sorted(r.replace(".", "-") for r in RUNS)
    transfer = registry["dit-synthetic-transfer-32"]
    assert transfer["type"] == "model" and transfer["path"] == "artifacts/runs/dit.synthetic.transfer.32/final.safetensors"
    assert transfer["labels"] == ["recipe=dit", "stage=transfer", "resolution=32"]
    assert "run dit.synthetic.transfer.32" in transfer["desc"]


def test_after_pull_snakemake_and_dvc_plan_nothing(shared_study):
    clone = shared_study["clone"]
    assert not (clone / "work" / "smoke" / "prepared").exists()  # nothing upstream of the shared files came along
    assert snakemake_plan(clone, "config/smoke.yaml") == {}
    status = sh(clone, "dvc", "status")
    assert "up to date" in status, status
    dry = sh(clone, "dvc", "repro", "--dry")
    assert "Running stage" not in dry, dry


def test_a_metric_added_after_pull_reruns_only_evaluation(shared_study, tmp_path):
    clone = shared_study["clone"]
    config = yaml.safe_load((clone / "config" / "smoke.yaml").read_text())
    config["evaluation"]["metrics"].append("cond_accuracy")
    edited = clone / "config" / "smoke_more.yaml"
    edited.write_text(yaml.safe_dump(config))
    assert snakemake_plan(clone, "config/smoke_more.yaml") == {"evaluate": len(RUNS), "report": 1, "all": 1}


def test_a_sampling_change_after_pull_resamples_the_pulled_snapshots_without_retraining(shared_study):
    clone = shared_study["clone"]
    config = yaml.safe_load((clone / "config" / "smoke.yaml").read_text())
    config["sampling"]["steps"] += 1
    (clone / "config" / "smoke_steps.yaml").write_text(yaml.safe_dump(config))
    assert snakemake_plan(clone, "config/smoke_steps.yaml") == {"sample": len(RUNS), "evaluate": len(RUNS),
                                                                "report": 1, "all": 1}
    sh(clone, sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", "config/smoke_steps.yaml")
    index = yaml.safe_load((clone / "work/smoke/runs" / RUNS[1] / "samples/index.json").read_text())
    before = yaml.safe_load((shared_study["origin"] / "work/smoke/runs" / RUNS[1] / "samples/index.json").read_text())
    assert index["snapshots"] == before["snapshots"] and len(index["snapshots"]) >= 2  # every evaluated snapshot
    assert index["steps"] == before["steps"] + 1
    assert not (clone / "work" / "smoke" / "prepared").exists()  # no data rebuilt, nothing retrained


def test_restore_refuses_a_config_edited_before_it(shared_study):
    clone = shared_study["clone"]
    config = yaml.safe_load((clone / "config" / "smoke.yaml").read_text())
    config["training"]["lr"] = 0.5
    (clone / "config" / "smoke_lr.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "ldm.cli", "artifacts", "restore", "--config", "config/smoke_lr.yaml"],
                          cwd=clone, capture_output=True, text=True, env=_env())
    assert done.returncode != 0
    assert "config/smoke_lr.yaml: differs from the config the artifacts in results/smoke/artifacts were exported" \
        in done.stderr.strip().splitlines()[-1]
