"""The training loop: batch assembly, bit-exact resume from a snapshot, SIGTERM preemption, transfer init.

Runs on a real (tiny) latent cache made by the pipeline's own stages from 48 synthetic images.
"""
import json
import math
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

from ldm.checkpoint import list_snapshots
from ldm.config import validate
from ldm.layout import Layout
from ldm.spec import Scenario
from ldm.stages.train import PREEMPTED_EXIT_CODE, _next_batch
from ldm.stages.train import train_run as _train_run


def train_run(config, run_id, log=print):
    """`ldm train` on a config dict and a run id (the stage takes the scenario and its run)."""
    scenario = Scenario(config)
    return _train_run(scenario, scenario.run(run_id), log=log)


def run_dir(config, run_id):
    return Layout.of(config).run(run_id).dir

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cache_config(tmp_path_factory):
    """A smoke config whose workdir holds prepared data, a 2-step VAE and latent caches at 16 and 32 px."""
    from ldm.autoencoder import train_tiny_vae
    from ldm.data.synthetic_writer import write_synthetic
    from ldm.stages.encode import encode_latents
    from ldm.data.prepared import load_prepared
    from ldm.stages.prepare import prepare

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

    from ldm.checkpoint import weights_digest

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


# --- schedule, accumulation, resume checkpoints, non-finite skips, precision, recipe keys --------------

def _run_config(cache_config, steps, snapshots, **training):
    config = with_steps(cache_config, "pretrain", steps, snapshots)
    config["training"].update(training)
    return config


def _fresh(config, run="dit.synthetic.pretrain.16"):
    shutil.rmtree(run_dir(config, run), ignore_errors=True)
    return run


def _state(path: Path) -> dict:
    return {name: _weights(path / name) for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors")}


def _assert_same_state(a: dict, b: dict, what=""):
    for name, tensors in a.items():
        assert tensors.keys() == b[name].keys(), (what, name)
        assert all(torch.equal(tensors[k], b[name][k]) for k in tensors), (what, name)


def test_cosine_lr_matches_the_closed_form():
    import math

    from ldm.optim import lr_at

    base, warmup, total, floor = 2e-3, 4, 20, 0.1
    for step in range(total):
        got = lr_at(step, base, warmup, "cosine", total, floor)
        if step < warmup:
            want = base * (step + 1) / warmup
        else:
            p = (step - warmup) / (total - warmup)
            want = base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))
        assert got == pytest.approx(want, rel=1e-12), step
    assert lr_at(warmup, base, warmup, "cosine", total, floor) == pytest.approx(base)
    assert lr_at(total, base, warmup, "cosine", total, floor) == pytest.approx(base * floor)  # p clamps at 1
    assert lr_at(10, base, warmup, "constant", total, floor) == base
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        lr_at(10, base, warmup, "linear", total)


def test_the_loop_sets_the_cosine_lr_of_each_step(cache_config):
    from ldm.optim import lr_at

    config = _run_config(cache_config, 6, 1, lr_schedule="cosine", min_lr_ratio=0.2, warmup=2,
                         checkpoint_every=1, keep_last=10)
    run = _fresh(config)
    train_run(config, run, log=lambda *_: None)
    out = run_dir(config, run)
    for snap in list_snapshots(out / "resume") + list_snapshots(out / "checkpoints"):
        state = json.loads((snap / "state.json").read_text())
        step = state["step"]  # the lr of the last update made, at index step - 1
        assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr_at(step - 1, 1e-3, 2, "cosine", 6, 0.2))


def test_resume_checkpoints_keep_the_last_k_and_never_evaluated_snapshots(cache_config):
    config = _run_config(cache_config, 9, 2, checkpoint_every=2, keep_last=2)  # evaluated at 4 (round 4.5) and 9
    run = _fresh(config)
    train_run(config, run, log=lambda *_: None)
    out = run_dir(config, run)
    steps = lambda d: [int(p.name.split("-")[1]) for p in list_snapshots(out / d)]
    assert steps("checkpoints") == [4, 9]
    assert steps("resume") == [6, 8]  # 2 was pruned; 4 is an evaluated snapshot, not a resume checkpoint
    assert not list(out.glob("*/.tmp-*"))


