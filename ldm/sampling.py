"""Sampling latents with two-scale classifier-free guidance (semantic and control).

Guided prediction (eps for DDPM, velocity for flow), with null class = ``num_classes`` and control dropped
via ``control_keep = 0``:

    out = e(∅,∅) + g_ctrl * (e(∅,c) - e(∅,∅)) + g_sem * (e(y,c) - e(∅,c))

Only the passes the formula needs are run (g_sem = g_ctrl = 1: the conditional pass alone; no control or
g_ctrl = 1: two passes), batched into one forward call. For a learned-sigma model only the first C
channels are guided; the variance channels come from the conditional pass (as DiT's sampler).
``guided_channels=k`` guides only the first k latent channels and takes the rest from the conditional pass:
DiT's, mDT's and PixArt's ``forward_with_cfg`` guide 3 of 4 channels "for exact reproducibility", which their
published FIDs depend on.

Guidance schedules (``guidance_scale``): "constant", or mDT-v2's "power_cosine", which raises each scale g
from 1 at pure noise to g at the clean end: (g - 1) * (1 - cos(pi * (1 - t / 1000) ** p)) / 2 + 1, with t the
model time (DDPM timestep; flow: 999 * t) and p = 4 in mDT's ``forward_with_cfg`` (``scale_pow``). Both scales
(semantic and control) follow it.

Samplers. DDPM objective: ``ddim`` (diffusers DDIMScheduler, eta 0, "trailing" spacing so the first step
is t = 999, final step to alpha = 1 so the result is the model's x0), ``dpm`` (DPMSolverMultistepScheduler,
DPM-Solver++ 2M), ``ddpm`` (ancestral DDPMScheduler, IDDPM respacing; learned-range variance when the
model has 2C output channels, as DiT's reference sampler). All are configured with the objective's
exact betas (resolution shift included). Flow objective: ``euler`` (``ddim`` is accepted as a synonym: DDIM with eta 0 on the
straight flow path is exactly the Euler step). The Euler loop is hand-written rather than diffusers'
FlowMatchEulerDiscreteScheduler because that scheduler fixes its own sigma grid (ending at 1/1000, model
time sigma * 1000, its own shift options); our 6-line loop uses exactly the training convention
(t in [0, 1] shifted by the objective's SD3 shift, model time t * 999).

Guidance interval (Kynkäänniemi et al. 2024): with ``guidance_interval=(lo, hi)`` guidance is applied
only at steps whose noise level ``t_model / 999`` lies in [lo, hi] (1 = pure noise; flow: the shifted t,
DDPM: timestep / 999); elsewhere both scales are 1 and only the conditional pass runs.

Text-conditional models (``text`` given): the semantic condition is the caption, dropped by
``text_keep = 0`` (the model's learned null caption) instead of the null class; ``class_labels`` is None.

Reproducibility, bit for bit. The initial noise of image i comes from
``torch.Generator().manual_seed(seeds[i])`` (and the ancestral sampler's step noise from that same
generator). That alone is not enough: CPU GEMM (and cuBLAS) pick kernels and blockings by matrix shape,
so the same image in a batch of 7 and of 32 can differ in its last float bits, and 16 denoising steps
amplify them. So the model is never called on "the current batch": images are split into fixed forward
groups of ``micro_batch`` consecutive indices (group g = images [g*m, (g+1)*m), the last group shorter),
and every model call evaluates exactly one group (times the guidance passes). ``batch_size`` (images in
flight through the denoising loop) is rounded up to a multiple of ``micro_batch`` so that a group is never
split between batches. Everything else in a step is elementwise. Image i therefore goes through the same
floating-point operations on the same operands whatever ``batch_size`` is: identical bits for batch sizes
7 and 32 (tests/test_sampling.py), and for any sharding whose boundaries are multiples of ``micro_batch``.
``micro_batch`` is part of the protocol (recorded in the samples index): changing it may change last bits.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .control import check_shape
from .diffusion import DDPMObjective, RectifiedFlowObjective, shift_flow_time
from .spec import SAMPLERS as CONFIG_SAMPLERS

__all__ = ["sample_latents", "guided_prediction", "guidance_scale", "SAMPLERS", "FORWARD_BATCH", "in_interval",
           "GUIDANCE_SCHEDULES"]

#: Samplers per objective kind: what configs may name (`ldm.spec.SAMPLERS`), plus "ddim" for flow, accepted as
#: a synonym (DDIM with eta 0 on the straight path is the Euler step).
SAMPLERS = {"ddpm": CONFIG_SAMPLERS["ddpm"], "flow": (*CONFIG_SAMPLERS["rectified_flow"], "ddim")}
#: Default forward group (images per model call, before the guidance passes): 8-16 rows are the fastest
#: tiny-DiT calls on one CPU thread (measured 228 and 213 images/s against 154 at 32).
FORWARD_BATCH = 16
TIME_NORM = 999.0  # model time of pure noise (both objectives)
GUIDANCE_SCHEDULES = ("constant", "power_cosine")
SCHEDULE_STEPS = 1000.0  # mDT's `diffusion_steps`: the power-cosine schedule's time unit


def guidance_scale(scale: float, t_model: float, schedule: str = "constant", power: float | None = None) -> float:
    """The guidance scale at model time ``t_model`` (module docstring): constant, or mDT's power-cosine ramp."""
    if schedule == "constant":
        return float(scale)
    if schedule != "power_cosine":
        raise ValueError(f"unknown guidance schedule {schedule!r}; valid: {', '.join(GUIDANCE_SCHEDULES)}")
    if power is None or power <= 0:
        raise ValueError(f"the power_cosine guidance schedule needs a power > 0, got {power}")
    ramp = (1.0 - math.cos(((1.0 - float(t_model) / SCHEDULE_STEPS) ** power) * math.pi)) / 2.0
    return (float(scale) - 1.0) * ramp + 1.0


