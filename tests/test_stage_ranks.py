"""`ldm sample` and `ldm evaluate` under torchrun (2 processes, gloo, CPU) give what one process gives: the same
sample bytes, the same metrics record (Inception FID included); and a sampling job killed with SIGKILL (every
rank) keeps the shares it finished: the rerun draws only the others.

The processes run a driver that puts in the same stand-ins as test_eval_run's fixture (a random DiT's two
snapshots written by the fixture, a fixed smooth "VAE", a cache manifest, the real images); everything else is
the real stage."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from test_eval_run import RUN, evaluate_run, sample_run, scenario  # noqa: F401 - the fixture

from ldm.layout import Layout
from ldm.ranks import Ranks

TESTS = Path(__file__).resolve().parent
DRIVER = f"""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
from test_eval_run import FakeCache, FakeVAE, MODEL
import numpy as np
from ldm.metrics.evaluator import Evaluator
from ldm.models.dit import DiT
from ldm.spec import Scenario
from ldm.stages import evaluate as evaluate_mod
from ldm.stages import sample as sample_mod
config = json.loads(Path(sys.argv[1]).read_text())
snapshots = sorted(Path(sys.argv[2]).glob("step-*"))
stage, work = sys.argv[4], Path(sys.argv[1]).parent
sample_mod.LatentDataset = FakeCache
sample_mod.load_vae = lambda *_: FakeVAE()
sample_mod.load_final = lambda *_: (None, DiT(**MODEL).config, None)
sample_mod.list_snapshots = lambda *_: snapshots
real, delay = sample_mod.sample_latents, float(os.environ.get("DRAW_DELAY", 0))
with open(sys.argv[3] + ".pids", "a") as f:  # torchrun starts its workers in sessions of their own
    f.write(str(os.getpid()) + "\\n")

def counted(*args, **kwargs):  # one line per share drawn, and a pace slow enough to be killed mid-way
    with open(sys.argv[3], "a") as f:
        f.write(os.environ.get("RANK", "0") + "\\n")
    time.sleep(delay)
    return real(*args, **kwargs)

sample_mod.sample_latents = counted
evaluate_mod.load_prepared = lambda *_: (np.load(work / "real.npy"), None)
evaluate_mod.EVALUATOR_BATCH = 16  # as the test sets it in process: 40-image sets split over the ranks
scored = Evaluator.features_and_predictions

def logged(self, images, *args, **kwargs):  # how many images each rank scored
    with open(sys.argv[3] + ".scored", "a") as f:
        f.write(os.environ.get("RANK", "0") + " " + str(len(images)) + "\\n")
    return scored(self, images, *args, **kwargs)

Evaluator.features_and_predictions = logged
scenario = Scenario(config)
module, function = (sample_mod, "sample_run") if stage == "sample" else (evaluate_mod, "evaluate_run")
with sample_mod.Ranks.from_env() as ranks:
    getattr(module, function)(scenario, scenario.run({RUN!r}), ranks=ranks)
"""


def _files(samples: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(samples.iterdir()) if p.is_file()}


def _launch(config: dict, tmp_path: Path, nproc: int, draws: Path, delay: float = 0.0,
            stage: str = "sample") -> subprocess.Popen:
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "driver.py").write_text(DRIVER)
    checkpoints = Layout.of(config).run(RUN).checkpoints
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "DRAW_DELAY": str(delay),
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(nproc), str(tmp_path / "driver.py"), str(tmp_path / "config.json"), str(checkpoints),
                             str(draws), stage], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return out


def _config(scenario):  # noqa: F811
    config, _ = scenario
    # 40 images: ranks take images [0, 16) and [16, 40) (whole forward groups of 16); side sets 24: [0, 16), [16, 24)
    config["sampling"].update(num_samples=40, aux_samples=24)
    return config


#: the shares the ranks slice instead of drawing (`sample_run`'s `obtain`; the main scale is 2.0, `original_size` 32):
#: rank 0's [0, 16) of the sweep at 2.0 and of size 32 (both seeds) from the final sets' [0, 16); rank 1's [16, 24)
#: of size 32, seed 0, from the sweep's [16, 24) (drawn: the final set's group there is [16, 32), another group)
SLICED = {"guidance-2.0.0-16", "size-32.seed-0.0-16", "size-32.seed-1.0-16", "size-32.seed-0.16-24"}
DRAWN = 24 - len(SLICED)


def _one_process(config: dict) -> tuple[Path, dict[str, bytes]]:
    """The samples directory and the bytes one in-process job writes there, then cleared for the ranks' job."""
    samples = sample_run(config, RUN, log=lambda *_: None).parent
    one = _files(samples)
    shutil.rmtree(samples)
    return samples, one


