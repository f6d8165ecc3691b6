"""The flip flag of the control vector: a training-time flip mirrors the crop box and toggles the flag, the
latents of a flagged row are the mirrored posterior, `control_flip: false` hides it, and the per-group w(t)
defaults put the geometric group (crop, flip) earlier in sampling than the low-level one (size)."""
import math
from pathlib import Path

import pytest
import torch
import yaml

from ldm.config import validate
from ldm.control import CONTROL_FIELDS, CONTROL_GROUPS, FLIP, mirror_box, mirror_flipped, whole_square_image
from ldm.models.conditioning import DEFAULT_EXPONENTS, ControlEmbedder, control_weight
from ldm.recipe import training_inputs
from ldm.spec import Recipe, from_section


def batch(n: int = 64) -> dict:
    g = torch.Generator().manual_seed(0)
    control = torch.tensor([[300.0, 400, 10, 30, 200, 200, 0]]).repeat(n, 1)
    control[1::2, FLIP] = 1.0  # rows already mirrored when they were prepared
    return {"mean": torch.randn(n, 4, 4, 4, generator=g), "std": torch.full((n, 4, 4, 4), 1e-3),
            "mean_flip": torch.randn(n, 4, 4, 4, generator=g), "std_flip": torch.full((n, 4, 4, 4), 1e-3),
            "label": torch.arange(n) % 4, "control": control}


def recipe(**kw) -> Recipe:
    config = yaml.safe_load((Path(__file__).resolve().parent.parent / "config" / "smoke.yaml").read_text())
    config["recipes"] = {"r": {"arch": "dit", "size": "tiny", **kw}}
    config.pop("study", None)
    return from_section(Recipe, "r", validate(config)["recipes"]["r"])


def test_the_flag_is_the_last_field_and_in_the_geometric_group():
    assert CONTROL_FIELDS[-1] == "flip" and FLIP in CONTROL_GROUPS["crop"] and FLIP not in CONTROL_GROUPS["size"]
    assert whole_square_image(96, 2)[:, FLIP].tolist() == [0.0, 0.0]  # sampling asks for unmirrored images


def test_mirroring_mirrors_the_box_and_toggles_the_flag():
    control = torch.tensor([[300.0, 400, 10, 30, 200, 200, 0], [300.0, 400, 10, 30, 200, 200, 1]])
    out = mirror_flipped(control, torch.tensor([True, True]))
    assert out[:, 3].tolist() == [400 - 30 - 200] * 2 and out[:, FLIP].tolist() == [1.0, 0.0]
    assert torch.equal(mirror_flipped(out, torch.tensor([True, True])), control)  # an involution
    assert torch.equal(mirror_flipped(control, torch.tensor([False, False])), control)
    meta = {"orig_w": 400, "crop_left": 30, "crop_w": 200, "flip": 0}
    assert mirror_box(meta) == {"orig_w": 400, "crop_left": 170, "crop_w": 200, "flip": 1}


def test_training_rows_carry_the_flag_of_the_image_the_model_sees():
    b = batch()
    x0, kw = training_inputs(recipe(control="disentangled"), b, torch.Generator().manual_seed(3), 4, 1.0, 0.0, True)
    # which rows were flipped now: their latents are the mirrored posterior mean (std ~ 0)
    flipped = (x0 - b["mean_flip"]).abs().amax(dim=(1, 2, 3)) < 0.01
    assert 10 < int(flipped.sum()) < 54
    prepared_flip = b["control"][:, FLIP].bool()
    assert torch.equal(kw["control"][:, FLIP].bool(), prepared_flip ^ flipped)
    # the ablation: same draws, the flag hidden
    x0_off, kw_off = training_inputs(recipe(control="disentangled", control_flip=False), b,
                                     torch.Generator().manual_seed(3), 4, 1.0, 0.0, True)
    assert torch.equal(x0_off, x0) and kw_off["control"][:, FLIP].abs().max() == 0
    assert torch.equal(kw_off["control"][:, :FLIP], kw["control"][:, :FLIP])


def test_default_time_weights_put_geometry_before_size():
    embedder = ControlEmbedder(32)
    assert embedder.exponents == DEFAULT_EXPONENTS
    t = torch.tensor([0.0, 0.5, 0.9, 1.0])
    w = embedder.weights(t * 999.0)
    assert torch.allclose(w["crop"], torch.cos(math.pi / 2 * t).clamp(min=0) ** 0.5, atol=1e-6)
    assert torch.allclose(w["size"], control_weight(t, 2.0), atol=0)
    assert (w["crop"][1:3] > w["size"][1:3]).all() and w["crop"][0] == w["size"][0] == 1.0
    assert w["crop"][3] == w["size"][3] == 0.0  # pure noise: no control at all
    shared = ControlEmbedder(32, exponents={"size": 1.0, "crop": 1.0})  # the "shared w(t)" ablation
    assert torch.equal(shared.weights(t * 999.0)["crop"], shared.weights(t * 999.0)["size"])


@pytest.mark.parametrize("field", ["flip"])
def test_the_flag_changes_a_disentangled_model_output(field):
    from ldm.models import build_model

    model = build_model("dit", "tiny", latent_size=8, in_channels=4, num_classes=4, control_mode="disentangled")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        x, t, y = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300.0]), torch.tensor([1])
        plain = whole_square_image(96, 1)
        mirrored = plain.clone()
        mirrored[:, CONTROL_FIELDS.index(field)] = 1.0
        assert (model(x, t, y, control=plain) - model(x, t, y, control=mirrored)).abs().max() > 1e-3
