"""Sampling: bit-exact batch-size invariance, guidance interval, text-model guidance passes."""
import pytest
import torch
from torch import nn

from ldm.diffusion import DDPMObjective, RectifiedFlowObjective
from ldm.models.dit import DiT
from ldm.sampling import guided_prediction, in_interval, sample_latents

SMALL = dict(latent_size=8, in_channels=4, num_classes=10, hidden_size=32, depth=2, num_heads=2, patch_size=2)


def random_dit(seed=0, **kw):
    m = DiT(**{**SMALL, **kw})
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


def conditions(n):
    labels = torch.arange(n) % 10
    control = torch.tensor([[96.0, 96, 0, 0, 96, 96, 0]]).repeat(n, 1)
    return labels, control


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("objective,sampler,kw", [
    (RectifiedFlowObjective(shift=2.0), "euler", dict(control_mode="additive", learn_sigma=False)),
    (DDPMObjective(), "ddim", dict(control_mode="disentangled")),
    (DDPMObjective(), "dpm", dict(control_mode="additive")),
    (DDPMObjective(), "ddpm", dict(control_mode="additive", learn_sigma=True)),
])
def test_batch_sizes_7_and_32_give_identical_bits(objective, sampler, kw):
    model = random_dit(**kw)
    n = 40  # not a multiple of 7, 16 or 32: ragged last batches and a short last forward group
    labels, control = conditions(n)
    args = dict(latent_shape=(4, 8, 8), steps=3, guidance_semantic=3.0, guidance_control=2.0,
                seeds=[1000 + i for i in range(n)], sampler=sampler, guidance_interval=[0.1, 0.9])
    a = sample_latents(model, objective, labels, control, batch_size=7, **args)
    b = sample_latents(model, objective, labels, control, batch_size=32, **args)
    assert a.shape == (n, 4, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    # one forward group per model call: batch 7 with micro_batch 1 is not rounded up at all
    c = sample_latents(model, objective, labels, control, batch_size=7, micro_batch=1, **args)
    d = sample_latents(model, objective, labels, control, batch_size=32, micro_batch=1, **args)
    assert torch.equal(c, d)
    # sharding on forward-group boundaries: the second shard sampled alone gives the same images
    shard = sample_latents(model, objective, labels[16:], control[16:], batch_size=5,
                           **{**args, "seeds": args["seeds"][16:]})
    assert torch.equal(shard, a[16:])


class Counter(nn.Module):
    """Model stub: output depends on (x, label, control_keep, text_keep) row by row; records call sizes."""

    learns_sigma = masks_tokens = False  # the capability flags of the model base (ldm.models.base)

    def __init__(self, num_classes=10):
        super().__init__()
        self.num_classes, self.calls = num_classes, []
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, class_labels=None, control=None, control_keep=None, text=None, text_mask=None,
                text_keep=None):
        self.calls.append({"rows": x.shape[0], "t": float(t[0]), "text_keep": text_keep, "labels": class_labels,
                           "text_mask": text_mask})
        out = 0.1 * x
        if class_labels is not None:
            out = out + 0.01 * class_labels.float().view(-1, 1, 1, 1)
        if text is not None:
            out = out + 0.01 * (text.mean((1, 2)) * text_keep).view(-1, 1, 1, 1)
        if control_keep is not None:
            out = out + 0.02 * control_keep.view(-1, 1, 1, 1)
        return out


def test_guidance_interval_limits_guided_steps():
    obj = RectifiedFlowObjective(shift=1.0)
    labels, control = conditions(4)
    base = dict(latent_shape=(4, 8, 8), steps=4, guidance_control=2.0, seeds=[0, 1, 2, 3], batch_size=4)
    m = Counter()
    sample_latents(m, obj, labels, control, guidance_semantic=3.0, guidance_interval=[0.3, 0.8], **base)
    # flow times 1, .75, .5, .25: guided (3 passes x 4 rows) only at .75 and .5
    assert [c["rows"] for c in m.calls] == [4, 12, 12, 4]
    assert [round(c["t"] / 999, 2) for c in m.calls] == [1.0, 0.75, 0.5, 0.25]
    # an interval that excludes every step equals unguided sampling; [0, 1] equals no interval
    none = sample_latents(Counter(), obj, labels, control, guidance_semantic=3.0, guidance_interval=[0.0, 0.1],
                          **{**base, "guidance_control": 2.0})
    plain = sample_latents(Counter(), obj, labels, control, guidance_semantic=1.0, **{**base, "guidance_control": 1.0})
    assert torch.equal(none, plain)
    full = sample_latents(Counter(), obj, labels, control, guidance_semantic=3.0, guidance_interval=[0.0, 1.0], **base)
    always = sample_latents(Counter(), obj, labels, control, guidance_semantic=3.0, **base)
    assert torch.equal(full, always) and not torch.equal(full, plain)
    assert in_interval(0.5, None) and in_interval(0.3, [0.3, 0.8]) and not in_interval(0.81, [0.3, 0.8])
    with pytest.raises(ValueError, match="guidance_interval"):
        sample_latents(Counter(), obj, labels, control, guidance_semantic=3.0, guidance_interval=[0.8, 0.3], **base)


