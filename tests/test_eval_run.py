"""`ldm sample` -> `ldm evaluate` -> `ldm report` on a tiny fabricated run (random DiT, stand-in VAE and
latent cache, a 2-step evaluator): batch-size invariance of the stored images, guidance sweep with the
chosen scale, precision/recall, size consistency, a skipped CLIPScore, provenance, and the sweep plot."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.config import load_config
from ldm.layout import Layout
from ldm.spec import Scenario, expand_runs
from ldm.stages import evaluate as evaluate_mod
from ldm.stages import sample as sample_mod
from ldm.metrics.evaluator import load_evaluator, train_evaluator
from ldm.metrics.fid import fd_evaluator, save_stats
from ldm.models.dit import DiT
from ldm.stages.report import build_report


def sample_run(config, run_id, log=print):
    """`ldm sample` on a config dict (rebuilt per call: the tests edit the config between calls)."""
    scenario = Scenario(config)
    return sample_mod.sample_run(scenario, scenario.run(run_id), log=log)


def evaluate_run(config, run_id, log=print):
    scenario = Scenario(config)
    return evaluate_mod.evaluate_run(scenario, scenario.run(run_id), log=log)

REPO = Path(__file__).resolve().parent.parent
CLASSES = ["circle", "square", "triangle", "star"]
RUN = "dit.synthetic.scratch.32"
MODEL = dict(latent_size=8, in_channels=4, num_classes=4, hidden_size=32, depth=2, num_heads=2, patch_size=2,
             learn_sigma=False, control_mode="additive")


class FakeCache:
    scaling_factor, shift_factor, classes = 1.0, 0.0, CLASSES
    manifest = {"latent_shape": [4, 8, 8]}

    def __init__(self, *a, **kw):
        pass


class FakeVAE(torch.nn.Module):
    """Latents (4, 8, 8) -> pixels (3, 32, 32) in -1..1, a fixed smooth map."""

    def decode(self, z):
        class Out:
            sample = torch.tanh(torch.nn.functional.interpolate(z[:, :3] * 2, scale_factor=4, mode="nearest"))
        return Out()


@pytest.fixture()
def scenario(tmp_path, monkeypatch):
    config = load_config(REPO / "config" / "smoke.yaml")
    config["workdir"], config["results"] = str(tmp_path / "work"), str(tmp_path / "results")
    config["sampling"].update(num_samples=12, seeds=[0, 1], steps=2, batch_size=7, guidance=2.0,
                              guidance_sweep=[1.0, 2.0, 4.0], guidance_interval=[0.1, 0.9], size_conditions=[16, 32, 64])
    config["evaluation"]["metrics"] = ["fd_evaluator", "cond_accuracy", "precision", "recall", "size_consistency",
                                       "clip_score"]
    config["evaluation"]["clip_model"] = None
    work = Path(config["workdir"])
    # two snapshots of a random model
    g = torch.Generator().manual_seed(0)
    model = DiT(**MODEL)
    snapshots = []
    for step in (3, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        d = work / "runs" / RUN / "checkpoints" / f"step-{step:07d}"
        d.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "ema.safetensors"))
        snapshots.append(d)
    monkeypatch.setattr(sample_mod, "LatentDataset", FakeCache)
    monkeypatch.setattr(sample_mod, "load_vae", lambda *_: FakeVAE())
    monkeypatch.setattr(sample_mod, "load_final", lambda *_: (None, model.config, None))
    monkeypatch.setattr(sample_mod, "list_snapshots", lambda *_: snapshots)
    # real images, an evaluator trained for 2 steps on them, and their reference statistics
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    train_evaluator(real, {"class": np.arange(40) % 4}, {"class": CLASSES}, Layout.of(config).evaluator, steps=2,
                    batch_size=8, seed=0, input_size=32, width=8, feature_dim=8)
    evaluator = load_evaluator(Layout.of(config).evaluator)
    feats = evaluator.features(real)
    save_stats(Layout.of(config).reference(32), feats.mean(0), np.cov(feats, rowvar=False),
               {"evaluator_weights_sha256": evaluator.config["weights_sha256"], "count": 40})
    monkeypatch.setattr(evaluate_mod, "load_prepared", lambda *_: (real, None))
    return config, evaluator


def shards(samples: Path) -> dict:
    return {p.name: load_file(str(p)) for p in sorted(samples.glob("*.safetensors"))}


def test_sample_evaluate_report(scenario):
    config, evaluator = scenario
    samples = sample_run(config, RUN, log=lambda *_: None).parent
    first = shards(samples)
    assert sorted(first) == ["guidance.safetensors", "sizes.safetensors", "step-0000003.safetensors",
                             "step-0000006.safetensors"]
    index = json.loads((samples / "index.json").read_text())
    assert index["guidance"] == {"semantic": 2.0, "control": 1.0, "interval": [0.1, 0.9], "schedule": "constant",
                                 "power": None, "channels": None}
    assert index["labels"] == "balanced"
    assert index["forward_batch"] == 16 and index["guidance_sweep"]["scales"] == [1.0, 2.0, 4.0]
    assert first["sizes.safetensors"]["images"].shape == (2 * 3 * 12, 32, 32, 3)

    # the same run sampled with batch size 32: every stored image identical, bit for bit
    config["sampling"]["batch_size"] = 32
    sample_run(config, RUN, log=lambda *_: None)
    again = shards(samples)
    for name, tensors in first.items():
        for key, value in tensors.items():
            assert torch.equal(value, again[name][key]), (name, key)
    # the sweep's scale 2 (the main scale) reproduces the main samples of seed 0
    sweep = first["guidance.safetensors"]
    main = first["step-0000006.safetensors"]
    assert torch.equal(sweep["images"][sweep["scales"] == 2.0], main["images"][main["seeds"] == 0])

    lines = []
    record = json.loads(evaluate_run(config, RUN, log=lines.append).read_text())
    for key in ("run_id", "config_hash", "code_version", "sampler", "steps", "guidance", "num_samples", "seeds",
                "reference", "protocol", "forward_batch", "image_seeds", "evaluator_weights_sha256"):
        assert record[key] is not None, key
    assert record["guidance"]["interval"] == [0.1, 0.9] and record["sampler"] == "ddim"
    assert record["vae_weights_sha256"] is None  # this test's latent cache is a stand-in: no autoencoder to name
    assert record["model"]["params"] == sum(p.numel() for p in DiT(**MODEL).parameters())
    assert record["model"]["train_gflops_per_image"] == pytest.approx(3 * record["model"]["fwd_gflops_per_image"])
    assert record["reference"]["sha256"] and record["reference"]["count"] == 40
    m = record["metrics"]
    for name in ("fd_evaluator", "cond_accuracy", "precision", "recall", "size_consistency",
                 "size_consistency_pairwise"):
        assert len(m[name]["per_seed"]) == 2, name
        assert m[name]["std"] == pytest.approx(np.std(m[name]["per_seed"], ddof=1))
    assert 0 <= m["precision"]["mean"] <= 1 and 0 <= m["size_consistency"]["mean"] <= 1
    assert m["size_consistency"]["mean"] <= m["size_consistency_pairwise"]["mean"]
    assert "clip_score" not in m and "evaluation.clip_model is null" in record["skipped"]["clip_score"]
    assert any("clip_score skipped" in line for line in lines)
    assert set(record["size_conditions"]["cond_accuracy_by_size"]) == {"16", "32", "64"}
    # fd_evaluator through the shared feature pass equals the library function on the same images
    seed0 = main["images"][main["seeds"] == 0].numpy()
    ref = Layout.of(config).reference(32)
    assert m["fd_evaluator"]["per_seed"][0] == pytest.approx(fd_evaluator(seed0, ref, evaluator), rel=1e-12)
    gs = record["guidance_sweep"]
    assert gs["scales"] == [1.0, 2.0, 4.0] and len(gs["fd_evaluator"]) == 3
    assert gs["chosen_scale"] == gs["scales"][int(np.argmin(gs["fd_evaluator"]))]
    assert gs["fd_evaluator"][1] == pytest.approx(m["fd_evaluator"]["per_seed"][0], rel=1e-12)

    # report over every run of the scenario (the other runs' records are copies under their own ids)
    metrics_dir = Path(config["results"]) / "metrics"
    for run in expand_runs(config):
        if run.run_id != RUN:
            copy = {**record, "run_id": run.run_id, "stage": run.stage, "resolution": run.resolution,
                    "init_run": run.init_run}
            (metrics_dir / f"{run.run_id}.json").write_text(json.dumps(copy))
    results = Path(config["results"])
    build_report(config)
    assert not (results / "plots" / "loss.png").exists()  # no training log in the workdir: no loss plot
    log = Layout.of(config).run(RUN).log
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "grad_norm": 0.5, "lr": 1e-3}) + "\n"
                           for s in (25, 50, 75)))
    summary = build_report(config)
    losses = pd.read_csv(results / "plots" / "loss.csv")
    assert list(losses["run"]) == [RUN] * 3 and list(losses["loss"]) == [1 / 25, 1 / 50, 1 / 75]
    assert (results / "plots" / "loss.png").stat().st_size > 0
    assert (results / "plots" / "guidance.png").stat().st_size > 0
    table = (results / "tables" / "guidance_sweep.md").read_text()
    assert table.count("yes") == 3  # one chosen scale per run
    assert summary[RUN]["chosen_guidance"] == gs["chosen_scale"] and "size_consistency" in summary[RUN]


def test_text_recipe_on_a_cache_without_captions_fails_with_one_line(scenario, monkeypatch):
    config, _ = scenario
    config["recipes"]["dit"]["conditioning"] = "text"
    monkeypatch.setattr(FakeCache, "dir", "cache", raising=False)
    monkeypatch.setattr(FakeCache, "rows", lambda self: {"label": torch.arange(8) % 4}, raising=False)
    with pytest.raises(Exception, match="text-conditional sampling needs caption states"):
        sample_run(config, RUN, log=lambda *_: None)
    shutil.rmtree(Path(config["workdir"]) / "runs" / RUN / "samples", ignore_errors=True)


def test_fid_reference_identity_from_an_existing_npz(scenario, tmp_path):
    """A statistics file is declared per protocol: fid_legacy_tf's file is fid_legacy_tf's reference only."""
    config, _ = scenario
    assert evaluate_mod.fid_reference(Scenario(config), 32, "legacy_tensorflow")["source"] == "prepared images"
    adm = tmp_path / "VIRTUAL_imagenet256_ref.npz"  # an ADM-style batch: plain mu/sigma, no meta
    np.savez(adm, mu=np.zeros(4), sigma=np.eye(4))
    config["evaluation"]["reference_stats"] = {"fid_legacy_tf": str(adm)}
    ref = evaluate_mod.fid_reference(Scenario(config), 32, "legacy_tensorflow")
    assert ref["source"] == "statistics file" and ref["file"] == str(adm) and len(ref["sha256"]) == 64
    assert evaluate_mod.fid_reference(Scenario(config), 32, "clean")["source"] == "prepared images"


def test_inception_fids_only_where_asked_with_their_provenance(scenario, monkeypatch):
    """evaluation.inception_snapshots / inception_seeds decide which image sets get the Inception FID (the
    network itself is replaced: tests/test_inception.py checks it against clean-fid); the record says which
    reference (the cached npz of `reference-stats`, by sha256), network, and how many images each side used."""
    from ldm.metrics import fid, inception

    config, _ = scenario
    config["sampling"].update(guidance_sweep=[], size_conditions=[])
    config["evaluation"]["metrics"] = ["fd_evaluator", "fid_clean"]
    sample_run(config, RUN, log=lambda *_: None)
    cached = Layout.of(config).inception_reference(32, "clean")
    network = inception.inception_network_identity()
    save_stats(cached, np.zeros(inception.INCEPTION_DIM), np.eye(inception.INCEPTION_DIM),
               {"protocol": "fid_clean", "mode": "clean", "count": 30, "of": 40, "inception_network": network})
    calls = []

    def fake_fid(images, ref, mode, device="cpu", gen_features=None):
        calls.append((len(gen_features), str(ref), mode))
        return float(len(calls))

    monkeypatch.setattr(inception, "inception_features", lambda images, mode, **kw: np.zeros((len(images), 2048)))
    monkeypatch.setattr(inception, "inception_fid", fake_fid)
    monkeypatch.setattr(evaluate_mod, "inception_statistics", lambda *a, **k: pytest.fail("cache not used"))

    lines = []
    record = json.loads(evaluate_run(config, RUN, log=lines.append).read_text())  # defaults: final, every seed
    assert calls == [(12, str(cached), "clean")] * 2  # the final snapshot (step 6), seeds 0 and 1
    assert record["metrics"]["fid_clean"]["per_seed"] == [1.0, 2.0]
    assert [("fid_clean" in p) for p in record["curve"]] == [False, True]
    used = record["inception"]["fid_clean"]
    assert (used["generated_images"], used["reference_images"], used["seeds"], used["steps"], used["snapshots"]) == \
        (12, 30, [0, 1], [6], "final")
    assert used["network"] == network and used["reference"]["file"] == str(cached)
    assert used["reference"]["sha256"] == evaluate_mod.file_sha256(cached) and used["reference"]["of"] == 40
    assert any("fid_clean: 12 generated images per seed" in line for line in lines)

    calls.clear()
    config["evaluation"].update(inception_snapshots="all", inception_seeds=1)
    record = json.loads(evaluate_run(config, RUN, log=lambda *_: None).read_text())
    assert calls == [(12, str(cached), "clean")] * 2  # step 3 (its one seed) and step 6 (its first seed)
    assert [p["fid_clean"] for p in record["curve"]] == [1.0, 2.0]
    assert record["metrics"]["fid_clean"]["per_seed"] == [2.0]
    assert (record["inception"]["fid_clean"]["seeds"], record["inception"]["fid_clean"]["steps"]) == ([0], [3, 6])


def test_rule_hashes_leave_out_the_inception_settings_unless_an_inception_metric_is_wanted(scenario):
    """A config without Inception metrics hashes its evaluation section as before the Inception settings existed
    (existing work directories rerun nothing); with one, the settings are in the hash."""
    from ldm.metrics.registry import INCEPTION_SETTINGS, eval_hash_section
    from ldm.provenance import digest

    config, _ = scenario
    scenario_obj = Scenario(config)
    section = scenario_obj.eval_section(scenario_obj.run(RUN))
    before = {**section, "evaluation": {k: v for k, v in section["evaluation"].items() if k not in INCEPTION_SETTINGS}}
    assert set(INCEPTION_SETTINGS) <= set(section["evaluation"])  # defaults filled in
    assert digest(eval_hash_section(section)) == digest(before)
    config["evaluation"]["metrics"] = ["fd_evaluator", "fid_legacy_tf"]
    section = Scenario(config).eval_section(scenario_obj.run(RUN))
    assert eval_hash_section(section) == section


def test_sample_grids_show_a_bounded_evenly_spaced_set_of_classes(tmp_path):
    """At ImageNet scale a grid is 16 rows, classes k * 1000 // 16; a class with fewer samples gets blank cells
    so the rows stay aligned."""
    from PIL import Image

    from ldm.sample_grid import GRID_ROWS, grid_classes, save_sample_grid

    assert grid_classes(4) == [0, 1, 2, 3] and grid_classes(1000)[:3] == [0, 62, 125] and len(grid_classes(1000)) == 16
    labels = np.arange(1000).repeat(2)  # two samples per class, random-label style counts
    data = {"images": np.zeros((2000, 8, 8, 3), np.uint8), "labels": labels, "seeds": np.zeros(2000, int)}
    shown = save_sample_grid(data, [f"c{k}" for k in range(1000)], tmp_path / "g.png", per_class=4, min_side=8)
    assert shown == grid_classes(1000)
    picture = np.asarray(Image.open(tmp_path / "g.png"))
    assert picture.shape[0] == GRID_ROWS * (8 + 2) + 2 and picture.shape[1] == 4 * (8 + 2) + 2
    assert picture[2:10, 2:10].max() == 0 and picture[2:10, 2 + 2 * 10:10 + 2 * 10].min() == 255  # blank cells


def test_sample_grid_tiles_as_torchvision_make_grid():
    """`tile` is torchvision's `make_grid` picture (same padding, fill and row layout), a full and a ragged last row."""
    from torchvision.utils import make_grid

    from ldm.sample_grid import tile

    rng = np.random.default_rng(0)
    for n, per_row in ((12, 4), (7, 3), (5, 8)):
        cells = list(rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8))
        reference = make_grid(torch.from_numpy(np.stack(cells)).permute(0, 3, 1, 2), nrow=per_row, padding=2,
                              pad_value=255).permute(1, 2, 0).numpy()
        assert np.array_equal(tile(cells, per_row), reference)