def _failing_objective(monkeypatch, fail_calls, error=None):
    """Wrap the run's objective: micro-step calls in `fail_calls` return NaN, or raise `error` (a kill)."""
    import ldm.stages.train as train_module

    real = train_module.build_run_objective
    calls = {"n": 0}

    def build(scenario, run):
        objective = real(scenario, run)
        loss = objective.loss

        def wrapped(*args, **kwargs):
            n = calls["n"]
            calls["n"] += 1
            if n in fail_calls:
                if error is not None:
                    raise error
                return loss(*args, **kwargs) * float("nan")
            return loss(*args, **kwargs)

        objective.loss = wrapped
        return objective

    monkeypatch.setattr(train_module, "build_run_objective", build)
    return calls


def test_nonfinite_losses_are_skipped_up_to_the_bound(cache_config, monkeypatch):
    from ldm.errors import NonFiniteLossError

    config = _run_config(cache_config, 5, 1, max_nonfinite_skips=2, checkpoint_every=1, keep_last=10)
    run = _fresh(config)
    _failing_objective(monkeypatch, {1, 3})  # steps 1 and 3 (0-based) are NaN
    messages = []
    train_run(config, run, log=messages.append)
    out = run_dir(config, run)
    assert sum("update skipped" in m for m in messages) == 2
    # a skipped step changes nothing but the data position and the draws
    _assert_same_state(_state(out / "resume" / "step-0000001"), _state(out / "resume" / "step-0000002"), "skip")
    assert json.loads((out / "checkpoints" / "step-0000005" / "state.json").read_text())["nonfinite_skips"] == 2
    assert all(torch.isfinite(v).all() for v in _weights(out / "final.safetensors").values())
    # one more than the bound stops with the clear error, and the last good snapshot stays
    monkeypatch.undo()
    run = _fresh(config)
    _failing_objective(monkeypatch, {0, 1, 2})
    with pytest.raises(NonFiniteLossError, match=r"after 2 skipped non-finite step\(s\) \(max_nonfinite_skips=2\)"):
        train_run(config, run, log=lambda *_: None)
    assert [p.name for p in list_snapshots(run_dir(config, run) / "resume")] == ["step-0000001", "step-0000002"]


def test_resume_is_bit_exact_with_grad_accumulation_at_several_kill_points(cache_config, monkeypatch):
    """A kill after k micro-steps (k odd: inside an accumulation) leaves the last checkpoint; resuming
    replays the lost micro-steps and ends bit-identical to the straight run."""
    config = _run_config(cache_config, 6, 2, grad_accum=2, checkpoint_every=2, keep_last=5)
    run = _fresh(config)
    train_run(config, run, log=lambda *_: None)
    out = run_dir(config, run)
    reference, final = _state(out / "checkpoints" / "step-0000006"), _weights(out / "final.safetensors")

    class Killed(Exception):
        pass

    for kill_at in (3, 5, 8, 11):  # micro-steps done before the kill; steps = kill_at // 2 (+ half a step)
        run = _fresh(config)
        calls = _failing_objective(monkeypatch, {kill_at}, error=Killed())
        with pytest.raises(Killed):
            train_run(config, run, log=lambda *_: None)
        assert calls["n"] == kill_at + 1
        monkeypatch.undo()
        messages = []
        train_run(config, run, log=messages.append)
        assert any("resuming" in m for m in messages) == (kill_at >= 4), (kill_at, messages)
        _assert_same_state(_state(out / "checkpoints" / "step-0000006"), reference, kill_at)
        again = _weights(out / "final.safetensors")
        assert all(torch.equal(again[k], final[k]) for k in final), kill_at


def test_sigkill_during_accumulated_training_resumes_bit_exact(cache_config, tmp_path):
    """A real SIGKILL of `ldm train` soon after its first resume checkpoint (2 micro-batches per step)."""
    run = "dit.synthetic.pretrain.16"
    steps = 60
    config = _run_config(cache_config, steps, 1, grad_accum=2, checkpoint_every=5, keep_last=2)
    straight = json.loads(json.dumps(config))
    straight["workdir"] = str(tmp_path / "straight")
    (tmp_path / "straight").mkdir()
    (tmp_path / "straight" / "latents").symlink_to(Path(config["workdir"]) / "latents")
    _fresh(config, run)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ldm.cli", "train", "--config", str(config_path), "--run", run],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    resume = run_dir(config, run) / "resume"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if list_snapshots(resume):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert not (run_dir(config, run) / "final.safetensors").exists(), "finished before the kill: raise `steps`"
    killed_at = int(list_snapshots(resume)[-1].name.split("-")[1])
    messages = []
    train_run(config, run, log=messages.append)
    assert any(f"(step {killed_at})" in m for m in messages)
    train_run(straight, run, log=lambda *_: None)
    name = f"step-{steps:07d}"
    _assert_same_state(_state(run_dir(config, run) / "checkpoints" / name),
                       _state(run_dir(straight, run) / "checkpoints" / name), killed_at)


