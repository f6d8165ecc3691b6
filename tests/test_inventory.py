"""`ldm models`: parameter and FLOP counts against the published figures and a closed form."""
import json

import pytest

from ldm.cli import main
from ldm.models import ARCHITECTURES
from ldm.models.dit import DIT_SIZES
from ldm.models.inventory import forward_flops, inventory


def dit_forward_macs(image_size: int, hidden_size: int, depth: int, patch_size: int, **_) -> int:
    """Multiply-adds of one DiT forward pass, written out layer by layer (learn_sigma, 4-channel f=8 latent)."""
    latent = image_size // 8
    n = (latent // patch_size) ** 2
    d, c_in, c_out = hidden_size, 4, 8
    macs = n * c_in * patch_size**2 * d                    # patch embedding
    macs += 256 * d + d * d                                # timestep MLP
    per_block = d * 6 * d                                  # adaLN regressor (once per image)
    per_block += n * d * 3 * d + 2 * n * n * d + n * d * d  # qkv, QK^T and AV, output projection
    per_block += 2 * n * d * 4 * d                         # MLP
    macs += depth * per_block
    macs += d * 2 * d + n * d * patch_size**2 * c_out       # final adaLN + linear
    return macs


@pytest.mark.parametrize("size", ["S/2", "XL/2"])
@pytest.mark.parametrize("image_size", [256, 512])
def test_dit_flops_equal_closed_form(size, image_size):
    assert forward_flops("dit", size, image_size) == 2 * dit_forward_macs(image_size, **DIT_SIZES[size])


def test_dit_xl2_matches_published_figures():
    # DiT paper (Peebles & Xie 2023), Table 4: DiT-XL/2 675M params, 118.6 Gflops (multiply-adds) at 256 px
    (row,) = inventory(["dit"], ["XL/2"])
    assert row["published"]
    assert row["params"] == pytest.approx(675e6, rel=0.01)
    assert row["fwd_gflops_256"] == pytest.approx(237.0, rel=0.02)
    assert row["fwd_gflops_512"] == pytest.approx(1049.0, rel=0.02)  # PAPER.md (sizes and costs)


def test_models_json_lists_every_architecture_and_size(capsys):
    assert main(["models", "--json", "--size", "tiny"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["arch"] for r in rows} == {a for a, (_, sizes) in ARCHITECTURES.items() if "tiny" in sizes}
    for row in rows:
        assert set(row) >= {"arch", "size", "params", "fwd_gflops_256", "fwd_gflops_512"}
        assert row["params"] > 0 and 0 < row["fwd_gflops_256"] < row["fwd_gflops_512"]


def test_run_cost_of_a_trained_config_counts_its_conditioning():
    from ldm.models import build_model
    from ldm.models.inventory import run_cost

    model = build_model("dit", "tiny", latent_size=16, in_channels=4, num_classes=4, learn_sigma=False,
                        control_mode="additive")
    cost = run_cost(model.config, (4, 16, 16))
    assert cost["params"] == sum(p.numel() for p in model.parameters())
    plain = build_model("dit", "tiny", latent_size=16, in_channels=4, num_classes=4, learn_sigma=False)
    without = run_cost(plain.config, (4, 16, 16))
    # the control embedder's two MLPs per group (size: 2 scalars, crop: the box and the flip flag, 5 scalars; 256
    # features each)
    d = model.config["hidden_size"]
    extra_macs = (2 * 256 * d + d * d) + (5 * 256 * d + d * d)
    assert cost["fwd_gflops_per_image"] * 1e9 - without["fwd_gflops_per_image"] * 1e9 == pytest.approx(2 * extra_macs)
    assert cost["train_gflops_per_image"] == pytest.approx(3 * cost["fwd_gflops_per_image"])
