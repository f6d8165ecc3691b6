"""The whole DAG on config/smoke.yaml, end to end, inside pytest (the slow tier: about two minutes).

Numbers are meaningless at this size; what is checked is that every stage ran through the real code, the
outputs carry their provenance, a rerun has nothing to do, and deleting one checkpoint schedules exactly
the jobs downstream of it.
"""
import json
import os
import re
import subprocess
import sys
import time
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
        assert (results / "plots" / "samples" / f"{run}.png").exists()
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


def test_a_deleted_latent_shard_stops_the_dag_build_naming_it(smoke_run):
    """Snakemake tracks a cache's manifest, not its shards: a deleted shard is caught when the DAG is built
    (before any job), named, with the recovery, instead of failing every training retry."""
    shard = sorted((smoke_run / "work" / "smoke" / "latents" / "synthetic" / "r16").glob("shard-*"))[0]
    aside = shard.with_name("aside")
    shard.rename(aside)
    try:
        out = snakemake(smoke_run, "-n")
    finally:
        aside.rename(shard)
    assert out.returncode != 0
    assert (f"{shard.relative_to(smoke_run)}: shard listed in manifest is missing; to recover, rerun `ldm encode"
            in out.stdout + out.stderr)  # Snakemake prints a WorkflowError of an input function on stdout
    assert planned_jobs(smoke_run) == {}


def test_deleting_a_checkpoint_reruns_only_downstream_jobs(smoke_run):
    (smoke_run / "work" / "smoke" / "runs" / RUNS[0] / "final.safetensors").unlink()
    assert planned_jobs(smoke_run) == {"train": 2, "sample": 2, "evaluate": 2, "report": 1, "all": 1}


def _files(root: Path) -> dict[str, float]:
    """Every file under `root` outside Snakemake's state folder, with its modification time."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")
            if p.is_file() and ".snakemake" not in p.relative_to(root).parts}


def _smoke_variant(tmp_path: Path, name: str, **changes) -> Path:
    import yaml

    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        config[section][key] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _snakemake_config(workdir: Path, configfile: Path, *args: str, wait: bool = True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(configfile), "--cores", "2", *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def test_a_dry_run_writes_nothing_outside_snakemake_state(smoke_run, tmp_path):
    other = _smoke_variant(tmp_path, "other", training__lr=0.05)
    before = _files(smoke_run)
    out = _snakemake_config(smoke_run, other, "-n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert _files(smoke_run) == before


def test_a_dry_run_with_another_config_does_not_change_a_running_pipeline(smoke_run, tmp_path):
    """Config A trains pre-training then transfer; while its pre-training runs, `snakemake -n` with config B
    (another lr) on the same workdir. A's transfer weights must equal those of A run alone."""
    from ldm.checkpoint import weights_digest

    a = _smoke_variant(tmp_path, "a", stages__pretrain={"resolution": "low", "steps": 1500})
    b = _smoke_variant(tmp_path, "b", stages__pretrain={"resolution": "low", "steps": 1500}, training__lr=0.05)
    work = smoke_run / "work" / "smoke"
    target = f"work/smoke/runs/{RUNS[1]}/final.safetensors"
    pretrain_log = work / "logs" / "train" / f"{RUNS[0]}.log"
    started = pretrain_log.stat().st_mtime_ns if pretrain_log.exists() else 0
    running = _snakemake_config(smoke_run, a, target, wait=False)
    deadline = time.monotonic() + 120
    while not (pretrain_log.exists() and pretrain_log.stat().st_mtime_ns > started):
        assert running.poll() is None and time.monotonic() < deadline, "A's pre-training never started"
        time.sleep(0.2)
    dry = _snakemake_config(smoke_run, b, target, "-n")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert running.poll() is None, "A finished before the dry run did: raise its pre-training steps"
    _, err = running.communicate(timeout=600)
    assert running.returncode == 0, err[-3000:]
    beside_dry_run = weights_digest(work / "runs" / RUNS[1] / "final.safetensors")

    import shutil

    shutil.rmtree(work / "runs" / RUNS[1])
    alone = _snakemake_config(smoke_run, a, target)
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert weights_digest(work / "runs" / RUNS[1] / "final.safetensors") == beside_dry_run


def test_workdir_with_a_space_and_a_command_substitution_is_a_path(tmp_path):
    """Paths are quoted in every rule's shell command: `$(...)` in a workdir is never run."""
    weird = "w s$(touch PWNED)"
    config = _smoke_variant(tmp_path, "weird", dataset__synthetic={"num_images": 24, "corrupt": 0})
    import yaml

    raw = yaml.safe_load(config.read_text())
    raw.update(workdir=weird, results=f"{weird}/results")
    config.write_text(yaml.safe_dump(raw))
    project = tmp_path / "project"
    project.mkdir()
    out = _snakemake_config(project, config, f"{weird}/prepared/synthetic/r16/report.json")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((project / weird / "prepared" / "synthetic" / "r16" / "report.json").read_text())["kept"] == 24
    assert not list(tmp_path.rglob("PWNED")) and not (project / "w").exists()


def test_the_readme_slurm_command_resolves_the_profile_and_names_missing_variables(tmp_path):
    """`snakemake --profile slurm` from the repository root, as the README writes it (dry run: nothing submitted)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LDM_SLURM_ACCOUNT", "LDM_SLURM_PARTITION")}
    cmd = [sys.executable, "-m", "snakemake", "--profile", "slurm", "-n", "--configfile", "config/paper.yaml",
           "--directory", str(tmp_path)]
    missing = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"})
    assert missing.returncode != 0
    said = missing.stdout + missing.stderr  # Snakemake prints a Snakefile's WorkflowError on stdout
    assert "the slurm profile needs LDM_SLURM_ACCOUNT and LDM_SLURM_PARTITION (sbatch account / partition)" in said, \
        said[-2000:]
    planned = subprocess.run(cmd + ["--quiet", "rules"], cwd=REPO, capture_output=True, text=True,
                             env={**env, "HF_HUB_OFFLINE": "1", "LDM_SLURM_ACCOUNT": "a", "LDM_SLURM_PARTITION": "p"})
    assert planned.returncode == 0, planned.stderr[-2000:]
    assert "imagenet1k_train" in planned.stdout and "cc12m_train" in planned.stdout  # the paper grid, both scenarios


def _chromium() -> str | None:
    import shutil

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed: CI runs .ci/browser/install.sh first")
    return found


def test_the_html_report_opens_in_a_browser_with_every_image(smoke_run, tmp_path):
    """REPORT.html of a real run, loaded by headless Chromium: every image loads and the page is not blank."""
    import numpy as np
    from PIL import Image

    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium not installed (.ci/browser/install.sh installs it)")
    page = smoke_run / "work" / "smoke" / "results" / "REPORT.html"
    text = page.read_text()
    assert "<img" in text and 'src="plots/' not in text  # figures are inside the page, not beside it
    base = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run(base + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r"<title>images (\d+)/(\d+) loaded</title>", dom.stdout)
    assert loaded, dom.stdout[:500]
    assert int(loaded.group(2)) >= 4 and loaded.group(1) == loaded.group(2)  # curves + 3 sample grids at least
    shot = tmp_path / "report.png"
    out = subprocess.run(base + [f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and shot.is_file(), out.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text and figures, not a blank page
