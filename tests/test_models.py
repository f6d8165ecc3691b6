"""Model tests against independent references (diffusers' DiT, closed forms) and invariants."""
import math

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed

from ldm.models import build_model, model_from_config
from ldm.models.conditioning import ControlEmbedder, control_weight, drop_conditions, noise_level
from ldm.models.dit import DiT
from ldm.models.layers import sincos_2d, timestep_embedding
from ldm.transfer import transfer_state

SMALL = dict(latent_size=8, in_channels=4, num_classes=10, hidden_size=64, depth=2, num_heads=4, patch_size=2)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Replace every parameter by seeded noise: a fresh adaLN-Zero model outputs 0, which proves nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def to_diffusers(ours: DiT) -> DiTTransformer2DModel:
    """Map our (DiT-reference-named) weights into diffusers' DiTTransformer2DModel."""
    cfg = ours.config
    theirs = DiTTransformer2DModel(
        num_attention_heads=cfg["num_heads"],
        attention_head_dim=cfg["hidden_size"] // cfg["num_heads"],
        in_channels=cfg["in_channels"],
        out_channels=ours.out_channels,
        num_layers=cfg["depth"],
        sample_size=cfg["latent_size"],
        patch_size=cfg["patch_size"],
        num_embeds_ada_norm=cfg["num_classes"],
        norm_eps=1e-6,  # DiT uses 1e-6 in every LayerNorm
    )
    s = ours.state_dict()
    m = {"pos_embed.proj.weight": s["x_embedder.proj.weight"], "pos_embed.proj.bias": s["x_embedder.proj.bias"]}
    for i in range(cfg["depth"]):
        b, d = f"blocks.{i}.", f"transformer_blocks.{i}."
        # diffusers keeps a copy of the (shared) timestep/label embedders in every block
        for ours_name, their_name in [
            ("t_embedder.mlp.0", "norm1.emb.timestep_embedder.linear_1"),
            ("t_embedder.mlp.2", "norm1.emb.timestep_embedder.linear_2"),
        ]:
            m[d + their_name + ".weight"] = s[ours_name + ".weight"]
            m[d + their_name + ".bias"] = s[ours_name + ".bias"]
        m[d + "norm1.emb.class_embedder.embedding_table.weight"] = s["y_embedder.embedding_table.weight"]
        for suffix in ("weight", "bias"):
            m[d + f"norm1.linear.{suffix}"] = s[b + f"adaLN_modulation.1.{suffix}"]
            q, k, v = s[b + f"attn.qkv.{suffix}"].chunk(3, dim=0)
            m[d + f"attn1.to_q.{suffix}"], m[d + f"attn1.to_k.{suffix}"], m[d + f"attn1.to_v.{suffix}"] = q, k, v
            m[d + f"attn1.to_out.0.{suffix}"] = s[b + f"attn.proj.{suffix}"]
            m[d + f"ff.net.0.proj.{suffix}"] = s[b + f"mlp.fc1.{suffix}"]
            m[d + f"ff.net.2.{suffix}"] = s[b + f"mlp.fc2.{suffix}"]
    for suffix in ("weight", "bias"):
        m[f"proj_out_1.{suffix}"] = s[f"final_layer.adaLN_modulation.1.{suffix}"]
        m[f"proj_out_2.{suffix}"] = s[f"final_layer.linear.{suffix}"]
    theirs.load_state_dict(m, strict=True)
    for block in theirs.transformer_blocks:
        # diffusers' DiT port uses downscale_freq_shift=1 (frequencies over half-1); the reference DiT (and we)
        # divide by half. Align theirs to the reference for the comparison.
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return theirs.eval()


def test_matches_diffusers_dit():
    ours = randomize(DiT(**SMALL, learn_sigma=True)).eval()
    theirs = to_diffusers(ours)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0.0, 421.0, 999.0])
    y = torch.tensor([0, 7, 10])  # 10 = null class
    with torch.no_grad():
        a = ours(x, t, y)
        b = theirs(x, timestep=t, class_labels=y).sample
    assert a.shape == b.shape == (3, 8, 8, 8)
    assert a.abs().max() > 0.1
    assert (a - b).abs().max() <= 1e-5


