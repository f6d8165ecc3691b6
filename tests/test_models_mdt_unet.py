"""mDT-v2 and LDM-UNet against the model contract, independent references (plain diffusers UNet, explicit
attention, closed-form parameter counts) and invariants (masking, zero init, conditioning routes, transfer)."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm.models import build_model, model_from_config
from ldm.models.layers import sincos_2d
from ldm.models.mdt import MDT, MDT_SIZES, RelativePositionBias, SelfAttention
from ldm.models.unet import UNET_SIZES, LDMUNet, backbone_kwargs
from ldm.transfer import transfer_state

BASE = dict(latent_size=8, in_channels=4, num_classes=10)
MDT_TINY = dict(BASE, **MDT_SIZES["tiny"])
UNET_TINY = dict(BASE, **UNET_SIZES["tiny"])
C1 = torch.tensor([[256.0, 256, 0, 0, 256, 256, 0], [512, 384, 10, 20, 300, 300, 1]])
C2 = torch.tensor([[64.0, 900, 5, 7, 64, 64, 1], [100, 100, 0, 0, 100, 100, 0]])


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Seeded noise in every parameter: fresh zero-initialised models output 0, which proves nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def inputs(seed: int = 1, size: int = 8, B: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 4, size, size, generator=g), torch.tensor([3.0, 500.0][:B]), torch.tensor([1, 10][:B])


def text_inputs(seed: int = 2, B: int = 2, L: int = 5, dim: int = 32):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 3:] = False
    return torch.randn(B, L, dim, generator=g), mask


@pytest.mark.parametrize("arch,cfg,semantic", [(a, c, s) for a, c in (("mdt", MDT_TINY), ("unet", UNET_TINY))
                                               for s in (MDT if a == "mdt" else LDMUNet).semantic_modes])
def test_forward_shapes_class_and_text_and_config_roundtrip(arch, cfg, semantic):
    cls = MDT if arch == "mdt" else LDMUNet
    x, t, y = inputs()
    m = randomize(cls(**cfg, semantic=semantic, learn_sigma=True, control_mode="additive"))
    with torch.no_grad():
        out = m(x, t, y, C1, torch.ones(2))
    assert out.shape == (2, 8, 8, 8) and m.out_channels == 8 and out.abs().max() > 1e-3
    rebuilt = model_from_config(m.config)
    rebuilt.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x, t, y, C1, torch.ones(2)), out)

    tm = randomize(cls(**cfg, semantic=semantic, text_dim=32, learn_sigma=False))
    text, mask = text_inputs()
    with torch.no_grad():
        out = tm(x, t, text=text, text_mask=mask, text_keep=torch.ones(2))
        assert out.shape == (2, 4, 8, 8) and tm.text_dim == 32
        # text_keep = 0 swaps in the learned null caption: the caption's content no longer matters
        drop = torch.zeros(2)
        a = tm(x, t, text=text, text_mask=mask, text_keep=drop)
        b = tm(x, t, text=text_inputs(seed=9)[0], text_mask=mask, text_keep=drop)
        assert torch.allclose(a, b, atol=1e-6)
        assert (a - out).abs().max() > 1e-4
        # padded (masked-out) positions carry no information
        text2 = text.clone()
        text2[0, 3:] += 5.0
        c = tm(x, t, text=text2, text_mask=mask, text_keep=torch.ones(2))
        assert torch.allclose(c, out, atol=1e-5)


def test_registry_builds_both():
    for arch in ("mdt", "unet"):
        m = build_model(arch, "tiny", **BASE)
        assert m.config["arch"] == arch and m.num_classes == 10 and m.in_channels == 4


def test_mdt_masked_forward_uses_only_the_generator():
    m = randomize(MDT(**{**MDT_TINY, "latent_size": 16}))
    x, t, y = inputs(size=16)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    with torch.no_grad():
        a = m(x, t, y, mask_generator=torch.Generator().manual_seed(7))
        b = m(x, t, y, mask_generator=torch.Generator().manual_seed(7))
        c = m(x, t, y, mask_generator=torch.Generator().manual_seed(8))
        full = m(x, t, y)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was never drawn from
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4 and (a - full).abs().max() > 1e-4
    # the mask token only matters on the masked pass (the side-interpolator fills dropped places with it)
    with torch.no_grad():
        m.mask_token.add_(1.0)
        assert torch.equal(m(x, t, y), full)
        assert (m(x, t, y, mask_generator=torch.Generator().manual_seed(7)) - a).abs().max() > 1e-4
    # mask_ratio = 0: the generator is ignored and untouched
    nomask = model_from_config({**m.config, "mask_ratio": 0.0, "mask_ratio_jitter": 0.0})
    nomask.load_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(3)
    gstate = g.get_state()
    with torch.no_grad():
        assert torch.equal(nomask.eval()(x, t, y, mask_generator=g), nomask(x, t, y))
    assert torch.equal(g.get_state(), gstate)


@pytest.mark.parametrize("jitter", [0.0, 0.2])
def test_mdt_masks_the_requested_share(jitter):
    m = randomize(MDT(**{**MDT_TINY, "latent_size": 16}, mask_ratio=0.3, mask_ratio_jitter=jitter))
    N = 64  # 8 x 8 tokens
    seen = []
    m.en_inblocks[0].register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    side = []
    m.sideblocks[0].register_forward_hook(lambda mod, args, out: side.append(out.shape[1]))
    x, t, y = inputs(size=16)
    with torch.no_grad():
        for s in range(20):
            m(x, t, y, mask_generator=torch.Generator().manual_seed(s))
        m(x, t, y)
    kept, full = seen[:-1], seen[-1]
    assert full == N and side == [N] * 20  # side-interpolator restores the full grid; unmasked pass skips it
    if jitter == 0.0:
        assert set(kept) == {int(N * 0.7)}
    else:
        assert all(int(N * 0.5) <= k <= int(N * 0.7) for k in kept) and len(set(kept)) > 1
    ids_keep, mask = m.draw_mask(3, N, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert mask.shape == (3, N) and torch.all(mask.sum(1) == N - ids_keep.shape[1])
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)
    assert all(len(set(r.tolist())) == ids_keep.shape[1] for r in ids_keep)  # distinct tokens per sample
    assert not torch.equal(ids_keep[0].sort().values, ids_keep[1].sort().values)  # per-sample draws


def test_mdt_relative_position_bias_and_masked_attention():
    g = 4
    rpb = RelativePositionBias(g, 2)
    with torch.no_grad():
        rpb.table.copy_(torch.randn(rpb.table.shape))
    bias = rpb()
    for i in range(g * g):
        for j in range(0, g * g, 3):
            dy, dx = i // g - j // g, i % g - j % g
            assert torch.equal(bias[:, i, j], rpb.table[(dy + g - 1) * (2 * g - 1) + dx + g - 1])
    # on kept tokens, attention uses the full bias restricted to the kept rows and columns
    attn = randomize(SelfAttention(16, 2, g))
    with torch.no_grad():
        attn.rel_pos_bias.table.copy_(torch.randn(attn.rel_pos_bias.table.shape))
    x = torch.randn(2, g * g, 16)
    ids = torch.stack([torch.randperm(g * g)[:7] for _ in range(2)])
    xs = torch.gather(x, 1, ids[..., None].expand(-1, -1, 16))
    with torch.no_grad():
        out = attn(xs, ids)
        q, k, v = attn.qkv(xs).reshape(2, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
        full_bias = attn.rel_pos_bias()
        ref = []
        for b in range(2):
            bb = full_bias[:, ids[b]][:, :, ids[b]]
            w = torch.softmax(q[b] @ k[b].transpose(-1, -2) / 8**0.5 + bb, dim=-1)
            ref.append((w @ v[b]).transpose(0, 1).reshape(7, 16))
        ref = attn.proj(torch.stack(ref))
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("semantic", ["adaln", "attention", "cross_attention"])
def test_fresh_models_output_zero(semantic):
    x, t, y = inputs()
    for m in [cls(**cfg, semantic=semantic, control_mode="disentangled")
              for cls, cfg in ((MDT, MDT_TINY), (LDMUNet, UNET_TINY)) if semantic in cls.semantic_modes]:
        with torch.no_grad():
            out = m(x, t, y, C1)
            assert torch.equal(out, torch.zeros_like(out)), type(m).__name__
    with torch.no_grad():
        out = MDT(**MDT_TINY)(x, t, y, mask_generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("semantic", MDT.semantic_modes)
def test_mdt_semantic_route(semantic):
    """token modes: every adaLN regressor sees only time (+ control); the class still changes the output."""
    m = randomize(MDT(**MDT_TINY, semantic=semantic))
    seen = []
    for block in m.all_blocks():
        block.adaLN_modulation.register_forward_hook(lambda mod, args, out: seen.append(out))
    m.final_layer.adaLN_modulation.register_forward_hook(lambda mod, args, out: seen.append(out))
    x, t, _ = inputs()
    with torch.no_grad():
        # masked pass, so the side-interpolator's regressor is checked too
        a = m(x, t, torch.tensor([1, 2]), mask_generator=torch.Generator().manual_seed(0))
        mods_a, seen[:] = list(seen), []
        b = m(x, t, torch.tensor([3, 10]), mask_generator=torch.Generator().manual_seed(0))
        mods_b = list(seen)
    assert len(mods_a) == len(m.all_blocks()) + 1
    same = all(torch.equal(p, q) for p, q in zip(mods_a, mods_b))
    assert same == (semantic != "adaln")
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("semantic", LDMUNet.semantic_modes)
def test_unet_semantic_route(semantic):
    """cross_attention: the time embedding fed to the ResBlocks does not depend on the class."""
    m = randomize(LDMUNet(**UNET_TINY, semantic=semantic))
    temb = []
    m.unet.down_blocks[0].resnets[0].register_forward_pre_hook(lambda mod, args: temb.append(args[1]))
    x, t, _ = inputs()
    with torch.no_grad():
        a = m(x, t, torch.tensor([1, 2]))
        b = m(x, t, torch.tensor([3, 10]))
    assert len(temb) == 2 and torch.equal(temb[0], temb[1]) == (semantic != "adaln")
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("cls,cfg", [(MDT, MDT_TINY), (LDMUNet, UNET_TINY)])
def test_disentangled_control_vanishes_where_weight_is_zero(cls, cfg):
    m = randomize(cls(**cfg, control_mode="disentangled"))
    x, _, y = inputs()
    with torch.no_grad():
        t = torch.full((2,), 999.0)  # w(1) = 0
        assert torch.equal(m(x, t, y, C1), m(x, t, y, C2))
        assert torch.equal(m(x, t, y, C1), m(x, t, y))
        t = torch.full((2,), 500.0)
        assert (m(x, t, y, C1) - m(x, t, y, C2)).abs().max() > 1e-4
        assert torch.equal(m(x, t, y, C1, torch.zeros(2)), m(x, t, y))
    additive = randomize(cls(**cfg, control_mode="additive"))
    with torch.no_grad():
        t = torch.full((2,), 999.0)
        assert (additive(x, t, y, C1) - additive(x, t, y, C2)).abs().max() > 1e-4


def _n(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_ldm4_param_count():
    """LDM paper (Rombach et al. 2022, Table 3/18): LDM-4 class-conditional ImageNet 400M. cin256-v2 at its
    own 64x64x3 latent: 400,920,579 in the UNet + 1001 x 512 class table = 401,433,091 (+0.36%)."""
    with torch.device("meta"):
        m = build_model("unet", "LDM-4", latent_size=64, in_channels=3, num_classes=1000)
    n = _n(m)
    assert n == 401_433_091, n
    assert abs(n - 400e6) / 400e6 < 0.01
    assert _n(m.unet) == 400_920_579
    assert m.unet.config.block_out_channels == (192, 384, 576, 960)


def test_mdtv2_xl2_param_count():
    """sail-sg/MDT models.py MDTv2-XL/2 (decode_layer 4) counted in closed form = 742,262,512 (ours drops the
    3 unused BEiT class-token rows per bias table, 29 x 3 x 16 = 1,392 params). The 676M quoted for
    MDT-XL/2 is the 28-block trunk: without v2's 16 skip-fusion linears and the training-only side block
    ours has 675,856,224 (-0.02% of 676M); v2's full count is 9.8% above 676M."""
    with torch.device("meta"):
        m = build_model("mdt", "XL/2", latent_size=32, in_channels=4, num_classes=1000)
    D, P, C, K, H, g, out = 1152, 2, 4, 1000, 16, 16, 8
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    block += (2 * g - 1) ** 2 * H
    skip = 2 * D * D + D
    embed = (C * P * P * D + D) + (256 * D + D + D * D + D) + (K + 1) * D
    final = (2 * D * D + 2 * D) + (D * P * P * out + P * P * out)
    extra = D + 2 * g * g * D  # mask token, encoder/decoder learned positional tables
    expected = 29 * block + 16 * skip + embed + final + extra
    n = _n(m)
    assert n == expected == 742_262_512, (n, expected)
    trunk = n - sum(p.numel() for k, p in m.named_parameters() if "skip_linear" in k or k.startswith("sideblocks"))
    assert trunk == 675_856_224 and abs(trunk - 676e6) / 676e6 < 0.001


