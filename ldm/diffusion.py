"""Training objectives: DDPM epsilon-prediction (DiT, PixArt, mDT, LDM) and rectified flow (SD3/mmDiT).

Both take all randomness (timesteps, then noise) from the caller's ``torch.Generator`` so that a resumed
run replays the same draws, and both call the model with a float timestep on the 0..999 scale
(``conditioning.TIME_SCALE``), so one timestep embedder and one control schedule serve both objectives.
``draw`` makes those draws for a whole batch and ``loss(..., draws=...)`` takes a slice of them, so a
global batch split into micro-batches or over ranks sees the same timesteps and noise per sample.

DDPM with a learned-sigma model (2C output channels, DiT's ``learn_sigma``) trains improved-DDPM's hybrid
loss L_simple + lambda * L_vlb with lambda = 0.001: L_vlb is estimated by T * L_t at the uniformly drawn t,
so the per-sample term added is 0.001 * T * L_t (= L_t for T = 1000, exactly DiT's ``MSE + vb``). L_t sees
the eps prediction detached, so the VLB trains only the variance head.

Masked training (MDT): a model whose ``config["mask_ratio"] > 0`` gets, in training mode, a second forward
pass on the same x_t with ``mask_generator=generator`` (the model draws its token mask from it), and the
per-sample loss is loss_full + loss_masked. MDT draws fresh noise for the masked pass; here both passes
share x_t (one draw per sample, so micro-batching does not change the draws).

Resolution shift (PAPER.md, "noise-schedule scaling"): more pixels need more noise for the same signal
destruction. VP/DDPM: shift log-SNR by ``-2 log(shift)``, i.e. SNR'(t) = SNR(t) / shift**2, applied to
``alphas_cumprod`` and turned back into betas for diffusers' schedulers. Flow: SD3's
``t' = a t / (1 + (a - 1) t)``. For both, ``shift = res'/res`` (= sqrt(N'/N) tokens); 1.0 is exact identity.
"""
from __future__ import annotations

import math
from typing import Any

import torch

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