def test_shares_are_whole_forward_groups_dealt_evenly():
    assert [Ranks(r, 2).share(40, 16) for r in range(2)] == [(0, 16), (16, 40)]
    assert [Ranks(r, 4).share(24, 16) for r in range(4)] == [(0, 0), (0, 16), (16, 16), (16, 24)]
    assert [Ranks(r, 3).share(9) for r in range(3)] == [(0, 3), (3, 6), (6, 9)]


def test_two_processes_write_the_same_bytes_as_one(scenario, tmp_path):  # noqa: F811
    config = _config(scenario)
    samples, one = _one_process(config)
    draws = tmp_path / "draws.txt"
    out = _finish(_launch(config, tmp_path, 2, draws))
    ranks = draws.read_text().split()
    # both ranks drew their shares of 12 parts (step 3: 1 seed; step 6: 2 seeds; sweep: 3 scales; sizes: 2 seeds x
    # 3 sizes) but those sliced from a finished share of the same setting (`SLICED`)
    assert ranks.count("0") == 12 - 3 and ranks.count("1") == 12 - 1 and len(ranks) == DRAWN, out[-2000:]
    two = _files(samples)
    assert set(two) == set(one) and "index.json" in two and "step-0000006.safetensors" in two
    assert [name for name in one if one[name] != two[name]] == []
    assert not (samples / "parts").exists()


def test_a_sigkilled_two_rank_job_redoes_only_the_shares_it_had_not_finished(scenario, tmp_path):  # noqa: F811
    config = _config(scenario)
    samples, one = _one_process(config)
    draws = tmp_path / "draws.txt"
    proc = _launch(config, tmp_path, 2, draws, delay=0.4)
    parts = samples / "parts"
    deadline = time.time() + 120
    while len(list(parts.glob("*.safetensors"))) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    # both ranks and torchrun, as SLURM's cgroup kill: no chance to clean up
    for pid in Path(str(draws) + ".pids").read_text().split():
        os.kill(int(pid), signal.SIGKILL)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.stem for p in parts.glob("*.safetensors")}
    assert 6 <= len(finished) < 24 and not (samples / "index.json").exists()
    draws.unlink()
    out = _finish(_launch(config, tmp_path, 2, draws))
    assert len(draws.read_text().split()) == DRAWN - len(finished - SLICED), out[-2000:]
    assert "reused from an interrupted job" in out
    again = _files(samples)
    assert set(again) == set(one) and [name for name in one if one[name] != again[name]] == []


def test_two_processes_score_the_same_metrics_as_one(scenario, tmp_path, monkeypatch):  # noqa: F811
    from ldm.stages import evaluate as evaluate_mod

    monkeypatch.setattr(evaluate_mod, "EVALUATOR_BATCH", 16)  # so that a 40-image set is split ([0, 16), [16, 40))
    config = _config(scenario)
    config["evaluation"]["metrics"] += ["fid_clean"]
    config["evaluation"]["inception_seeds"] = 1
    sample_run(config, RUN, log=lambda *_: None)
    one = json.loads(evaluate_run(config, RUN, log=lambda *_: None).read_text())
    metrics = Layout.of(config).metrics(RUN)
    metrics.unlink()
    real = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)  # the fixture's real images
    np.save(tmp_path / "real.npy", real)
    draws = tmp_path / "draws.txt"
    out = _finish(_launch(config, tmp_path, 2, draws, stage="evaluate"))
    two = json.loads(metrics.read_text())
    # the work was shared: rank 1 scored images [16, 40) of the full sets and [16, 24) of the side sets
    scored = [tuple(line.split()) for line in Path(str(draws) + ".scored").read_text().splitlines()]
    assert ("1", "24") in scored and ("1", "8") in scored and ("0", "16") in scored, out[-2000:]
    assert "fid_clean" in one["metrics"] and one == two
