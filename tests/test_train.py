"""The training loop: batch assembly, bit-exact resume from a snapshot, SIGTERM preemption, transfer init.

Runs on a real (tiny) latent cache made by the pipeline's own stages from 48 synthetic images.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ldm.config import validate
from ldm.train import PREEMPTED_EXIT_CODE, _next_batch, list_snapshots, run_dir, train_run

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache_config(tmp_path_factory):
    """A smoke config whose workdir holds prepared data, a 2-step VAE and latent caches at 16 and 32 px."""
    from ldm.autoencoder import train_tiny_vae
    from ldm.data.synthetic import write_synthetic
    from ldm.latents import encode_latents
    from ldm.prepare import load_prepared, prepare

    work = tmp_path_factory.mktemp("train")
    raw = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    raw["workdir"] = str(work)
    raw["results"] = str(work / "results")
    config = validate(raw)
    write_synthetic(work / "raw", num_images=48, seed=0)
    images = []
    for res in (16, 32):
        prepare(str(work / "raw" / "folders"), work / "prepared" / f"r{res}", resolution=res)
        images.append(load_prepared(work / "prepared" / f"r{res}")[0])
    train_tiny_vae(images, work / "vae", steps=2, batch_size=8, lr=1e-3, seed=0)
    for res in (16, 32):
        encode_latents(work / "prepared" / f"r{res}", str(work / "vae"), work / "latents" / "synthetic" / f"r{res}",
                       text_encoder=None, shard_size=20)
    return config


def with_steps(config, stage, steps, snapshots):
    config = json.loads(json.dumps(config))
    config["stages"][stage]["steps"] = steps
    config["training"]["snapshots"] = snapshots
    return config


def test_batches_have_the_requested_size_and_cover_each_epoch():
    gen = torch.Generator().manual_seed(0)
    state = {"epoch": 0, "position": 0}
    order = torch.randperm(10, generator=gen)
    seen = []
    for _ in range(5):
        idx, order = _next_batch(order, state, 4, 10, gen)
        assert len(idx) == 4
        seen.extend(idx.tolist())
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert state == {"epoch": 2, "position": 0}


def _weights(path: Path) -> dict:
    return load_file(str(path))


def test_resume_from_snapshot_is_bit_exact(cache_config, tmp_path):
    run = "dit.synthetic.pretrain.16"
    straight = with_steps(cache_config, "pretrain", 9, 3)
    train_run(straight, run, log=lambda *_: None)
    reference = {name: _weights(run_dir(straight, run) / "checkpoints" / "step-0000009" / name)
                 for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors")}
    final = _weights(run_dir(straight, run) / "final.safetensors")
    for kill_after in (3, 6):  # a SIGKILL after the snapshot at `kill_after` leaves exactly this on disk
        for snap in list_snapshots(run_dir(straight, run) / "checkpoints"):
            if int(snap.name.split("-")[1]) > kill_after:
                for f in snap.iterdir():
                    f.unlink()
                snap.rmdir()
        (run_dir(straight, run) / "final.safetensors").unlink()
        train_run(straight, run, log=lambda *_: None)
        for name, tensors in reference.items():
            again = _weights(run_dir(straight, run) / "checkpoints" / "step-0000009" / name)
            assert again.keys() == tensors.keys()
            assert all(torch.equal(again[k], tensors[k]) for k in tensors), (kill_after, name)
        resumed = _weights(run_dir(straight, run) / "final.safetensors")
        assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_a_fresh_run_is_reproducible_whatever_the_global_rng(cache_config):
    run = "dit.synthetic.pretrain.16"
    config = with_steps(cache_config, "pretrain", 3, 1)
    finals = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        shutil.rmtree(run_dir(config, run), ignore_errors=True)
        train_run(config, run, log=lambda *_: None)
        finals.append(_weights(run_dir(config, run) / "final.safetensors"))
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_weights_digest_ignores_metadata_order(tmp_path):
    from safetensors.torch import save_file

    from ldm.train import weights_digest

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)}
    save_file(tensors, str(tmp_path / "x.safetensors"), {"one": "1", "two": "2"})
    save_file(tensors, str(tmp_path / "y.safetensors"), {"two": "2", "one": "1", "three": "3"})
    assert weights_digest(tmp_path / "x.safetensors") == weights_digest(tmp_path / "y.safetensors")
    save_file({**tensors, "a": tensors["a"] + 1}, str(tmp_path / "z.safetensors"))
    assert weights_digest(tmp_path / "z.safetensors") != weights_digest(tmp_path / "x.safetensors")


def test_changed_config_does_not_resume_stale_snapshots(cache_config):
    run = "dit.synthetic.pretrain.16"
    first = with_steps(cache_config, "pretrain", 4, 2)
    train_run(first, run, log=lambda *_: None)
    changed = json.loads(json.dumps(first))
    changed["training"]["lr"] = 5e-4
    messages = []
    train_run(changed, run, log=messages.append)
    assert any("starting over" in m for m in messages)
    state = json.loads((run_dir(changed, run) / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4)


def test_transfer_starts_from_the_pretrained_weights(cache_config):
    config = with_steps(with_steps(cache_config, "pretrain", 2, 1), "transfer", 2, 1)
    train_run(config, "dit.synthetic.pretrain.16", log=lambda *_: None)
    messages = []
    train_run(config, "dit.synthetic.transfer.32", log=messages.append)
    low = _weights(run_dir(config, "dit.synthetic.pretrain.16") / "final.safetensors")
    step0 = _weights(run_dir(config, "dit.synthetic.transfer.32") / "checkpoints" / "step-0000000" / "model.safetensors")
    assert low.keys() == step0.keys()
    assert all(torch.equal(low[k], step0[k]) for k in low)
    assert any("pos_embed=interpolate" in m for m in messages)
    # the snapshot records the resampled pos-emb base (the 16 px token grid: 4x4 latent / patch 2), so
    # sampling and resume rebuild it
    state = json.loads((run_dir(config, "dit.synthetic.transfer.32") / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["model_config"]["pos_embed_base"] == 2 and state["model_config"]["latent_size"] == 8


def test_sigterm_snapshots_and_exits_with_the_documented_code(cache_config, tmp_path):
    run = "dit.synthetic.scratch.32"
    config = with_steps(cache_config, "scratch", 5000, 1)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ldm.cli", "train", "--config", str(config_path), "--run", run],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    log = run_dir(config, run) / "log.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline:
        time.sleep(0.2)
    assert log.exists(), "training never logged a step"
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == PREEMPTED_EXIT_CODE, output[-2000:]
    # a preemption snapshot is a resume checkpoint: it is not among the evaluated (sampled) snapshots
    assert list_snapshots(run_dir(config, run) / "checkpoints") == []
    snaps = list_snapshots(run_dir(config, run) / "resume")
    assert len(snaps) == 1 and "SIGTERM" in output
    stopped_at = int(snaps[0].name.split("-")[1])
    logged = json.loads(log.read_text().splitlines()[-1])["step"]
    assert logged <= stopped_at <= logged + 25  # within one logging window: the current step finished
    # the rerun continues from the snapshot, not from scratch
    config["stages"]["scratch"]["steps"] = stopped_at + 2
    messages = []
    train_run(config, run, log=messages.append)
    assert any(f"(step {stopped_at})" in m for m in messages)
