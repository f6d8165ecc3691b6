"""The training input pipeline (`ldm.data.loader`): the DataLoader gives each step exactly the rows the trainer
gathered directly before it existed, with or without workers and from any resume step, and training with workers
ends bit-identical to training without them; the worker count stays out of every run hash."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_train import cache_config, with_steps  # noqa: F401 - the module's latent-cache fixture

from test_train import run_dir, train_run  # noqa: E402 - the config-dict adapters

from ldm.data.latent_cache import LatentDataset
from ldm.data.loader import StepBatches, next_batch
from ldm.layout import Layout
from ldm.provenance import digest
from ldm.spec import Scenario

RUN = "dit.synthetic.pretrain.16"
BATCH = 8


def _cache(config):
    return Layout.of(config).latents(Scenario(config).run(RUN).data_key)


def _direct(cache, keep, steps, seed=3):
    """The trainer's batches before the loader, restated: the data generator's first permutation, then per step
    `next_batch` over the training rows and `MappedRows.gather(rows, keep)`; with the state before each step."""
    dataset = LatentDataset(cache, verify=False)
    train_rows, data = dataset.split_rows(heldout=False), dataset.rows()
    gen = torch.Generator().manual_seed(seed)
    order, state = torch.randperm(len(train_rows), generator=gen), {"epoch": 0, "position": 0}
    out = []
    for _ in range(steps):
        before = (order.clone(), dict(state), gen.get_state())
        idx, order = next_batch(order, state, BATCH, len(train_rows), gen)
        out.append((before, data.gather(train_rows[idx], keep=keep)))
    return out, train_rows, state


@pytest.mark.parametrize("keep", [None, slice(4, 8)], ids=["world1", "rank1of2"])
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("first", [0, 5], ids=["fresh", "resumed"])
def test_loader_batches_are_the_direct_gather_bit_for_bit(cache_config, workers, keep, first):  # noqa: F811
    steps = 12  # several epochs of the ~45 training rows: the permutation is redrawn inside the stream
    reference, train_rows, end_state = _direct(_cache(cache_config), keep, steps)
    assert end_state["epoch"] >= 2
    (order, state, gen_state), _ = reference[first]  # a resume: the state a snapshot at `first` saved
    gen = torch.Generator()
    gen.set_state(gen_state)
    batches = StepBatches(_cache(cache_config), train_rows, BATCH, keep, workers, pin_memory=False)
    batches.start(order, state, gen, steps - first)
    for step in range(first, steps):
        got, want = batches.next(), reference[step][1]
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), (step, name)
        read = want["mean"][keep or slice(None)]
        assert read.abs().sum() > 0 and (keep is None or want["mean"][:keep.start].abs().sum() == 0)
        # the saved data state follows the steps taken, not the batches the workers prefetched
        if step + 1 < steps:
            next_order, next_state, next_gen = reference[step + 1][0]
            assert state == next_state and torch.equal(batches.order, next_order)
            assert torch.equal(gen.get_state(), next_gen)
    assert state == end_state


def test_a_batch_that_is_not_the_steps_is_refused(cache_config):  # noqa: F811
    """The trainer's check against the loader's index stream can fail: a data state moved after the loader
    started no longer matches the loader's batches."""
    reference, train_rows, _ = _direct(_cache(cache_config), None, 2)
    (order, state, gen_state), _ = reference[0]
    gen = torch.Generator()
    gen.set_state(gen_state)
    batches = StepBatches(_cache(cache_config), train_rows, BATCH, None, 0, pin_memory=False)
    batches.start(order, state, gen, 2)
    state["position"] += 1
    with pytest.raises(RuntimeError, match="not this step's"):
        batches.next()


def _snapshot(path):
    return {name: load_file(str(path / name)) for name in ("model.safetensors", "ema.safetensors",
                                                           "optimizer.safetensors")}


def _assert_equal(a, b, what):
    for name, tensors in a.items():
        assert tensors.keys() == b[name].keys(), (what, name)
        assert all(torch.equal(tensors[k], b[name][k]) for k in tensors), (what, name)


def test_training_with_workers_is_bit_identical_and_resumes_across_worker_counts(cache_config):  # noqa: F811
    config = with_steps(cache_config, "pretrain", 4, 1)
    config["training"].update(batch_size=BATCH, warmup=1, ema=0.5, checkpoint_every=2, keep_last=5)
    states = {}
    for workers in (0, 2):
        config["training"]["loader_workers"] = workers
        shutil.rmtree(run_dir(config, RUN), ignore_errors=True)
        train_run(config, RUN, log=lambda *_: None)
        out = run_dir(config, RUN)
        states[workers] = {"resume": _snapshot(out / "resume" / "step-0000002"),
                           "end": _snapshot(out / "checkpoints" / "step-0000004")}
    _assert_equal(states[0]["resume"], states[2]["resume"], "step 2")
    _assert_equal(states[0]["end"], states[2]["end"], "step 4")
    # the steps change the weights (the comparison is not vacuous)
    first, last = states[0]["resume"]["model.safetensors"], states[0]["end"]["model.safetensors"]
    assert any(not torch.equal(first[k], last[k]) for k in first)
    # a run killed after step 2 with workers resumes with none (the same resume key) to the same weights
    out = run_dir(config, RUN)
    shutil.rmtree(out / "checkpoints")
    (out / "final.safetensors").unlink()
    config["training"]["loader_workers"] = 0
    messages = []
    train_run(config, RUN, log=messages.append)
    assert any("(step 2)" in m for m in messages), messages
    _assert_equal(states[2]["end"], _snapshot(out / "checkpoints" / "step-0000004"), "resumed")


def test_loader_workers_change_no_run_hash(cache_config):  # noqa: F811
    def scenario(**training):  # a copy each: a Scenario keeps the config dict it is given
        config = json.loads(json.dumps(cache_config))
        config["training"].update(training)
        return Scenario(config)

    before, after = scenario(), scenario(loader_workers=4)
    assert before.config["training"]["loader_workers"] == 0  # the default is filled in
    assert before.fingerprint() == after.fingerprint()
    for run_id, run in before.runs.items():
        assert "loader_workers" not in before.run_section(run)["training"]
        assert digest(before.run_section(run)) == digest(after.run_section(after.run(run_id)))
    # the exclusion is by key: a setting that changes the weights still changes the hashes
    other = scenario(loader_workers=4, lr=cache_config["training"]["lr"] * 2)
    assert digest(other.run_section(other.run(RUN))) != digest(before.run_section(before.run(RUN)))
    assert other.fingerprint() != before.fingerprint()