def test_ddpm_interval_uses_timestep_over_999():
    m = Counter()
    sample_latents(m, DDPMObjective(), torch.tensor([1, 2]), None, latent_shape=(4, 8, 8), steps=4,
                   guidance_semantic=2.0, seeds=[0, 1], batch_size=2, sampler="ddim", guidance_interval=[0.5, 1.0])
    # trailing DDIM timesteps 999, 749, 499, 249: guided (2 passes) while t/999 >= 0.5
    assert [c["rows"] for c in m.calls] == [4, 4, 2, 2]


def test_text_model_guidance_drops_the_caption_not_a_class():
    m = Counter()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.full((3,), 500.0)
    text, mask = torch.randn(3, 5, 8, generator=g), torch.ones(3, 5, dtype=torch.bool)
    with torch.no_grad():
        out = guided_prediction(m, x, t, None, None, 4.0, 1.0, text=text, text_mask=mask)
        call = m.calls[-1]
        assert call["rows"] == 6 and call["labels"] is None and call["text_mask"].shape == (6, 5)
        assert call["text_keep"].tolist() == [1.0] * 3 + [0.0] * 3
        cond = m(x, t, None, text=text, text_mask=mask, text_keep=torch.ones(3))
        null = m(x, t, None, text=text, text_mask=mask, text_keep=torch.zeros(3))
    assert torch.allclose(out, null + 4.0 * (cond - null), atol=1e-6)
    # end to end with text only (no labels), micro-batched
    lat = sample_latents(Counter(), RectifiedFlowObjective(), None, None, latent_shape=(4, 8, 8), steps=2,
                         guidance_semantic=2.0, seeds=[0, 1, 2], batch_size=2, micro_batch=2, text=text,
                         text_mask=mask)
    assert lat.shape == (3, 4, 8, 8)
    with pytest.raises(ValueError, match="class_labels .* or text"):
        sample_latents(Counter(), RectifiedFlowObjective(), None, None, latent_shape=(4, 8, 8), steps=2,
                       guidance_semantic=2.0, seeds=[0], batch_size=1)


class _Rows(dict):
    """In-memory stand-in for `MappedRows` (whose equality with the loaded cache tests/test_latents.py checks)."""

    def column(self, name):
        return self[name]

    def gather(self, idx, names):
        return {n: self[n][idx] for n in names}


class _Cache:
    """The things `class_caption_rows` and `caption_states` read from a LatentDataset."""

    def __init__(self, labels, lengths, dim=6, length=5):
        self.dir = "cache"
        self.classes = ["a", "b"]
        states = torch.arange(len(labels) * length * dim, dtype=torch.float32).reshape(len(labels), length, dim)
        self._data = {"label": torch.tensor(labels), "text_len": torch.tensor(lengths), "text_emb": states.half()}

    def tensors(self):
        return self._data

    def rows(self):
        return _Rows(self._data)


def test_sampling_captions_are_class_balanced_fixed_and_padded_as_trained():
    from ldm.config import RECIPE_DEFAULTS, merge
    from ldm.spec import Recipe, from_section
    from ldm.stages.sample import caption_states, class_caption_rows

    def sampling_captions(cache, labels, recipe, seed):
        section = merge(RECIPE_DEFAULTS, {"arch": "dit", "size": "tiny", **recipe})
        return caption_states(cache.rows(), class_caption_rows(cache, labels), from_section(Recipe, "text", section),
                              seed)

    cache = _Cache(labels=[1, 0, 1, 0, 1], lengths=[2, 3, 1, 5, 2])
    labels = torch.arange(6) % 2  # a b a b a b
    states, mask = sampling_captions(cache, labels, {"text_padding": "replicate"}, seed=0)
    # class a rows in cache order: 1, 3 (cycling); class b rows: 0, 2, 4
    rows = [1, 0, 3, 2, 1, 4]
    src = cache.tensors()["text_emb"].float()
    for i, r in enumerate(rows):
        n = int(cache.tensors()["text_len"][r])
        assert torch.equal(states[i, :n], src[r, :n])
        for j in range(n, states.shape[1]):  # replicate: padded position j copies real token j mod n
            assert torch.equal(states[i, j], src[r, j % n])
    assert mask is None
    zero_states, zero_mask = sampling_captions(cache, labels, {"text_padding": "zero_mask"}, seed=0)
    assert zero_mask is not None and zero_mask[0].tolist() == [True, True, True, False, False]
    noisy1, _ = sampling_captions(cache, labels, {"text_padding": "noisy_replicate"}, seed=0)
    noisy2, _ = sampling_captions(cache, labels, {"text_padding": "noisy_replicate"}, seed=0)
    assert torch.equal(noisy1, noisy2) and not torch.equal(noisy1, states)