def test_timestep_embedding_is_dit_form():
    t = torch.tensor([0.0, 1.5, 999.0])
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double()[:, None] * freqs
    ref = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    assert torch.allclose(timestep_embedding(t, 256).double(), ref, atol=1e-4)


def test_xl2_param_count():
    with torch.device("meta"):
        m = build_model("dit", "XL/2", latent_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - 675e6) / 675e6 < 0.01, n


def test_registry_errors_and_config_roundtrip():
    with pytest.raises(ValueError, match="unknown arch 'nope'.*dit"):
        build_model("nope", "tiny", latent_size=8, in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match=r"unknown size 'XXL/2'.*XL/2"):
        build_model("dit", "XXL/2", latent_size=8, in_channels=4, num_classes=10)
    with pytest.raises(ValueError, match="bogus"):
        build_model("dit", "tiny", latent_size=8, in_channels=4, num_classes=10, bogus=1)
    m = randomize(build_model("dit", "tiny", latent_size=8, in_channels=4, num_classes=10, control_mode="additive"))
    m2 = model_from_config(m.config)
    m2.load_state_dict(m.state_dict())
    x, t, y, c = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 600.0]), torch.tensor([1, 2]), torch.rand(2, 7) * 300
    assert torch.equal(m(x, t, y, c), m2(x, t, y, c))


def test_pos_embed_interpolate_and_extrapolate():
    old = sincos_2d(64, 4)
    new = sincos_2d(64, 8, 4)  # 2x denser grid over the old coordinate range
    assert torch.equal(new.reshape(8, 8, 64)[::2, ::2], old.reshape(4, 4, 64))
    assert torch.equal(sincos_2d(64, 4, None), sincos_2d(64, 4, 4))
    assert not torch.allclose(sincos_2d(64, 8), new)
    # independent reference: diffusers' 2-D sin-cos table (same layout as DiT/MAE)
    ref = get_2d_sincos_pos_embed(64, 6, base_size=6, output_type="pt")
    assert torch.allclose(sincos_2d(64, 6), ref.float(), atol=1e-6)
    # the model evaluates its buffer with its configured base
    m = DiT(**{**SMALL, "latent_size": 16}, pos_embed_base=4)
    assert torch.equal(m.pos_embed[0], new)


def test_control_weight_and_time_mapping():
    assert noise_level(torch.tensor([0.0, 999.0]))[1] == 1.0
    assert noise_level(torch.tensor([0.0]))[0] == 0.0
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(control_weight(t), torch.cos(math.pi / 2 * t), atol=1e-6)
    assert torch.allclose(control_weight(t, 2.0), torch.cos(math.pi / 2 * t) ** 2, atol=1e-6)
    assert control_weight(torch.tensor([1.0]))[0] == 0.0
    assert control_weight(torch.tensor([0.5]), offset=0.5)[0] == 0.0
    with pytest.raises(ValueError, match="blur"):
        ControlEmbedder(16, exponents={"blur": 2})


def test_disentangled_control_vanishes_at_pure_noise():
    m = randomize(DiT(**SMALL, control_mode="disentangled")).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    y = torch.tensor([3, 4])
    c1 = torch.tensor([[256.0, 256, 0, 0, 256, 256, 0], [512, 384, 10, 20, 300, 300, 1]])
    c2 = torch.tensor([[64.0, 900, 5, 7, 64, 64, 1], [100, 100, 0, 0, 100, 100, 0]])
    with torch.no_grad():
        t = torch.full((2,), 999.0)
        assert torch.equal(m(x, t, y, c1), m(x, t, y, c2))
        assert torch.equal(m(x, t, y, c1), m(x, t, y))  # w = 0 is exactly "no control"
        t = torch.full((2,), 500.0)
        assert (m(x, t, y, c1) - m(x, t, y, c2)).abs().max() > 1e-3
        # control_keep = 0 drops the control
        assert torch.equal(m(x, t, y, c1, torch.zeros(2)), m(x, t, y))
    additive = randomize(DiT(**SMALL, control_mode="additive")).eval()
    with torch.no_grad():
        t = torch.full((2,), 999.0)
        assert (additive(x, t, y, c1) - additive(x, t, y, c2)).abs().max() > 1e-3