def test_aux_samples_bound_the_side_sets_to_the_first_images(scenario):
    """`sampling.aux_samples`: intermediate snapshots, sweeps and size conditions draw the first n images of
    the full set (same labels, same noise), the final snapshot all of them; evaluation runs on both."""
    config, _ = scenario
    full = shards(sample_run(config, RUN, log=lambda *_: None).parent)
    config["sampling"]["aux_samples"] = 5
    samples = sample_run(config, RUN, log=lambda *_: None).parent
    aux = shards(samples)
    index = json.loads((samples / "index.json").read_text())
    assert index["aux_samples"] == 5 and [e["images"] for e in index["snapshots"]] == [5, 12]
    assert aux["step-0000003.safetensors"]["images"].shape[0] == 5  # first seed, 5 images
    assert torch.equal(aux["step-0000006.safetensors"]["images"], full["step-0000006.safetensors"]["images"])
    assert aux["guidance.safetensors"]["images"].shape[0] == 3 * 5 and aux["sizes.safetensors"]["images"].shape[0] == 2 * 3 * 5
    for name in ("step-0000003.safetensors", "guidance.safetensors"):
        a, f = aux[name]["images"].int(), full[name]["images"].int()
        first = f.reshape(-1, 12, *f.shape[1:])[:, :5].reshape(-1, *f.shape[1:])
        assert (a - first).abs().max() <= 1  # the same images (a group of 5 may round its last bits apart)
        assert torch.equal(aux[name]["labels"], full[name]["labels"].reshape(-1, 12)[:, :5].reshape(-1))
    record = json.loads(evaluate_run(config, RUN, log=lambda *_: None).read_text())
    assert record["curve"][0]["step"] == 3 and "fd_evaluator" in record["curve"][0]