def test_grad_accumulation_matches_one_big_batch(cache_config):
    """Micro-batches of batch_size / grad_accum give the same update as one batch, to float rounding."""
    finals = []
    for accum in (1, 4):
        config = _run_config(cache_config, 3, 1, grad_accum=accum)
        run = _fresh(config)
        train_run(config, run, log=lambda *_: None)
        finals.append(_weights(run_dir(config, run) / "checkpoints" / "step-0000003" / "model.safetensors"))
    worst = max((finals[0][k] - finals[1][k]).abs().max().item() for k in finals[0])
    assert worst < 1e-5  # not bitwise (different summation order), but the same update
    bad = _run_config(cache_config, 3, 1, grad_accum=3)
    with pytest.raises(Exception, match="not divisible"):
        train_run(bad, _fresh(bad), log=lambda *_: None)


def test_bf16_autocast_trains_fp32_weights(cache_config):
    results = {}
    for precision in ("fp32", "bf16"):
        config = _run_config(cache_config, 2, 1, precision=precision)
        run = _fresh(config)
        train_run(config, run, log=lambda *_: None)
        results[precision] = _weights(run_dir(config, run) / "checkpoints" / "step-0000002" / "model.safetensors")
        log = json.loads((run_dir(config, run) / "log.jsonl").read_text().splitlines()[-1])
        assert math.isfinite(log["loss"])
    assert all(v.dtype == torch.float32 for v in results["bf16"].values())  # master weights stay fp32
    assert any(not torch.equal(results["fp32"][k], results["bf16"][k]) for k in results["fp32"])  # autocast ran


def test_build_run_model_passes_only_non_default_recipe_keys(cache_config):
    from ldm.config import ConfigError
    from ldm.recipe import build_run_model as build

    def build_run_model(config, run_id, *args):
        scenario = Scenario(config)
        return build(scenario, scenario.run(run_id), *args)

    config = json.loads(json.dumps(cache_config))
    run = "dit.synthetic.pretrain.16"
    plain = build_run_model(config, run, (4, 4, 4), 3)
    recipe = config["recipes"]["dit"]
    recipe.update(qk_norm=True, control="disentangled", control_exponents={"crop": 2.0}, options={"learn_sigma": True})
    model = build_run_model(config, run, (4, 4, 4), 3)
    assert model.config["qk_norm"] and not plain.config["qk_norm"]
    assert model.config["control_exponents"] == {"crop": 2.0} and model.config["learn_sigma"]
    assert model.out_channels == 8 and plain.out_channels == 4
    recipe.update(conditioning="text")
    with pytest.raises(ConfigError, match="no text states"):
        build_run_model(config, run, (4, 4, 4), 3)


def _with_recipe(config, name, **recipe):
    from ldm.config import RECIPE_DEFAULTS, merge

    config = json.loads(json.dumps(config))
    config["recipes"] = {name: merge(RECIPE_DEFAULTS, recipe)}
    return config


def _recording_objective(monkeypatch):
    """Record the model kwargs of every micro-step the loop hands to the objective."""
    import ldm.stages.train as train_module

    real, seen = train_module.build_run_objective, []

    def build(scenario, run):
        objective = real(scenario, run)
        loss = objective.loss

        def wrapped(model, x0, kwargs, generator, draws=None):
            seen.append((dict(kwargs), generator))
            return loss(model, x0, kwargs, generator, draws=draws)

        objective.loss = wrapped
        return objective

    monkeypatch.setattr(train_module, "build_run_objective", build)
    return seen


@pytest.fixture(scope="module")
def text_config(cache_config, tmp_path_factory):
    """The 16 px cache again, with MiniLM caption states."""
    from ldm.stages.encode import encode_latents

    work = Path(cache_config["workdir"])
    text_work = tmp_path_factory.mktemp("text")
    encode_latents(work / "prepared" / "r16", str(work / "vae"), text_work / "latents" / "synthetic" / "r16",
                   text_encoder="minilm", shard_size=20)
    config = json.loads(json.dumps(cache_config))
    config["workdir"] = str(text_work)
    return config


