"""Dataset transfer: a class-conditional model initialises a text-to-image one (semantic embedder swapped)."""
import pytest
import torch

from ldm.models import build_model
from ldm.transfer import transfer_state


def _pair(arch):
    torch.manual_seed(0)
    low = build_model(arch, "tiny", latent_size=16, in_channels=4, num_classes=4, semantic="attention",
                      learn_sigma=False)
    for p in low.parameters():
        torch.nn.init.normal_(p, std=0.05)
    torch.manual_seed(1)
    high = build_model(arch, "tiny", latent_size=16, in_channels=4, num_classes=4, semantic="attention",
                       text_dim=12, learn_sigma=False)
    return low, high


@pytest.mark.parametrize("arch", ["dit", "pixart", "mdt"])
def test_swap_copies_every_shared_weight_and_keeps_the_fresh_caption_embedder(arch):
    low, high = _pair(arch)
    fresh = {k: v.clone() for k, v in high.state_dict().items()}
    low_state = low.state_dict()
    messages = []
    transfer_state(low_state, low.config, high, "interpolate", semantic="swap", log=messages.append)
    got = high.state_dict()
    shared = set(got) & set(low_state)
    only_high, only_low = set(got) - set(low_state), set(low_state) - set(got)
    assert only_high and only_low  # caption embedder vs label table
    assert all(torch.equal(got[k], low_state[k]) for k in shared)
    assert all(torch.equal(got[k], fresh[k]) for k in only_high)
    assert "swapped (class -> text)" in messages[0]
    out = high(torch.randn(2, 4, 16, 16), torch.tensor([10.0, 900.0]), text=torch.randn(2, 5, 12),
               text_keep=torch.ones(2))
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()


def test_keep_refuses_a_condition_type_change_and_swap_refuses_none():
    low, high = _pair("dit")
    with pytest.raises(ValueError, match="state mismatch"):
        transfer_state(low.state_dict(), low.config, high, "interpolate")
    same = build_model("dit", "tiny", latent_size=16, in_channels=4, num_classes=4, semantic="attention",
                       learn_sigma=False)
    with pytest.raises(ValueError, match="needs different condition types"):
        transfer_state(low.state_dict(), low.config, same, "interpolate", semantic="swap")


def test_init_checkpoint_stage_is_an_input_and_excludes_init(tmp_path):
    import yaml

    from ldm.config import ConfigError, validate
    from ldm.spec import expand_runs

    raw = yaml.safe_load(open("config/smoke.yaml"))
    raw["stages"]["finetune"] = {"resolution": "high", "steps": 2, "init_checkpoint": "elsewhere/final.safetensors",
                                 "semantic_transfer": "swap"}
    run = [r for r in expand_runs(validate(raw)) if r.stage == "finetune"][0]
    assert run.init_run is None and run.init_checkpoint == "elsewhere/final.safetensors"
    raw["stages"]["finetune"]["init"] = "pretrain"
    with pytest.raises(ConfigError, match="either init"):
        validate(raw)
