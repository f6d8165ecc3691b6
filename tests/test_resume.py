"""Resume loses nothing and resumes nothing wrong: operational settings keep the resume key, a changed
trajectory moves the old snapshots aside (named diff), corrupt snapshots are quarantined and the next older
one is used, `log.jsonl` never repeats a step, and snapshots of the previous format still resume.

Every run here trains 6 steps (evaluated snapshots at 3 and 6, resume checkpoints every 2 keeping 2) and is
killed in its 6th step, so it leaves resume/2, checkpoints/3 and resume/4 and resumes from 4.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import cache_config, with_steps  # noqa: F401 - the module's latent-cache fixture

from test_train import _failing_objective, run_dir, train_run  # noqa: E402 - adapters and the kill helper

RUN = "dit.synthetic.pretrain.16"
KILL_AT = 5  # the objective's 6th call (one micro-batch per step) raises: steps 1..5 done, resume/4 kept


class Killed(Exception):
    pass


def _config(cache_config, path: Path, **training) -> dict:  # noqa: F811
    """The 6-step config in its own workdir (sharing the latent cache)."""
    config = with_steps(cache_config, "pretrain", 6, 2)
    config["training"].update(checkpoint_every=2, keep_last=2, max_nonfinite_skips=0, **training)
    path.mkdir(parents=True)
    (path / "latents").symlink_to(Path(cache_config["workdir"]) / "latents")
    config["workdir"] = str(path)
    return config


def _killed(config, monkeypatch):
    """Train `config` until the kill; the kill's monkeypatch is undone afterwards."""
    _failing_objective(monkeypatch, {KILL_AT}, error=Killed())
    with pytest.raises(Killed):
        train_run(config, RUN, log=lambda *_: None)
    monkeypatch.undo()
    out = run_dir(config, RUN)
    assert (out / "resume" / "step-0000004").is_dir() and not (out / "final.safetensors").exists()
    return out


def _resumed(config) -> list[str]:
    messages = []
    train_run(config, RUN, log=messages.append)
    print(*messages, sep="\n")  # shown when a test fails
    return messages