def test_text_conditional_training_feeds_padded_captions(text_config, monkeypatch):
    from ldm.data.latent_cache import LatentDataset

    dim = LatentDataset(Path(text_config["workdir"]) / "latents" / "synthetic" / "r16").manifest["text_encoder"]["dim"]
    for dropout, padding in ((1.0, "zero_mask"), (0.0, "noisy_replicate")):
        config = _with_recipe(with_steps(text_config, "pretrain", 2, 1), "pt", arch="pixart", size="tiny",
                              conditioning="text", text_padding=padding, class_dropout=dropout)
        run = _fresh(config, "pt.synthetic.pretrain.16")
        seen = _recording_objective(monkeypatch)
        train_run(config, run, log=lambda *_: None)
        monkeypatch.undo()
        state = json.loads((run_dir(config, run) / "checkpoints" / "step-0000002" / "state.json").read_text())
        assert state["model_config"]["text_dim"] == dim
        kwargs = seen[0][0]
        assert "class_labels" not in kwargs and kwargs["text"].shape[-1] == dim
        assert ("text_mask" in kwargs) == (padding == "zero_mask")  # a mask only where padding is masked out
        assert torch.equal(kwargs["text_keep"], torch.full_like(kwargs["text_keep"], 1.0 - dropout))


def test_mdt_trains_with_a_masked_second_pass(cache_config, monkeypatch):
    config = _with_recipe(_run_config(cache_config, 2, 1, grad_accum=2), "m", arch="mdt", size="tiny")
    run = _fresh(config, "m.synthetic.pretrain.16")
    seen = _recording_objective(monkeypatch)
    train_run(config, run, log=lambda *_: None)
    assert len(seen) == 4 and all(isinstance(gen, torch.Generator) for _, gen in seen)  # 2 steps x 2 micro-batches
    log = json.loads((run_dir(config, run) / "log.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(log["loss"])


def test_fsdp_option_constructs_and_says_when_it_cannot_shard(cache_config):
    """FSDP needs several accelerators: on CPU accelerate drops the plugin; the run says so and still trains."""
    from ldm.stages.train import make_accelerator

    accelerator = make_accelerator({"precision": "fp32", "distributed": "fsdp"})
    assert accelerator.distributed_type.name in ("NO", "MULTI_CPU")
    config = _run_config(cache_config, 2, 1, distributed="fsdp")
    messages = []
    train_run(config, _fresh(config), log=messages.append)
    assert any("training.distributed=fsdp, but accelerate shards only on GPUs" in m for m in messages)


def test_learned_sigma_trains_with_ddpm_and_is_refused_with_flow(cache_config):
    from ldm.config import ConfigError

    base = _run_config(cache_config, 2, 1)
    config = _with_recipe(base, "dit", arch="dit", size="tiny", objective="ddpm", options={"learn_sigma": True})
    run = _fresh(config)
    train_run(config, run, log=lambda *_: None)
    state = json.loads((run_dir(config, run) / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["model_config"]["learn_sigma"]
    # the output layer starts at zero (adaLN-Zero): its sigma rows move only through the VLB term
    weight = _weights(run_dir(config, run) / "checkpoints" / "step-0000002" / "model.safetensors")["final_layer.linear.weight"]
    rows = torch.arange(weight.shape[0]) % 8  # channel-last unpatchify: row % (2C) is the output channel
    assert weight[rows >= 4].abs().max() > 0
    flow = _with_recipe(base, "dit", arch="dit", size="tiny", objective="rectified_flow", options={"learn_sigma": True})
    with pytest.raises(ConfigError, match="learn_sigma needs the ddpm objective"):
        train_run(flow, _fresh(flow), log=lambda *_: None)


def test_recipe_without_control_trains_a_model_without_a_control_embedder(cache_config):
    config = with_steps(cache_config, "pretrain", 2, 1)
    config["recipes"]["dit"]["control"] = "none"
    config["recipes"]["dit"]["arch"] = "improved"  # whose own default is disentangled control
    config["workdir"] = str(Path(config["workdir"]) / "nocontrol")
    shutil.copytree(Path(cache_config["workdir"]) / "latents", Path(config["workdir"]) / "latents")
    final = train_run(config, "dit.synthetic.pretrain.16", log=lambda *_: None)
    assert not any(k.startswith("control_embedder") for k in load_file(str(final)))