def test_adaln_zero_init_outputs_zero():
    m = DiT(**SMALL, control_mode="disentangled")
    out = m(torch.randn(2, 4, 8, 8), torch.tensor([1.0, 700.0]), torch.tensor([0, 10]), torch.rand(2, 7) * 100)
    assert out.shape == (2, 8, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(0)
    a = randomize(DiT(**SMALL))
    b = model_from_config({**a.config, "gradient_checkpointing": True})
    b.load_state_dict(a.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3.0, 800.0]), torch.tensor([1, 2])
    a(x, t, y).square().sum().backward()
    b(x, t, y).square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_drop_conditions():
    y = torch.arange(8)
    labels, keep = drop_conditions(
        y, num_classes=10, class_dropout_prob=1.0, control_dropout_prob=0.0, generator=torch.Generator()
    )
    assert torch.equal(labels, torch.full_like(y, 10)) and torch.equal(keep, torch.ones(8))
    kw = dict(num_classes=10, class_dropout_prob=0.5, control_dropout_prob=0.5)
    r1 = drop_conditions(torch.arange(1000) % 10, generator=torch.Generator().manual_seed(3), **kw)
    r2 = drop_conditions(torch.arange(1000) % 10, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(r1[0], r2[0]) and torch.equal(r1[1], r2[1])
    dropped = r1[0] == 10
    assert 400 < dropped.sum() < 600 and 400 < (r1[1] == 0).sum() < 600
    # independent: the two masks are not the same draw
    assert 150 < (dropped & (r1[1] == 0)).sum() < 350


def test_transfer_loads_all_weights_changes_only_pos_embed():
    low = randomize(DiT(**SMALL, control_mode="disentangled"), seed=5)
    high = DiT(**{**SMALL, "latent_size": 16}, control_mode="disentangled")
    fresh_pe = high.pos_embed.clone()
    transfer_state(low.state_dict(), low.config, high, pos_embed="interpolate")
    hs, ls = high.state_dict(), low.state_dict()
    assert set(hs) == set(ls) and "pos_embed" not in hs
    assert all(torch.equal(hs[k], ls[k]) for k in ls)
    assert torch.equal(high.pos_embed[0], sincos_2d(64, 8, 4))
    assert not torch.equal(high.pos_embed, fresh_pe)
    # the config records the base, so a rebuilt checkpoint has the same embedding
    assert torch.equal(model_from_config(high.config).pos_embed, high.pos_embed)

    ext = DiT(**{**SMALL, "latent_size": 16}, control_mode="disentangled")
    transfer_state(low.state_dict(), low.config, ext, "extrapolate")
    assert ext.config["pos_embed_base"] is None and torch.equal(ext.pos_embed, fresh_pe)

    # same resolution: the transferred model computes exactly what the source does
    same = transfer_state(low.state_dict(), low.config, DiT(**SMALL, control_mode="disentangled"), "interpolate")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(same(x, t, y), low(x, t, y))

    wide = DiT(**{**SMALL, "latent_size": 16, "hidden_size": 128})
    with pytest.raises(ValueError, match="shape mismatch for parameter 'x_embedder.proj.weight'"):
        transfer_state(DiT(**SMALL).state_dict(), SMALL | {"arch": "dit"}, wide, "interpolate")
    with pytest.raises(ValueError, match="control_embedder"):
        with_control = DiT(**SMALL, control_mode="additive")
        transfer_state(DiT(**SMALL).state_dict(), SMALL | {"arch": "dit"}, with_control, "interpolate")