def _masked_training(model: torch.nn.Module) -> bool:
    """MDT: the model masks tokens (`DiffusionModel.masks_tokens`) and is training; looks through DDP/FSDP."""
    inner = getattr(model, "module", model)  # the wrapped model under DDP/FSDP
    return model.training and inner.masks_tokens


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) of data on 256 bins in [-1, 1] under N(means, exp(log_scales)^2) (improved DDPM's decoder
    L_0; the edge bins take the tails). Uses the exact normal CDF, not guided-diffusion's tanh approximation."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = torch.special.ndtr(inv_std * (centered + 1.0 / 255.0))
    cdf_min = torch.special.ndtr(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DDPMObjective:
    """Epsilon-prediction MSE on diffusers' DDPM schedule (DiT: linear betas 1e-4..0.02, 1000 steps;
    ``beta_schedule="cosine"`` is Nichol & Dhariwal's, diffusers' ``squaredcos_cap_v2``; ``"scaled_linear"`` is
    LDM's: linear in sqrt(beta) from 0.0015 to 0.0195, computed in float64 as latent-diffusion's
    ``make_beta_schedule("linear")`` does, where diffusers' ``scaled_linear`` rounds through float32). A model
    returning 2C channels (learned sigma) adds the VLB term (module docstring) so its sigma head trains.
    """

    kind = "ddpm"
    BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "squaredcos_cap_v2")
    #: (beta_start, beta_end) when the caller gives none: DiT/ADM's linear range, LDM's cin256-v2 range
    BETA_RANGES = {"linear": (1e-4, 0.02), "scaled_linear": (0.0015, 0.0195)}

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        resolution_shift: float = 1.0,
        beta_start: float | None = None,
        beta_end: float | None = None,
        vlb_lambda: float = 1e-3,
    ):
        if beta_schedule not in self.BETA_SCHEDULES:
            raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: {', '.join(self.BETA_SCHEDULES)}")
        if resolution_shift <= 0:
            raise ValueError(f"resolution_shift must be > 0, got {resolution_shift}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        self.resolution_shift = float(resolution_shift)
        self.vlb_weight = float(vlb_lambda) * num_train_timesteps
        # imported here, not at module level: diffusers costs ~1.3 s of import per process, and the flow
        # objective (most jobs of a study) never builds a DDPM schedule
        from diffusers import DDPMScheduler

        start, end = self.BETA_RANGES.get(beta_schedule, self.BETA_RANGES["linear"])
        start, end = start if beta_start is None else beta_start, end if beta_end is None else beta_end
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(start**0.5, end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
            base = DDPMScheduler(num_train_timesteps=num_train_timesteps, trained_betas=betas.tolist(),
                                 clip_sample=False)
        else:
            base = DDPMScheduler(
                num_train_timesteps=num_train_timesteps,
                beta_schedule="squaredcos_cap_v2" if beta_schedule == "cosine" else beta_schedule,
                beta_start=start,
                beta_end=end,
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
        # posterior q(x_{t-1} | x_t, x0) in float64; log-variance clipped at t = 0 (it is 0 there) as DiT does
        betas, ab = self.betas.to(torch.float64), self.alphas_cumprod.to(torch.float64)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        self._post_logvar = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
        self._post_c1 = betas * ab_prev.sqrt() / (1.0 - ab)
        self._post_c2 = (1.0 - ab_prev) * (1.0 - betas).sqrt() / (1.0 - ab)
        self._log_betas = torch.log(betas)

    def scheduler_kwargs(self) -> dict[str, Any]:
        """Arguments that give another diffusers scheduler (DDIM, DPM-Solver) exactly these betas."""
        return dict(num_train_timesteps=self.num_train_timesteps, trained_betas=self.betas.tolist())

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        ab = self.alphas_cumprod.to(torch.float64)[timesteps.long().cpu()]
        return ab / (1.0 - ab)

    def draw(self, shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps (B,) then noise (float32, ``shape``) from ``generator``."""
        t = torch.randint(0, self.num_train_timesteps, (shape[0],), generator=generator, device=generator.device)
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
        return t, noise

    def vb_terms(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """L_t per sample in bits per dim: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0, the decoder NLL
        at t = 0. ``output`` is the model's (eps, v) with v in [-1, 1] interpolating the log-variance between
        the clipped posterior's and beta_t's (improved DDPM's learned range); eps enters detached."""
        C = x0.shape[1]
        eps, v = output[:, :C].float().detach(), output[:, C:].float()
        x0, x_t = x0.float(), x_t.float()
        idx = t.long().cpu()

        def at(table):
            return table[idx].to(device=x0.device, dtype=torch.float32).view(-1, *([1] * (x0.ndim - 1)))

        ab = at(self.alphas_cumprod.to(torch.float64))
        c1, c2, post_logvar = at(self._post_c1), at(self._post_c2), at(self._post_logvar)
        frac = (v + 1.0) / 2.0
        model_logvar = frac * at(self._log_betas) + (1.0 - frac) * post_logvar
        pred_x0 = (x_t - (1.0 - ab).sqrt() * eps) / ab.sqrt()
        model_mean = c1 * pred_x0 + c2 * x_t
        true_mean = c1 * x0 + c2 * x_t
        dims = tuple(range(1, x0.ndim))
        kl = normal_kl(true_mean, post_logvar, model_mean, model_logvar).mean(dim=dims) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).mean(dim=dims) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, nll, kl)

    def _per_sample(self, output, x0, x_t, t, noise) -> torch.Tensor:
        loss = _mse_per_sample(output, noise)
        if output.shape[1] == 2 * x0.shape[1]:
            loss = loss + self.vlb_weight * self.vb_terms(x0, x_t, t, output)
        return loss

    def loss(
        self, model: torch.nn.Module, x0: torch.Tensor, model_kwargs: dict[str, Any], generator: torch.Generator | None,
        draws: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-sample loss (B,). Timesteps then noise come from ``draws`` or, if None, from ``generator``
        (which an MDT model also draws its mask from)."""
        t, noise = self.draw(x0.shape, generator) if draws is None else draws
        t, noise = t.to(x0.device), noise.to(device=x0.device, dtype=x0.dtype)
        x_t = self.scheduler.add_noise(x0, noise, t)
        loss = self._per_sample(model(x_t, t.float(), **model_kwargs), x0, x_t, t, noise)
        if _masked_training(model):
            masked = model(x_t, t.float(), **model_kwargs, mask_generator=generator)
            loss = loss + self._per_sample(masked, x0, x_t, t, noise)
        return loss


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

    def draw(self, shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Times (B,) then noise (float32, ``shape``) from ``generator``."""
        t = self.sample_t(shape[0], generator)
        return t, torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)

    def _per_sample(self, output, target) -> torch.Tensor:
        if output.shape[1] == 2 * target.shape[1]:
            raise ValueError("a learned-sigma model (2C output channels) has no rectified-flow loss for its "
                             "sigma head; build it with learn_sigma=False or use the ddpm objective")
        return _mse_per_sample(output, target)

    def loss(
        self, model: torch.nn.Module, x0: torch.Tensor, model_kwargs: dict[str, Any], generator: torch.Generator | None,
        draws: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Per-sample loss (B,). t then noise come from ``draws`` or, if None, from ``generator``."""
        B = x0.shape[0]
        t, noise = self.draw(x0.shape, generator) if draws is None else draws
        t, noise = t.to(x0.device), noise.to(device=x0.device, dtype=x0.dtype)
        tb = t.to(x0.dtype).reshape(B, *([1] * (x0.ndim - 1)))
        x_t = (1.0 - tb) * x0 + tb * noise
        loss = self._per_sample(model(x_t, t * self.time_scale, **model_kwargs), noise - x0)
        if _masked_training(model):
            masked = model(x_t, t * self.time_scale, **model_kwargs, mask_generator=generator)
            loss = loss + self._per_sample(masked, noise - x0)
        return loss


OBJECTIVES = {"ddpm": DDPMObjective, "rectified_flow": RectifiedFlowObjective}


def build_objective(name: str, **kw: Any) -> DDPMObjective | RectifiedFlowObjective:
    """``"ddpm"`` or ``"rectified_flow"`` with that class's keyword arguments."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name](**kw)