def guided_prediction(
    model: torch.nn.Module,
    x: torch.Tensor,
    t_model: torch.Tensor,
    class_labels: torch.Tensor | None,
    control: torch.Tensor | None,
    guidance_semantic: float,
    guidance_control: float,
    *,
    text: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    micro_batch: int | None = None,
    guided_channels: int | None = None,
) -> torch.Tensor:
    """Two-scale guided model output for a batch, running only the passes the scales need.

    With ``micro_batch`` the rows are evaluated in consecutive groups of that many (each group's passes in
    one call), so a row's result depends only on its group, not on the batch size (module docstring).
    ``guided_channels`` (None = all): how many leading latent channels are guided.
    """
    B = x.shape[0]
    m = B if micro_batch is None else micro_batch
    if B > m:
        def rows(v, s):
            return None if v is None else v[s]
        outs = [guided_prediction(model, x[s:s + m], t_model[s:s + m], rows(class_labels, slice(s, s + m)),
                                  rows(control, slice(s, s + m)), guidance_semantic, guidance_control,
                                  text=rows(text, slice(s, s + m)), text_mask=rows(text_mask, slice(s, s + m)),
                                  guided_channels=guided_channels)
                for s in range(0, B, m)]
        return torch.cat(outs)
    C = x.shape[1]
    need_null_ctrl = control is not None and guidance_control != 1.0
    need_null_sem = guidance_semantic != 1.0 or need_null_ctrl
    # (semantic kept, control kept) per pass: conditional, semantic dropped, both dropped
    passes = [(1.0, 1.0)] + ([(0.0, 1.0)] if need_null_sem else []) + ([(0.0, 0.0)] if need_null_ctrl else [])
    n = len(passes)

    def keep(i: int) -> torch.Tensor:
        return torch.cat([torch.full((B,), p[i], device=x.device) for p in passes])

    kwargs = {}
    if control is not None:
        kwargs["control"] = control.repeat(n, 1)
        kwargs["control_keep"] = keep(1)
    if text is not None:  # text model: the caption is the semantic condition, dropped via text_keep = 0
        kwargs["text"] = text.repeat(n, 1, 1)
        kwargs["text_keep"] = keep(0)
        if text_mask is not None:
            kwargs["text_mask"] = text_mask.repeat(n, 1)
        labels = None if class_labels is None else class_labels.repeat(n)
    else:
        null = torch.full_like(class_labels, model.num_classes)
        labels = torch.cat([class_labels if p[0] else null for p in passes])
    out = model(x.repeat(n, 1, 1, 1), t_model.repeat(n), labels, **kwargs).float()
    outs = out.chunk(n, dim=0)
    e_yc = outs[0][:, :C]
    if not need_null_sem:
        guided = e_yc
    elif not need_null_ctrl:
        e_nc = outs[1][:, :C]
        guided = e_nc + guidance_semantic * (e_yc - e_nc)
    else:
        e_nc, e_nn = outs[1][:, :C], outs[2][:, :C]
        guided = e_nn + guidance_control * (e_nc - e_nn) + guidance_semantic * (e_yc - e_nc)
    if guided_channels is not None and guided_channels < C:
        guided = torch.cat([guided[:, :guided_channels], e_yc[:, guided_channels:]], dim=1)
    return torch.cat([guided, outs[0][:, C:]], dim=1) if outs[0].shape[1] > C else guided


def in_interval(level: float, interval: Sequence[float] | None) -> bool:
    """Whether guidance applies at noise level `level` (0 = clean, 1 = pure noise); None = everywhere."""
    return interval is None or float(interval[0]) <= level <= float(interval[1])


