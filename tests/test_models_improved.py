"""The improved model is DiT with the paper's conditioning defaults: same function, different defaults."""
import torch

from ldm.models import build_model, model_from_config


def test_improved_equals_dit_built_with_the_same_choices():
    common = dict(latent_size=8, in_channels=4, num_classes=4, learn_sigma=False)
    torch.manual_seed(0)
    improved = build_model("improved", "tiny", **common)
    assert (improved.config["semantic"], improved.config["control_mode"], improved.config["qk_norm"]) == (
        "attention", "disentangled", True)
    dit = build_model("dit", "tiny", semantic="attention", control_mode="disentangled", qk_norm=True, **common)
    for p in improved.parameters():  # leave the zero init: a zero model would match anything
        torch.nn.init.normal_(p, std=0.05)
    dit.load_state_dict(improved.state_dict())
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([10.0, 500.0, 990.0])
    labels, control = torch.tensor([0, 3, 4]), torch.tensor([[96.0, 96, 0, 0, 96, 96, 0]] * 3)
    out = improved(x, t, labels, control=control)
    assert out.abs().max() > 0
    torch.testing.assert_close(out, dit(x, t, labels, control=control), rtol=0, atol=0)
    rebuilt = model_from_config(improved.config)
    assert type(rebuilt) is type(improved) and rebuilt.config == improved.config
