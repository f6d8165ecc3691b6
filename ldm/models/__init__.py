"""Model registry: one architecture per file, built by (arch, size) or rebuilt from a saved ``config``.

Every model exposes ``config`` (JSON-able, includes ``arch``) so that a checkpoint's ``state.json`` is
enough to rebuild it with ``model_from_config``; sizes are presets of the constructor arguments.

The contract every architecture keeps (the training loop, samplers and transfer rely on nothing else):

- constructor keywords shared by all: ``latent_size, in_channels, num_classes, text_dim=None,
  learn_sigma, qk_norm, semantic=None (adaln | attention; None = the architecture's own), control_mode
  (None | additive | disentangled), control_exponents, control_offsets, class_dropout_prob,
  control_dropout_prob, gradient_checkpointing``; transformers also take ``pos_embed_base``.
- ``forward(x, t, class_labels=None, control=None, control_keep=None, text=None, text_mask=None,
  text_keep=None)``: ``x`` (B, C, H, W) latents; ``t`` (B,) float model time 0..999 (999 = pure noise);
  ``class_labels`` (B,) long with ``num_classes`` = dropped (null); ``control`` (B, 6) raw pixels
  (``conditioning.CONTROL_FIELDS``) or None, ``control_keep`` (B,) 0/1; ``text`` (B, L, text_dim) caption
  token states already padded by ``text.pad_tokens``, ``text_mask`` (B, L) bool (True = attend) or None,
  ``text_keep`` (B,) 0/1 where 0 swaps in the model's learned null caption. A model is class-conditional
  when ``text_dim`` is None and text-conditional otherwise. Returns (B, C or 2C if learn_sigma, H, W).
- attributes ``num_classes``, ``text_dim``, ``in_channels``, ``out_channels``, ``config``; transformers
  also ``set_pos_embed_base(base)`` and ``config["patch_size"]`` for ``transfer.transfer_state``.
"""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .dit import DIT_SIZES, DiT
from .improved import IMPROVED_SIZES, ImprovedDiT
from .mdt import MDT, MDT_SIZES
from .mmdit import MMDIT_SIZES, MMDiT
from .pixart import PIXART_SIZES, PixArt
from .unet import UNET_SIZES, LDMUNet

__all__ = ["build_model", "model_from_config", "ARCHITECTURES"]

# arch -> (class, {size name -> preset kwargs})
ARCHITECTURES: dict[str, tuple[type[nn.Module], dict[str, dict[str, Any]]]] = {
    "dit": (DiT, DIT_SIZES),
    "pixart": (PixArt, PIXART_SIZES),
    "mmdit": (MMDiT, MMDIT_SIZES),
    "improved": (ImprovedDiT, IMPROVED_SIZES),
    "mdt": (MDT, MDT_SIZES),
    "unet": (LDMUNet, UNET_SIZES),
}


def _constructor_keywords(cls: type) -> list[str]:
    """Named constructor arguments, following ``**kwargs`` up to the parent class that takes them."""
    names: list[str] = []
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters.values()
        names += [p.name for p in params if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                  and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def _check_options(cls: type[nn.Module], arch: str, options: dict[str, Any]) -> None:
    valid = _constructor_keywords(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for arch {arch!r}; valid: {', '.join(valid)}")


def build_model(
    arch: str, size: str, *, latent_size: int, in_channels: int, num_classes: int, **options: Any
) -> nn.Module:
    """Build ``arch`` at preset ``size``; ``options`` override preset/constructor arguments by name."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHITECTURES)}")
    cls, sizes = ARCHITECTURES[arch]
    if size not in sizes:
        raise ValueError(f"unknown size {size!r} for arch {arch!r}; valid: {', '.join(sizes)}")
    _check_options(cls, arch, options)
    kwargs = {**sizes[size], **options}
    return cls(latent_size=latent_size, in_channels=in_channels, num_classes=num_classes, **kwargs)


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its ``config`` attribute (e.g. read back from a checkpoint's JSON)."""
    config = dict(config)
    arch = config.pop("arch", None)
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r} in model config; valid: {', '.join(ARCHITECTURES)}")
    cls, _ = ARCHITECTURES[arch]
    _check_options(cls, arch, config)
    return cls(**config)
