"""The baselines' own protocol pieces against the original repositories' formulas, written out here:
LDM's scaled-linear betas (latent-diffusion `make_beta_schedule("linear")`), DiT's 3-channel guidance
(`models.py: forward_with_cfg`) and mDT-v2's power-cosine guidance scale (`masked_diffusion/models.py:
forward_with_cfg`, scale_pow = 4)."""
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from ldm.diffusion import DDPMObjective
from ldm.models.dit import DiT
from ldm.sampling import guidance_scale, guided_prediction, sample_latents

SMALL = dict(latent_size=8, in_channels=4, num_classes=10, hidden_size=32, depth=2, num_heads=2, patch_size=2)


def random_dit(**kw) -> DiT:
    model = DiT(**{**SMALL, **kw})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def test_ldm_betas_are_the_released_scaled_linear_schedule():
    # latent-diffusion ldm/modules/diffusionmodules/util.py, schedule "linear" (cin256-v2: 0.0015 .. 0.0195)
    ldm = np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=np.float64) ** 2
    obj = DDPMObjective(beta_schedule="scaled_linear")
    assert torch.equal(obj.betas, torch.tensor(ldm, dtype=torch.float32))
    theirs = np.cumprod(1.0 - ldm)  # LDM keeps alphas_cumprod in float64 before registering float32 buffers
    assert np.abs(obj.alphas_cumprod.double().numpy() - theirs).max() < 2e-6
    # diffusers' scaled_linear is the same schedule, rounded through float32
    assert torch.allclose(obj.betas, DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0015,
                                                   beta_end=0.0195).betas, rtol=1e-6, atol=0)
    assert not torch.allclose(obj.betas, DDPMObjective().betas)  # not DiT's linear range


def dit_forward_with_cfg(model, x, t, y, cfg_scale):
    """DiT's `forward_with_cfg`, as released: guidance on the first 3 channels of the first half's noise."""
    half = x[: len(x) // 2]
    combined = torch.cat([half, half], dim=0)
    model_out = model(combined, t, y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def mdt_scale(cfg_scale, t, diffusion_steps=1000, scale_pow=4.0):
    """mDT-v2's per-step scale in `forward_with_cfg`."""
    scale_step = (1 - torch.cos(((1 - t / diffusion_steps) ** scale_pow) * math.pi)) * 1 / 2
    return (cfg_scale - 1) * scale_step + 1


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_three_channel_guidance_equals_dits_forward_with_cfg(learn_sigma):
    model = random_dit(learn_sigma=learn_sigma)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([1, 5, 9])
    t = torch.tensor([10.0, 500.0, 990.0])
    with torch.no_grad():
        theirs = dit_forward_with_cfg(model, torch.cat([x, x]), torch.cat([t, t]),
                                      torch.cat([y, torch.full_like(y, 10)]), 4.0)[:3]
        ours = guided_prediction(model, x, t, y, None, 4.0, 1.0, guided_channels=3)
        every = guided_prediction(model, x, t, y, None, 4.0, 1.0)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert not torch.allclose(every[:, 3], theirs[:, 3], atol=1e-4)  # the 4th channel: conditional, not guided


def test_power_cosine_scale_equals_mdts_forward_with_cfg():
    t = torch.tensor([999.0, 900.0, 500.0, 250.0, 100.0, 0.0])
    want = mdt_scale(3.8, t)
    got = torch.tensor([guidance_scale(3.8, float(v), "power_cosine", 4.0) for v in t])
    assert torch.allclose(got, want, atol=1e-6)
    assert got[0] < 1.001 and abs(got[-1] - 3.8) < 1e-6  # from ~1 at pure noise to the full scale at t = 0
    assert guidance_scale(3.8, 500.0) == 3.8  # constant
    with pytest.raises(ValueError, match="needs a power"):
        guidance_scale(3.8, 500.0, "power_cosine")


def test_sampling_with_mdts_schedule_equals_a_loop_over_its_forward_with_cfg():
    """End to end: DDIM with the power-cosine schedule and 3 guided channels is a hand-written DDIM loop over
    mDT's own per-step formula (applied to our model's outputs)."""
    from diffusers import DDIMScheduler

    model, obj = random_dit(), DDPMObjective()
    y = torch.tensor([2, 7])
    out = sample_latents(model, obj, y, None, latent_shape=(4, 8, 8), steps=4, guidance_semantic=3.8, seeds=[3, 4],
                         batch_size=2, guidance_schedule="power_cosine", guidance_power=4.0, guidance_channels=3)
    sched = DDIMScheduler(trained_betas=obj.betas.tolist(), clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing="trailing")
    sched.set_timesteps(4)
    xs = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (3, 4)])
    with torch.no_grad():
        for ts in sched.timesteps:
            tb = torch.full((2,), float(ts))
            cond, uncond = model(xs, tb, y), model(xs, tb, torch.full_like(y, 10))
            scale = mdt_scale(3.8, tb).view(-1, 1, 1, 1)
            eps = torch.cat([uncond[:, :3] + scale * (cond[:, :3] - uncond[:, :3]), cond[:, 3:4]], dim=1)
            xs = sched.step(eps, ts, xs).prev_sample
    assert torch.allclose(out, xs, atol=1e-5)