def _ddpm_scheduler(objective: DDPMObjective, sampler: str, learn_sigma: bool):
    # diffusers imported on use (~1.3 s per process): flow-objective sampling never needs its schedulers
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    kw = objective.scheduler_kwargs()
    if sampler == "ddim":
        return DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    if sampler == "dpm":
        return DPMSolverMultistepScheduler(**kw, algorithm_type="dpmsolver++", solver_order=2)
    # "linspace" = IDDPM's respacing (0 and 999 both visited): the last step is t = 0, where no noise is
    # added; with "trailing" the last step would be t > 0 and a learned-range variance would add noise.
    variance = "learned_range" if learn_sigma else "fixed_small"
    return DDPMScheduler(**kw, clip_sample=False, variance_type=variance, timestep_spacing="linspace")


def _sample_batch(model, objective, cond, noise, gens, steps, g_sem, g_ctrl, sampler, interval, micro_batch,
                  guidance):
    dev = noise.device
    dtype = next(model.parameters()).dtype

    def predict(x, t_model, level):
        gs, gc = (g_sem, g_ctrl) if in_interval(level, interval) else (1.0, 1.0)
        at = float(t_model[0])  # every row of a batch is at the same step
        gs, gc = (guidance_scale(g, at, guidance["schedule"], guidance["power"]) for g in (gs, gc))
        return guided_prediction(model, x.to(dtype), t_model, cond["labels"], cond["control"], gs, gc,
                                 text=cond["text"], text_mask=cond["text_mask"], micro_batch=micro_batch,
                                 guided_channels=guidance["channels"])

    if objective.kind == "flow":
        ts = shift_flow_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), objective.shift)
        x = noise
        for i in range(steps):
            t = torch.full((x.shape[0],), float(ts[i]), device=dev)
            v = predict(x, t * objective.time_scale, float(ts[i]))
            x = x + float(ts[i + 1] - ts[i]) * v[:, : x.shape[1]]
        return x
    learn_sigma = model.learns_sigma
    scheduler = _ddpm_scheduler(objective, sampler, learn_sigma)
    scheduler.set_timesteps(steps, device=dev)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        tb = torch.full((x.shape[0],), float(t), device=dev)
        out = predict(scheduler.scale_model_input(x, t), tb, float(t) / (objective.num_train_timesteps - 1))
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
    guidance_interval: Sequence[float] | None = None,
    micro_batch: int = FORWARD_BATCH,
    text: torch.Tensor | None = None,
    text_mask: torch.Tensor | None = None,
    guidance_schedule: str = "constant",
    guidance_power: float | None = None,
    guidance_channels: int | None = None,
) -> torch.Tensor:
    """Sample N latents (N, C, h, w), float32, on the model's device; model in eval mode, no grad.

    ``class_labels`` (N,) or, for a text model, None with ``text`` (N, L, D) and ``text_mask`` (N, L).
    ``batch_size`` is rounded up to a multiple of ``micro_batch`` (see the module docstring).
    ``guidance_schedule``/``guidance_power``: `guidance_scale`; ``guidance_channels``: `guided_prediction`.
    """
    if class_labels is None and text is None:
        raise ValueError("need class_labels (class model) or text (text model)")
    N = (class_labels if class_labels is not None else text).shape[0]
    if len(seeds) != N:
        raise ValueError(f"need one seed per image: {N} labels but {len(seeds)} seeds")
    if control is not None:
        check_shape(control, rows=N)
    valid = SAMPLERS[objective.kind]
    if sampler not in valid:
        raise ValueError(f"unknown sampler {sampler!r} for {objective.kind} objective; valid: {', '.join(valid)}")
    if steps < 1 or batch_size < 1 or micro_batch < 1:
        raise ValueError(f"steps, batch_size and micro_batch must be >= 1, got {steps}, {batch_size}, {micro_batch}")
    if guidance_interval is not None and not (len(guidance_interval) == 2
                                              and 0 <= guidance_interval[0] <= guidance_interval[1] <= 1):
        raise ValueError(f"guidance_interval must be [lo, hi] with 0 <= lo <= hi <= 1, got {guidance_interval}")
    guidance_scale(2.0, 0.0, guidance_schedule, guidance_power)  # a bad schedule fails before any compute
    if guidance_channels is not None and not 1 <= guidance_channels <= latent_shape[0]:
        raise ValueError(f"guidance_channels must be in 1..{latent_shape[0]} (latent channels), got {guidance_channels}")
    guidance = {"schedule": guidance_schedule, "power": guidance_power, "channels": guidance_channels}
    batch_size = -(-batch_size // micro_batch) * micro_batch  # whole forward groups per batch
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
                cond = {"labels": None if class_labels is None else class_labels[idx].to(dev),
                        "control": None if control is None else control[idx].to(device=dev, dtype=torch.float32),
                        "text": None if text is None else text[idx].to(dev),
                        "text_mask": None if text_mask is None else text_mask[idx].to(dev)}
                x = _sample_batch(model, objective, cond, noise, gens, steps, guidance_semantic, guidance_control,
                                  sampler, guidance_interval, micro_batch, guidance)
                out.append(x.float())
    finally:
        model.train(was_training)
    return torch.cat(out)
