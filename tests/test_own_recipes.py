"""`own_recipe: true`: a recipe takes its architecture's published recipe (`ldm.published_recipes`) where the
config sets nothing, and every stage reads the run's own settings (training, sampling, shift, lr)."""
from pathlib import Path

import pytest
import yaml

from ldm.config import validate
from ldm.errors import ConfigError
from ldm.published_recipes import PUBLISHED_RECIPES, own_recipe_defaults, recipes_table
from ldm.spec import Scenario

REPO = Path(__file__).resolve().parent.parent
KEYS = ["objective", "beta_schedule", "learn_sigma", "training.lr", "training.betas", "training.weight_decay",
        "training.batch_size", "training.warmup", "training.ema", "training.grad_clip", "sampling.sampler",
        "sampling.steps", "sampling.guidance", "sampling.guidance_schedule", "sampling.guidance_power",
        "sampling.guidance_channels", "schedule_shift", "label_sampling"]


def config(recipes: dict, **top) -> dict:
    raw = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    raw["recipes"] = recipes
    raw.pop("study", None)
    raw["stages"] = {"pretrain": {"resolution": "low", "steps": 4},
                     "transfer": {"resolution": "high", "steps": 4, "init": "pretrain", "schedule_shift": "auto",
                                  "lr": 5.0e-5}}
    return validate({**raw, **top})


def test_every_architecture_states_every_value_with_a_source():
    assert set(PUBLISHED_RECIPES) == {"unet", "dit", "mdt", "pixart", "mmdit", "improved"}
    for arch, settings in PUBLISHED_RECIPES.items():
        assert list(settings) == KEYS, arch
        assert all(s.source.strip() for s in settings.values()), arch
    rows = recipes_table()
    assert len(rows) == 6 * len(KEYS) and any(r["assumed"] for r in rows) and not all(r["assumed"] for r in rows)
    # the values the protocol tests check against the original code (tests/test_own_protocols.py)
    assert PUBLISHED_RECIPES["unet"]["beta_schedule"].value == "scaled_linear"
    assert PUBLISHED_RECIPES["dit"]["sampling.guidance_channels"].value == 3
    mdt = PUBLISHED_RECIPES["mdt"]
    assert (mdt["sampling.guidance_schedule"].value, mdt["sampling.guidance_power"].value) == ("power_cosine", 4.0)
    assert PUBLISHED_RECIPES["improved"]["training.betas"].value == [0.9, 0.95]


def test_own_recipe_fills_what_the_config_leaves_out_and_the_config_wins():
    full = config({"dit": {"arch": "dit", "size": "tiny", "own_recipe": True, "training": {"batch_size": 8}},
                   "mdt": {"arch": "mdt", "size": "tiny", "own_recipe": True, "sampling": {"steps": 3}},
                   "plain": {"arch": "dit", "size": "tiny"}})
    dit, mdt, plain = (full["recipes"][n] for n in ("dit", "mdt", "plain"))
    assert dit["objective"] == "ddpm" and dit["beta_schedule"] == "linear" and dit["options"]["learn_sigma"] is True
    assert dit["training"] == {**own_recipe_defaults("dit")["training"], "batch_size": 8}  # the config wins
    assert dit["sampler"] == "ddpm" and dit["sampling"]["guidance_channels"] == 3 and dit["sampling"]["labels"] == "random"
    assert dit["schedule_shift"] == "none"
    assert mdt["sampling"]["steps"] == 3 and mdt["sampling"]["guidance_schedule"] == "power_cosine"
    assert "training" not in plain and "sampling" not in plain  # without own_recipe nothing changes
    scenario = Scenario(full)
    runs = {r.run_id: r for r in scenario.runs.values()}
    dit_pre, dit_tr = runs["dit.synthetic.pretrain.16"], runs["dit.synthetic.transfer.32"]
    plain_tr = runs["plain.synthetic.transfer.32"]
    tcfg = scenario.training(dit_pre)
    assert tcfg["betas"] == [0.9, 0.999] and tcfg["grad_clip"] is None and tcfg["ema"] == 0.9999
    assert tcfg["batch_size"] == 8 and tcfg["snapshots"] == full["training"]["snapshots"]  # operational: shared
    assert scenario.base_lr(dit_pre) == 1.0e-4 and scenario.base_lr(dit_tr) == 5.0e-5  # a stage lr still wins
    assert scenario.schedule_shift(dit_tr) == 1.0 and scenario.schedule_shift(plain_tr) == 2.0  # no shift for DiT
    s = scenario.sampling(runs["mdt.synthetic.pretrain.16"])
    assert (s["steps"], s["guidance"], s["guidance_power"]) == (3, 3.8, 4.0)
    assert scenario.sampling(plain_tr) == full["sampling"]
    assert scenario.run_section(dit_pre) != scenario.run_section(runs["plain.synthetic.pretrain.16"])


def test_recipe_settings_are_checked():
    with pytest.raises(ConfigError, match="needs a guidance_power"):
        config({"r": {"arch": "dit", "size": "tiny", "sampling": {"guidance_schedule": "power_cosine"}}})
    with pytest.raises(ConfigError, match="recipes.r.training"):
        config({"r": {"arch": "dit", "size": "tiny", "training": {"snapshots": 3}}})  # operational: not a recipe's
    with pytest.raises(ConfigError, match=r"recipes.r.training.batch_size: 6 is not divisible"):
        config({"r": {"arch": "dit", "size": "tiny", "training": {"batch_size": 6}}},
               training={"batch_size": 8, "grad_accum": 4})


def test_the_adm_protocol_preset_fills_in_and_refuses_mixing():
    full = config({"dit": {"arch": "dit", "size": "tiny"}, "pix": {"arch": "pixart", "size": "tiny"}},
                  evaluation={"protocol": "adm", "metrics": ["fd_evaluator"]})
    assert full["evaluation"]["metrics"] == ["fd_evaluator", "fid_legacy_tf"] and full["sampling"]["labels"] == "random"
    assert full["recipes"]["dit"]["sampling"]["guidance_channels"] == 3 and "sampling" not in full["recipes"]["pix"]
    kept = config({"dit": {"arch": "dit", "size": "tiny", "sampling": {"guidance_channels": 4}}},
                  evaluation={"protocol": "adm"}, sampling={"labels": "balanced"})
    assert kept["recipes"]["dit"]["sampling"]["guidance_channels"] == 4 and kept["sampling"]["labels"] == "balanced"
    with pytest.raises(ConfigError, match="fid_clean is not the adm protocol's FID"):
        config({"dit": {"arch": "dit", "size": "tiny"}}, evaluation={"protocol": "adm", "metrics": ["fid_clean"]})
    with pytest.raises(ConfigError, match="reference_stats.fid_legacy_tf: not the clean protocol's FID"):
        config({"dit": {"arch": "dit", "size": "tiny"}},
               evaluation={"protocol": "clean", "reference_stats": {"fid_legacy_tf": "adm.npz"}})
    assert "fid_clean" in config({"d": {"arch": "dit", "size": "tiny"}}, evaluation={"protocol": "clean"})[
        "evaluation"]["metrics"]