@pytest.fixture(scope="module")
def reference(cache_config, tmp_path_factory):  # noqa: F811
    """Final EMA weights and step-6 model/EMA/optimizer of an uninterrupted run."""
    config = _config(cache_config, tmp_path_factory.mktemp("straight") / "work")
    train_run(config, RUN, log=lambda *_: None)
    out = run_dir(config, RUN)
    return {"final": load_file(str(out / "final.safetensors")),
            **{name: load_file(str(out / "checkpoints" / "step-0000006" / name))
               for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors")}}


def _assert_matches(out: Path, reference: dict, what=""):
    for name, tensors in reference.items():
        path = out / "final.safetensors" if name == "final" else out / "checkpoints" / "step-0000006" / name
        again = load_file(str(path))
        assert again.keys() == tensors.keys(), (what, name)
        assert all(torch.equal(again[k], tensors[k]) for k in tensors), (what, name)


def test_operational_settings_do_not_restart_a_run(cache_config, tmp_path, monkeypatch, reference):  # noqa: F811
    config = _config(cache_config, tmp_path / "work")
    _killed(config, monkeypatch)
    # what the NaN error tells users to do, and the snapshot cadence: none of it changes the weights
    config["training"].update(max_nonfinite_skips=3, checkpoint_every=1, keep_last=5, snapshots=3)
    messages = _resumed(config)
    assert not any("starting over" in m for m in messages), messages
    assert any("(step 4)" in m for m in messages), messages
    _assert_matches(run_dir(config, RUN), reference)


def test_operational_settings_of_the_init_chain_keep_a_transfer_runs_key(cache_config):  # noqa: F811
    """`training` is one section for all stages: raising max_nonfinite_skips must not restart transfers."""
    from ldm.checkpoint import resume_key
    from ldm.spec import Scenario

    run = "dit.synthetic.transfer.32"
    before = resume_key(Scenario(cache_config).run_section(Scenario(cache_config).run(run)), None)
    changed = json.loads(json.dumps(cache_config))
    changed["training"].update(max_nonfinite_skips=5, checkpoint_every=7, keep_last=9, snapshots=1)
    scenario = Scenario(changed)
    assert resume_key(scenario.run_section(scenario.run(run)), None) == before
    changed["training"]["lr"] = 5e-4
    scenario = Scenario(changed)
    assert resume_key(scenario.run_section(scenario.run(run)), None) != before


def test_a_changed_trajectory_moves_snapshots_aside_and_names_the_change(cache_config, tmp_path,  # noqa: F811
                                                                          monkeypatch):
    config = _config(cache_config, tmp_path / "work")
    config["recipes"]["dit"]["class_dropout"] = 0.1
    out = _killed(config, monkeypatch)
    before = {p.relative_to(out): p.read_bytes() for d in ("checkpoints", "resume") for p in (out / d).rglob("*")
              if p.is_file()}
    config["recipes"]["dit"]["class_dropout"] = 0.2
    messages = _resumed(config)
    line = [m for m in messages if "starting over" in m]
    assert len(line) == 1 and "recipe.class_dropout: 0.1 -> 0.2" in line[0], messages
    moved = list((out / "superseded").iterdir())
    assert len(moved) == 1 and str(moved[0]) in line[0]
    kept = {p.relative_to(moved[0]): p.read_bytes() for d in ("checkpoints", "resume")
            for p in (moved[0] / d).rglob("*") if p.is_file()}
    assert kept == before  # nothing deleted, nothing altered
    assert (out / "checkpoints" / "step-0000006").is_dir() and (out / "final.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncated ema", "empty state.json"])
def test_a_corrupt_latest_snapshot_is_quarantined_and_the_older_one_used(  # noqa: F811
        cache_config, tmp_path, monkeypatch, reference, damage):
    from ldm.checkpoint import latest_snapshot, list_snapshots

    config = _config(cache_config, tmp_path / "work")
    out = _killed(config, monkeypatch)
    bad = out / "resume" / "step-0000004"
    if damage == "truncated ema":
        data = (bad / "ema.safetensors").read_bytes()
        (bad / "ema.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (bad / "state.json").write_text("")
        assert latest_snapshot(out / "checkpoints", out / "resume") == bad  # listing does not parse it
        assert [p.name for p in list_snapshots(out / "resume")] == ["step-0000002", "step-0000004"]
    messages = _resumed(config)
    named = [m for m in messages if "step-0000004" in m and "corrupt" in m]
    assert len(named) == 1, messages
    assert (out / "resume" / ".corrupt-step-0000004").is_dir()  # quarantined, not deleted
    assert any("(step 3)" in m for m in messages), messages
    _assert_matches(out, reference, damage)


def test_log_steps_increase_strictly_after_a_kill_and_resume(cache_config, tmp_path, monkeypatch):  # noqa: F811
    import ldm.stages.train as train_module

    config = _config(cache_config, tmp_path / "work")
    monkeypatch.setattr(train_module, "LOG_EVERY", 1)
    _failing_objective(monkeypatch, {KILL_AT}, error=Killed())
    with pytest.raises(Killed):
        train_run(config, RUN, log=lambda *_: None)
    monkeypatch.undo()
    log = run_dir(config, RUN) / "log.jsonl"
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5]
    monkeypatch.setattr(train_module, "LOG_EVERY", 1)
    _resumed(config)  # from step 4: steps 5 and 6 again
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_snapshots_of_the_previous_format_resume_and_are_verified(cache_config, tmp_path, monkeypatch,  # noqa: F811
                                                                 reference):
    """Snapshots written before this change: the old key (whole run section less `steps`), no key section, no
    checksums. They still resume; a damaged one is caught by loading its tensors."""
    from ldm.provenance import digest
    from ldm.spec import Scenario

    config = _config(cache_config, tmp_path / "work")
    out = _killed(config, monkeypatch)
    scenario = Scenario(config)
    section = scenario.run_section(scenario.run(RUN))
    section["stage"] = {k: v for k, v in section["stage"].items() if k != "steps"}
    legacy = digest([section, None])
    for snap in [*(out / "checkpoints").glob("step-*"), *(out / "resume").glob("step-*")]:
        state = json.loads((snap / "state.json").read_text())
        state = {k: v for k, v in state.items() if k not in ("resume_section", "files")}
        (snap / "state.json").write_text(json.dumps({**state, "resume_key": legacy}))
    model = out / "resume" / "step-0000004" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    messages = _resumed(config)
    assert not any("starting over" in m for m in messages), messages
    assert any("step-0000004" in m and "corrupt" in m for m in messages), messages
    assert any("(step 3)" in m for m in messages), messages
    _assert_matches(out, reference, "legacy")
    state = json.loads((out / "checkpoints" / "step-0000006" / "state.json").read_text())
    assert state["resume_section"] and set(state["files"]) >= {"model.safetensors", "ema.safetensors",
                                                               "optimizer.safetensors", "rng.safetensors"}
