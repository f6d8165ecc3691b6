"""Sampling latents with two-scale classifier-free guidance (semantic and control).

Guided prediction (eps for DDPM, velocity for flow), with null class = ``num_classes`` and control dropped
via ``control_keep = 0``:

    out = e(∅,∅) + g_ctrl * (e(∅,c) - e(∅,∅)) + g_sem * (e(y,c) - e(∅,c))

Only the passes the formula needs are run (g_sem = g_ctrl = 1: the conditional pass alone; no control or
g_ctrl = 1: two passes), batched into one forward call. For a learned-sigma model only the first C
channels are guided; the variance channels come from the conditional pass (as DiT's sampler).

Samplers. DDPM objective: ``ddim`` (diffusers DDIMScheduler, eta 0, "trailing" spacing so the first step
is t = 999, final step to alpha = 1 so the result is the model's x0), ``dpm`` (DPMSolverMultistepScheduler,
DPM-Solver++ 2M), ``ddpm`` (ancestral DDPMScheduler, IDDPM respacing; learned-range variance when the
model has 2C output channels, as DiT's reference sampler). All are configured with the objective's
exact betas (resolution shift included). Flow objective: ``euler`` (``ddim`` is accepted as a synonym: DDIM with eta 0 on the
straight flow path is exactly the Euler step). The Euler loop is hand-written rather than diffusers'
FlowMatchEulerDiscreteScheduler because that scheduler fixes its own sigma grid (ending at 1/1000, model
time sigma * 1000, its own shift options); our 6-line loop uses exactly the training convention
(t in [0, 1] shifted by the objective's SD3 shift, model time t * 999).

Reproducibility: the initial noise of image i comes from ``torch.Generator().manual_seed(seeds[i])`` (and
the ancestral sampler's step noise from that same generator), so image i does not depend on batch size
or on which other images are in its batch.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from .diffusion import DDPMObjective, RectifiedFlowObjective, shift_flow_time

__all__ = ["sample_latents", "guided_prediction", "SAMPLERS"]

SAMPLERS = {"ddpm": ("ddim", "dpm", "ddpm"), "flow": ("euler", "ddim")}


def guided_prediction(
    model: torch.nn.Module,
    x: torch.Tensor,
    t_model: torch.Tensor,
    class_labels: torch.Tensor,
    control: torch.Tensor | None,
    guidance_semantic: float,
    guidance_control: float,
) -> torch.Tensor:
    """Two-scale guided model output for a batch, running only the passes the scales need."""
    B, C = x.shape[0], x.shape[1]
    null = torch.full_like(class_labels, model.num_classes)
    need_null_ctrl = control is not None and guidance_control != 1.0
    need_null_cls = guidance_semantic != 1.0 or need_null_ctrl
    labels = [class_labels] + ([null] if need_null_cls else []) + ([null] if need_null_ctrl else [])
    keep = [1.0] + ([1.0] if need_null_cls else []) + ([0.0] if need_null_ctrl else [])
    n = len(labels)
    kwargs = {}
    if control is not None:
        kwargs["control"] = control.repeat(n, 1)
        kwargs["control_keep"] = torch.cat([torch.full((B,), k, device=x.device) for k in keep])
    out = model(x.repeat(n, 1, 1, 1), t_model.repeat(n), torch.cat(labels), **kwargs).float()
    outs = out.chunk(n, dim=0)
    e_yc = outs[0][:, :C]
    if not need_null_cls:
        guided = e_yc
    elif not need_null_ctrl:
        e_nc = outs[1][:, :C]
        guided = e_nc + guidance_semantic * (e_yc - e_nc)
    else:
        e_nc, e_nn = outs[1][:, :C], outs[2][:, :C]
        guided = e_nn + guidance_control * (e_nc - e_nn) + guidance_semantic * (e_yc - e_nc)
    return torch.cat([guided, outs[0][:, C:]], dim=1) if outs[0].shape[1] > C else guided


def _ddpm_scheduler(objective: DDPMObjective, sampler: str, learn_sigma: bool):
    kw = objective.scheduler_kwargs()
    if sampler == "ddim":
        return DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    if sampler == "dpm":
        return DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2)
    # "linspace" = IDDPM's respacing (0 and 999 both visited): the last step is t = 0, where no noise is
    # added; with "trailing" the last step would be t > 0 and a learned-range variance would add noise.
    variance = "learned_range" if learn_sigma else "fixed_small"
    return DDPMScheduler(**kw, clip_sample=False, variance_type=variance, timestep_spacing="linspace")


def _sample_batch(model, objective, labels, control, noise, gens, steps, g_sem, g_ctrl, sampler):
    dev = noise.device
    dtype = next(model.parameters()).dtype
    if objective.kind == "flow":
        ts = shift_flow_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), objective.shift)
        x = noise
        for i in range(steps):
            t = torch.full((x.shape[0],), float(ts[i]), device=dev)
            v = guided_prediction(model, x.to(dtype), t * objective.time_scale, labels, control, g_sem, g_ctrl)
            x = x + float(ts[i + 1] - ts[i]) * v[:, : x.shape[1]]
        return x
    learn_sigma = getattr(model, "out_channels", noise.shape[1]) == 2 * noise.shape[1]
    scheduler = _ddpm_scheduler(objective, sampler, learn_sigma)
    scheduler.set_timesteps(steps, device=dev)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        tb = torch.full((x.shape[0],), float(t), device=dev)
        inp = scheduler.scale_model_input(x, t).to(dtype)
        out = guided_prediction(model, inp, tb, labels, control, g_sem, g_ctrl)
        if sampler == "ddpm":
            x = scheduler.step(out, t, x, generator=gens).prev_sample
        else:
            x = scheduler.step(out[:, : x.shape[1]], t, x).prev_sample
    return x


def sample_latents(
    model: torch.nn.Module,
    objective: DDPMObjective | RectifiedFlowObjective,
    class_labels: torch.Tensor,
    control: torch.Tensor | None,
    *,
    latent_shape: tuple[int, int, int],
    steps: int,
    guidance_semantic: float,
    guidance_control: float = 1.0,
    seeds: Sequence[int],
    batch_size: int,
    sampler: str = "ddim",
) -> torch.Tensor:
    """Sample N latents (N, C, h, w), float32, on the model's device; model in eval mode, no grad."""
    N = class_labels.shape[0]
    if len(seeds) != N:
        raise ValueError(f"need one seed per image: {N} labels but {len(seeds)} seeds")
    if control is not None and tuple(control.shape) != (N, 6):
        raise ValueError(f"control must be ({N}, 6), got {tuple(control.shape)}")
    valid = SAMPLERS[objective.kind]
    if sampler not in valid:
        raise ValueError(f"unknown sampler {sampler!r} for {objective.kind} objective; valid: {', '.join(valid)}")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for s in range(0, N, batch_size):
                idx = slice(s, min(s + batch_size, N))
                gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds[idx]]
                noise = torch.stack([torch.randn(latent_shape, generator=g) for g in gens]).to(dev)
                labels = class_labels[idx].to(dev)
                ctrl = None if control is None else control[idx].to(device=dev, dtype=torch.float32)
                x = _sample_batch(
                    model, objective, labels, ctrl, noise, gens, steps, guidance_semantic, guidance_control, sampler
                )
                out.append(x.float())
    finally:
        model.train(was_training)
    return torch.cat(out)