def test_side_sets_of_the_main_setting_are_sliced_from_the_final_sets_bit_for_bit(scenario):
    """A sweep point at `sampling.guidance` and a size condition equal to `original_size` are the final
    snapshot's images (same seed, noise, scales): sliced from them, not drawn again, and the same bytes as
    drawing them (here: once the main scale is elsewhere, 2.0 is a sweep point of its own and is drawn)."""
    config, _ = scenario
    lines = []
    sliced = shards(sample_run(config, RUN, log=lines.append).parent)
    drew = lambda name: any(f"drew {name} " in line for line in lines)  # noqa: E731
    assert drew("guidance-1.0") and not drew("guidance-2.0") and drew("size-16.seed-1") and not drew("size-32.seed-1")
    final, sweep = sliced["step-0000006.safetensors"], sliced["guidance.safetensors"]
    assert torch.equal(sweep["images"][sweep["scales"] == 2.0], final["images"][final["seeds"] == 0])
    config["sampling"]["guidance"] = 3.0
    lines.clear()
    drawn = shards(sample_run(config, RUN, log=lines.append).parent)["guidance.safetensors"]
    assert drew("guidance-2.0") and torch.equal(drawn["images"], sweep["images"])


def test_an_interrupted_sampling_job_redoes_only_what_it_had_not_finished(scenario, monkeypatch):
    """A job killed mid-way (here: dies on its 4th image set) keeps the sets it finished; the rerun samples only
    the others and writes the same bytes as an uninterrupted job. Parts from other settings are never reused."""
    config, _ = scenario
    full = shards(sample_run(config, RUN, log=lambda *_: None).parent)
    samples = Layout.of(config).run(RUN).samples
    shutil.rmtree(samples)
    real_draw, calls = sample_mod.sample_latents, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")  # not an Exception: nothing may catch and carry on
        return real_draw(*args, **kwargs)

    monkeypatch.setattr(sample_mod, "sample_latents", dying)
    with pytest.raises(KeyboardInterrupt):
        sample_run(config, RUN, log=lambda *_: None)
    assert len(list((samples / "parts").glob("*.safetensors"))) == 3 and not (samples / "index.json").exists()
    calls.clear()
    lines = []
    monkeypatch.setattr(sample_mod, "sample_latents", real_draw)
    counted = lambda *a, **k: calls.append(1) or real_draw(*a, **k)  # noqa: E731
    monkeypatch.setattr(sample_mod, "sample_latents", counted)
    sample_run(config, RUN, log=lines.append)
    # step 3: seed 0; step 6: seeds 0, 1; sweep 3 scales; sizes 2 seeds x 3 sizes; less what is sliced from the
    # final sets: the sweep at the main scale (2.0) and the size equal to `original_size` (32), both seeds
    total = 1 + 2 + 3 + 2 * 3 - 1 - 2
    assert len(calls) == total - 3 and any("3 image share(s) reused" in line for line in lines)
    again = shards(samples)
    assert again.keys() == full.keys() and all(torch.equal(again[k][n], full[k][n]) for k in full for n in full[k])
    assert not (samples / "parts").exists()  # a finished job leaves only its sets
    # a part left by a job with other settings is redone, not reused
    shutil.rmtree(samples)
    monkeypatch.setattr(sample_mod, "sample_latents", dying)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        sample_run(config, RUN, log=lambda *_: None)
    config["sampling"]["guidance"] = 3.0
    monkeypatch.setattr(sample_mod, "sample_latents", counted)
    calls.clear()
    sample_run(config, RUN, log=lambda *_: None)
    assert len(calls) == total + 1  # the main scale is no sweep point now: 2.0 is drawn