def test_unet_matches_plain_diffusers_unet():
    """With control None the wrapper is exactly a diffusers UNet given the class embedding as the context."""
    ours = randomize(LDMUNet(**UNET_TINY, learn_sigma=True))
    cfg = ours.config
    plain = UNet2DConditionModel(
        **backbone_kwargs(4, 8, cfg["model_channels"], tuple(cfg["channel_mult"]), cfg["num_res_blocks"],
                          tuple(cfg["attention_levels"]), cfg["context_dim"], cfg["num_heads"])
    )
    plain.load_state_dict(ours.unet.state_dict(), strict=True)
    plain.eval()
    x, t, y = inputs(B=2)
    with torch.no_grad():
        a = ours(x, t, y)
        b = plain(x, t, encoder_hidden_states=ours.y_embedder(y)[:, None]).sample
    assert a.shape == b.shape == (2, 8, 8, 8) and a.abs().max() > 1e-2
    assert (a - b).abs().max() <= 1e-5
    # text: projected caption tokens as the context, the mask as diffusers' encoder_attention_mask
    tm = randomize(LDMUNet(**UNET_TINY, text_dim=32, learn_sigma=True))
    plain.load_state_dict(tm.unet.state_dict(), strict=True)
    text, mask = text_inputs()
    with torch.no_grad():
        a = tm(x, t, text=text, text_mask=mask)
        b = plain(x, t, encoder_hidden_states=tm.text_embedder.y_proj(text), encoder_attention_mask=mask.float()).sample
    assert (a - b).abs().max() <= 1e-5


