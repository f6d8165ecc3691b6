"""Training objectives: DDPM epsilon-prediction (DiT, PixArt, mDT, LDM) and rectified flow (SD3/mmDiT).

Both take all randomness (timesteps, then noise) from the caller's ``torch.Generator`` so that a resumed
run replays the same draws, and both call the model with a float timestep on the 0..999 scale
(``conditioning.TIME_SCALE``), so one timestep embedder and one control schedule serve both objectives.

Resolution shift (PAPER.md, "noise-schedule scaling"): more pixels need more noise for the same signal
destruction. VP/DDPM: shift log-SNR by ``-2 log(shift)``, i.e. SNR'(t) = SNR(t) / shift**2, applied to
``alphas_cumprod`` and turned back into betas for diffusers' schedulers. Flow: SD3's
``t' = a t / (1 + (a - 1) t)``. For both, ``shift = res'/res`` (= sqrt(N'/N) tokens); 1.0 is exact identity.
"""
from __future__ import annotations

from typing import Any

import torch
from diffusers import DDPMScheduler

from .models.conditioning import TIME_SCALE

__all__ = [
    "DDPMObjective",
    "RectifiedFlowObjective",
    "build_objective",
    "shift_alphas_cumprod",
    "shift_flow_time",
    "OBJECTIVES",
]


def shift_alphas_cumprod(alphas_cumprod: torch.Tensor, shift: float) -> torch.Tensor:
    """VP schedule with log-SNR shifted by -2 log(shift): ab' = ab / (ab + shift^2 (1 - ab)), float64."""
    ab = alphas_cumprod.to(torch.float64)
    return ab / (ab + shift**2 * (1.0 - ab))


def shift_flow_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3 timestep shift t' = a t / (1 + (a - 1) t); a > 1 moves mass towards noise (t = 1)."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def _mse_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # a learned-sigma model returns 2C channels: the MSE uses the first C (the eps / velocity prediction)
    if pred.shape[1] == 2 * target.shape[1]:
        pred = pred[:, : target.shape[1]]
    if pred.shape != target.shape:
        raise ValueError(f"model output {tuple(pred.shape)} does not match target {tuple(target.shape)}")
    return ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, target.ndim)))


class DDPMObjective:
    """Epsilon-prediction MSE on diffusers' DDPM schedule (DiT: linear betas 1e-4..0.02, 1000 steps).

    Only the simple loss is implemented; DiT's learned-sigma VLB term is not (sigma channels get no gradient).
    """

    kind = "ddpm"
    BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        resolution_shift: float = 1.0,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ):
        if beta_schedule not in self.BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: {', '.join(self.BETA_SCHEDULES)}")
        if resolution_shift <= 0:
            raise ValueError(f"resolution_shift must be > 0, got {resolution_shift}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.resolution_shift = float(resolution_shift)
        base = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            clip_sample=False,
        )
        if self.resolution_shift == 1.0:
            self.scheduler = base
        else:
            ab = shift_alphas_cumprod(base.alphas_cumprod, self.resolution_shift)
            prev = torch.cat([ab.new_ones(1), ab[:-1]])
            betas = 1.0 - ab / prev
            self.scheduler = DDPMScheduler(
                num_train_timesteps=num_train_timesteps, trained_betas=betas.tolist(), clip_sample=False
            )
        self.betas = self.scheduler.betas.clone()
        self.alphas_cumprod = self.scheduler.alphas_cumprod.clone()

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Arguments that give another diffusers scheduler (DDIM, DPM-Solver) exactly these betas."""
        return dict(num_train_timesteps=self.num_train_timesteps, trained_betas=self.betas.tolist())

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod.to(torch.float64)[timesteps.long().cpu()]
        return ab / (1.0 - ab)

    def loss(
        self, model: torch.nn.Module, x0: torch.Tensor, model_kwargs: dict[str, Any], generator: torch.Generator
    ) -> torch.Tensor:
        """Per-sample loss (B,). Draws timesteps then noise (float32) from ``generator``."""
        B = x0.shape[0]
        t = torch.randint(0, self.num_train_timesteps, (B,), generator=generator, device=generator.device)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32)
        t, noise = t.to(x0.device), noise.to(device=x0.device, dtype=x0.dtype)
        x_t = self.scheduler.add_noise(x0, noise, t)
        return _mse_per_sample(model(x_t, t.float(), **model_kwargs), noise)


class RectifiedFlowObjective:
    """x_t = (1 - t) x0 + t eps, velocity target eps - x0, t ~ logit-normal(m, s) then SD3-shifted.

    ``logit_normal=None`` samples t uniformly. The model sees ``t * 999`` (``TIME_SCALE``).
    """

    kind = "flow"

    def __init__(self, logit_normal: tuple[float, float] | None = (0.0, 1.0), shift: float = 1.0):
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.logit_normal = None if logit_normal is None else (float(logit_normal[0]), float(logit_normal[1]))
        self.shift = float(shift)
        self.time_scale = TIME_SCALE

    def sample_t(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        if self.logit_normal is None:
            t = torch.rand(batch, generator=generator, device=generator.device)
        else:
            m, s = self.logit_normal
            t = torch.sigmoid(m + s * torch.randn(batch, generator=generator, device=generator.device))
        return shift_flow_time(t, self.shift)

    def loss(
        self, model: torch.nn.Module, x0: torch.Tensor, model_kwargs: dict[str, Any], generator: torch.Generator
    ) -> torch.Tensor:
        """Per-sample loss (B,). Draws t then noise (float32) from ``generator``."""
        B = x0.shape[0]
        t = self.sample_t(B, generator)
        noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32)
        t, noise = t.to(x0.device), noise.to(device=x0.device, dtype=x0.dtype)
        tb = t.to(x0.dtype).reshape(B, *([1] * (x0.ndim - 1)))
        x_t = (1.0 - tb) * x0 + tb * noise
        return _mse_per_sample(model(x_t, t * self.time_scale, **model_kwargs), noise - x0)


OBJECTIVES = {"ddpm": DDPMObjective, "rectified_flow": RectifiedFlowObjective}


def build_objective(name: str, **kw: Any) -> DDPMObjective | RectifiedFlowObjective:
    """``"ddpm"`` or ``"rectified_flow"`` with that class's keyword arguments."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**kw)
