"""Control-metadata conditioning (SDXL micro-conditioning, and the paper's disentangled variant).

The control vector of a sample (fields, order and groups: ``ldm.control``, defined once there) is
``(orig_h, orig_w, crop_top, crop_left, crop_h, crop_w)`` in raw pixels. Each scalar gets a 256-d sinusoidal
embedding (as SDXL); the scalars of one group (``size``: orig_h, orig_w; ``crop``: the crop box) are
concatenated and mapped by that group's MLP to the hidden size.

Each group's embedding is scaled by a time weight ``w(t) = cos(pi/2 * clamp(t + offset, 0, 1)) ** p`` with
``t`` the noise level in [0, 1] (1 = pure noise). ``mode="additive"`` is SDXL (w = 1); ``"disentangled"``
is the paper's fix, whose formula is not public. The defaults (``DEFAULT_EXPONENTS``, offsets 0) are ASSUMED,
chosen so that geometric controls act earlier in sampling than low-level ones, as the paper argues: the
``crop`` group (crop box, flip) with p = 0.5 still weighs 0.40 at t = 0.9, the ``size`` group with p = 2 only
0.02 (it shapes detail, late). p = 1 for both is the "shared w(t)" ablation.
Per-group MLPs (rather than one MLP over all six scalars) make w(t) = 0 remove a group exactly.

Model time convention: models receive ``t_model = t * TIME_SCALE`` with ``TIME_SCALE = 999`` so DDPM
timesteps 0..999 and rectified-flow times in [0, 1] share one timestep embedder and DDPM t = 999 is
exactly pure noise (t = 1) here.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from ..control import CONTROL_FIELDS, CONTROL_GROUPS, check_shape
from .layers import CaptionEmbedder, masked_mean, timestep_embedding

__all__ = [
    "TIME_SCALE",
    "CONTROL_FIELDS",
    "CONTROL_GROUPS",
    "CONTROL_MODES",
    "noise_level",
    "control_weight",
    "ControlEmbedder",
    "drop_conditions",
    "SEMANTIC_MODES",
    "TOKEN_MODES",
    "resolve_semantic",
    "semantic_condition",
]

TIME_SCALE = 999.0
CONTROL_MODES = ("additive", "disentangled")
#: w(t) exponent per control group when a model is given none (ASSUMED, see the module docstring)
DEFAULT_EXPONENTS = {"size": 2.0, "crop": 0.5}


def noise_level(t_model: torch.Tensor) -> torch.Tensor:
    """Model timestep (0..999, float) -> noise level in [0, 1], 1 = pure noise."""
    return (t_model.float() / TIME_SCALE).clamp(0.0, 1.0)


def control_weight(t: torch.Tensor, exponent: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    """w(t) = cos(pi/2 * clamp(t + offset, 0, 1)) ** exponent, for t in [0, 1].

    Written as sin(pi/2 * (1 - s)) so that w is exactly 0 at s = 1 (cos(pi/2) is 6e-17 in floating point,
    which would leak the control into the pure-noise step).
    """
    s = (t.float() + offset).clamp(0.0, 1.0)
    return torch.sin(0.5 * math.pi * (1.0 - s)) ** exponent


class ControlEmbedder(nn.Module):
    """Control vector (B, CONTROL_WIDTH) -> (B, hidden), to be added to the timestep + class embedding."""

    def __init__(
        self,
        hidden_size: int,
        mode: str = "disentangled",
        exponents: Mapping[str, float] | None = None,
        offsets: Mapping[str, float] | None = None,
        frequency_embedding_size: int = 256,
    ):
        super().__init__()
        if mode not in CONTROL_MODES:
            raise ValueError(f"unknown control mode {mode!r}; valid: {', '.join(CONTROL_MODES)}")
        for name, given in (("exponents", exponents), ("offsets", offsets)):
            unknown = set(given or {}) - set(CONTROL_GROUPS)
            if unknown:
                raise ValueError(f"unknown control group(s) {sorted(unknown)} in {name}; valid: {list(CONTROL_GROUPS)}")
        self.mode = mode
        self.exponents = {g: float((exponents or {}).get(g, DEFAULT_EXPONENTS[g])) for g in CONTROL_GROUPS}
        self.offsets = {g: float((offsets or {}).get(g, 0.0)) for g in CONTROL_GROUPS}
        self.frequency_embedding_size = frequency_embedding_size
        self.groups = nn.ModuleDict(
            {
                g: nn.Sequential(
                    nn.Linear(len(idx) * frequency_embedding_size, hidden_size),
                    nn.SiLU(),
                    nn.Linear(hidden_size, hidden_size),
                )
                for g, idx in CONTROL_GROUPS.items()
            }
        )
        self.initialize()

    def initialize(self) -> None:
        """Input layers N(0, 0.02) like DiT's timestep MLP; output layers zero, so adding control to a
        pretrained class-conditional model leaves its outputs unchanged at the first fine-tuning step."""
        for mlp in self.groups.values():
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.zeros_(mlp[0].bias)
            nn.init.zeros_(mlp[2].weight)
            nn.init.zeros_(mlp[2].bias)

    def weights(self, t_model: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-group time weights (B,) for model timesteps t_model (B,)."""
        if self.mode == "additive":
            return {g: torch.ones_like(t_model, dtype=torch.float32) for g in CONTROL_GROUPS}
        t = noise_level(t_model)
        return {g: control_weight(t, self.exponents[g], self.offsets[g]) for g in CONTROL_GROUPS}

    def forward(
        self, control: torch.Tensor, t_model: torch.Tensor, control_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_shape(control)
        B = control.shape[0]
        weights = self.weights(t_model.reshape(-1).expand(B) if t_model.numel() == 1 else t_model)
        dtype = self.groups["size"][0].weight.dtype
        out = 0
        for g, idx in CONTROL_GROUPS.items():
            freq = timestep_embedding(control[:, list(idx)].reshape(-1), self.frequency_embedding_size)
            emb = self.groups[g](freq.reshape(B, -1).to(dtype))
            out = out + weights[g].to(emb.dtype)[:, None] * emb
        if control_keep is not None:
            out = out * control_keep.to(out.dtype).reshape(B, 1)
        return out


def drop_conditions(
    class_labels: torch.Tensor,
    *,
    num_classes: int,
    class_dropout_prob: float,
    control_dropout_prob: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent condition dropout for two-scale guidance: returns (labels, control_keep).

    Dropped labels become the null class ``num_classes``; ``control_keep`` is a float 0/1 mask (B,).
    Draws come from ``generator`` (class first, then control) so a resumed run replays them exactly.
    """
    B = class_labels.shape[0]
    u = torch.rand(2, B, generator=generator, device=generator.device).to(class_labels.device)
    labels = torch.where(u[0] < class_dropout_prob, torch.full_like(class_labels, num_classes), class_labels)
    control_keep = (u[1] >= control_dropout_prob).float()
    return labels, control_keep


#: where semantic conditions (class, caption) enter: "adaln" pooled into the modulation vector c; "attention"
#: as their own token stream in joint attention with the image tokens (`layers.JointAttention`; the paper's
#: disentangled semantic path); "cross_attention" as keys/values of a cross-attention (PixArt's and LDM's own
#: route for captions; with a class it is a single key, i.e. a per-sample bias: kept as a named ablation).
SEMANTIC_MODES = ("adaln", "attention", "cross_attention")
TOKEN_MODES = ("attention", "cross_attention")  # the modes in which semantics are tokens


def resolve_semantic(semantic: str | None, default: str, text_dim: int | None, arch: str,
                     supported: tuple[str, ...] = SEMANTIC_MODES) -> str:
    """The semantic mode a model is built with: ``None`` takes the architecture's own ``default``.

    Text conditioning needs tokens to attend to, so text-conditional models must use a token mode."""
    semantic = default if semantic is None else semantic
    if semantic not in SEMANTIC_MODES:
        raise ValueError(f"unknown semantic mode {semantic!r}; valid: {', '.join(SEMANTIC_MODES)}")
    if semantic not in supported:
        raise ValueError(f"{arch} has no semantic mode {semantic!r}; valid for {arch}: {', '.join(supported)}")
    if text_dim is not None and semantic not in TOKEN_MODES:
        raise ValueError(f"text-conditional {arch} (text_dim={text_dim}) needs semantic='attention' or "
                         f"'cross_attention', got {semantic!r}")
    return semantic


def semantic_condition(
    y_embedder: nn.Module,
    semantic: str,
    class_labels: torch.Tensor | None,
    text: torch.Tensor | None,
    text_mask: torch.Tensor | None,
    text_keep: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Semantic inputs -> (vector added to the adaLN conditioning or None, attention tokens or None, token mask).

    ``y_embedder`` is a ``layers.LabelEmbedder`` (class-conditional) or ``layers.CaptionEmbedder`` (text).
    semantic="adaln": the class embedding (a caption: the masked mean of its projected tokens) joins the
    timestep embedding (DiT); the token modes: it is one token (a caption: its tokens) for joint or cross
    attention, and the adaLN path never sees it.
    """
    if isinstance(y_embedder, CaptionEmbedder):
        if text is None:
            raise ValueError("this model is text-conditional (text_dim set) and needs text=(B, L, text_dim)")
        tokens, mask = y_embedder(text, text_mask, text_keep)
        if semantic == "adaln":
            return masked_mean(tokens, mask), None, None
        return None, tokens, mask
    if class_labels is None:
        raise ValueError("this model is class-conditional (text_dim=None) and needs class_labels")
    emb = y_embedder(class_labels)
    if semantic == "adaln":
        return emb, None, None
    return None, emb.unsqueeze(1), None