def test_unet_qk_norm_and_checkpointing():
    m = randomize(LDMUNet(**UNET_TINY, qk_norm=True))
    norms = [mod for mod in m.unet.modules() if type(mod).__name__ == "Attention" and mod.norm_q is not None]
    assert len(norms) > 0
    ck = model_from_config({**m.config, "gradient_checkpointing": True})
    ck.load_state_dict(m.state_dict())
    x, t, y = inputs()
    m.train(), ck.train()
    m(x, t, y).square().sum().backward()
    ck(x, t, y).square().sum().backward()
    for (n, p), q in zip(m.named_parameters(), ck.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_mdt_gradient_checkpointing_same_grads():
    a = randomize(MDT(**MDT_TINY))
    b = model_from_config({**a.config, "gradient_checkpointing": True})
    b.load_state_dict(a.state_dict())
    x, t, y = inputs()
    a.train(), b.train()
    a(x, t, y, mask_generator=torch.Generator().manual_seed(0)).square().sum().backward()
    b(x, t, y, mask_generator=torch.Generator().manual_seed(0)).square().sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n


def test_unet_transfer_copies_every_weight():
    low = randomize(LDMUNet(**UNET_TINY, control_mode="disentangled"), seed=5)
    high = LDMUNet(**{**UNET_TINY, "latent_size": 16}, control_mode="disentangled")
    transfer_state(low.state_dict(), low.config, high, pos_embed="interpolate")
    hs, ls = high.state_dict(), low.state_dict()
    assert set(hs) == set(ls) and all(torch.equal(hs[k], ls[k]) for k in ls)
    assert "pos_embed_base" not in high.config
    x, t, y = inputs(size=16)
    with torch.no_grad():
        assert high.eval()(x, t, y, C1).shape == (2, 4, 16, 16)
        # no positional embedding: a UNet is the same function at any size
        assert torch.equal(high(x, t, y, C1), low(x, t, y, C1))
    with pytest.raises(ValueError, match="control_embedder"):
        transfer_state(LDMUNet(**UNET_TINY).state_dict(), LDMUNet(**UNET_TINY).config, high, "interpolate")


def test_mdt_transfer_resamples_learned_tables():
    low = randomize(MDT(**MDT_TINY, control_mode="disentangled"), seed=5)  # 4 x 4 tokens
    ls = low.state_dict()
    high = MDT(**{**MDT_TINY, "latent_size": 16}, control_mode="disentangled")  # 8 x 8 tokens
    transfer_state(ls, low.config, high, pos_embed="interpolate")
    hs = high.state_dict()
    assert set(hs) == set(ls)
    D = MDT_TINY["hidden_size"]
    assert high.config["pos_embed_base"] == 4.0 and torch.equal(high.pos_sincos[0], sincos_2d(D, 8, 4))
    for name in ("pos_delta", "decoder_pos_delta"):
        new = hs[name][0].reshape(8, 8, D)
        assert torch.allclose(new[::2, ::2], ls[name][0].reshape(4, 4, D), atol=1e-6)  # new tokens on old ones
        assert not torch.allclose(new[1::2, 1::2], new[::2, ::2], atol=1e-3)  # in between: interpolated
    rel = "en_inblocks.0.attn.rel_pos_bias.table"
    new, old = hs[rel].reshape(15, 15, -1), ls[rel].reshape(7, 7, -1)
    assert torch.allclose(new[1::2, 1::2], old, atol=1e-6)  # even new offsets land on old offsets (halved)
    unchanged = [k for k in ls if "pos_delta" not in k and "rel_pos_bias" not in k]
    assert all(torch.equal(hs[k], ls[k]) for k in unchanged)
    x, t, y = inputs(size=16)
    with torch.no_grad():
        assert high.eval()(x, t, y, C1).shape == (2, 8, 16, 16)
    rebuilt = model_from_config(high.config)
    rebuilt.load_state_dict(hs)
    assert torch.equal(rebuilt.pos_sincos, high.pos_sincos)

    ext = transfer_state(ls, low.config, MDT(**{**MDT_TINY, "latent_size": 16}, control_mode="disentangled"),
                         "extrapolate")
    es = ext.state_dict()
    assert ext.config["pos_embed_base"] is None
    assert torch.allclose(es["pos_delta"][0].reshape(8, 8, D)[:4, :4], ls["pos_delta"][0].reshape(4, 4, D), atol=1e-6)
    new = es[rel].reshape(15, 15, -1)
    assert torch.allclose(new[4:11, 4:11], old, atol=1e-6)  # offsets -3..3 keep their learned bias
    assert torch.allclose(new[0, 0], old[0, 0], atol=1e-6)  # beyond the trained range: the edge value

    same = transfer_state(ls, low.config, MDT(**MDT_TINY, control_mode="disentangled"), "interpolate")
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(same.eval()(x, t, y, C1), low(x, t, y, C1))
