"""Model registry: one architecture per file, built by (arch, size) or rebuilt from a saved ``config``.

Every model exposes ``config`` (JSON-able, includes ``arch``) so that a checkpoint's ``state.json`` is
enough to rebuild it with ``model_from_config``; sizes are presets of the constructor arguments.

The contract every architecture keeps (the training loop, samplers and transfer rely on nothing else):

- constructor keywords shared by all: ``latent_size, in_channels, num_classes, text_dim=None,
  learn_sigma, qk_norm, semantic=None (adaln | attention | cross_attention; None = the architecture's own), control_mode
  (None | additive | disentangled), control_exponents, control_offsets, class_dropout_prob,
  control_dropout_prob, gradient_checkpointing`` (recorded once, by ``base.DiffusionModel.setup``);
  transformers also take ``pos_embed_base``.
- ``forward(x, t, class_labels=None, control=None, control_keep=None, text=None, text_mask=None,
  text_keep=None)``: ``x`` (B, C, H, W) latents; ``t`` (B,) float model time 0..999 (999 = pure noise);
  ``class_labels`` (B,) long with ``num_classes`` = dropped (null); ``control`` (B, CONTROL_WIDTH) raw pixels
  (``ldm.control.CONTROL_FIELDS``) or None, ``control_keep`` (B,) 0/1; ``text`` (B, L, text_dim) caption
  token states already padded by ``text.pad_tokens``, ``text_mask`` (B, L) bool (True = attend) or None,
  ``text_keep`` (B,) 0/1 where 0 swaps in the model's learned null caption. A model is class-conditional
  when ``text_dim`` is None and text-conditional otherwise. Returns (B, C or 2C if learn_sigma, H, W).
- attributes ``num_classes``, ``text_dim``, ``in_channels``, ``out_channels``, ``config``, and the capability
  hooks of ``base.DiffusionModel`` (``has_pos_embed``/``set_pos_embed_base``, ``adapt_low_res_state``,
  ``masks_tokens``, ``learns_sigma``, ``takes_control``), which every architecture answers; patch models also
  have ``config["patch_size"]`` for ``transfer.transfer_state``.

Each architecture file ends with its ``ARCHITECTURE`` entry (``base.ArchitectureInfo``: class, size presets,
published configuration, conditioning and FID); ``REGISTRY`` collects them in a fixed order, which is the
order of ``ldm models`` and of the error messages.
"""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from . import dit, improved, mdt, mmdit, pixart, unet
from .base import ArchitectureInfo, DiffusionModel

__all__ = ["build_model", "model_from_config", "ARCHITECTURES", "REGISTRY", "ArchitectureInfo", "DiffusionModel",
           "architecture", "published_fid"]

#: arch name -> its registry entry, in the order of ``ldm models``
REGISTRY: dict[str, ArchitectureInfo] = {
    info.name: info
    for info in (dit.ARCHITECTURE, pixart.ARCHITECTURE, mmdit.ARCHITECTURE, improved.ARCHITECTURE,
                 mdt.ARCHITECTURE, unet.ARCHITECTURE)
}

#: arch -> (class, {size name -> preset kwargs}): the registry as the pairs older callers unpack
ARCHITECTURES: dict[str, tuple[type[nn.Module], dict[str, dict[str, Any]]]] = {
    name: (info.cls, info.sizes) for name, info in REGISTRY.items()
}


def architecture(arch: str) -> ArchitectureInfo:
    """The registry entry of ``arch``; a ValueError naming the valid ones otherwise."""
    if arch not in REGISTRY:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(REGISTRY)}")
    return REGISTRY[arch]


def published_fid() -> dict[str, tuple[float | None, str]]:
    """arch -> (FID its own paper published, source note), for the architectures that have either: those with
    a figure first, then those with only a note (registry order within each)."""
    noted = [info for info in REGISTRY.values() if info.published_fid_source is not None]
    ordered = [i for i in noted if i.published_fid is not None] + [i for i in noted if i.published_fid is None]
    return {info.name: (info.published_fid, info.published_fid_source) for info in ordered}


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
    info = architecture(arch)
    if size not in info.sizes:
        raise ValueError(f"unknown size {size!r} for arch {arch!r}; valid: {', '.join(info.sizes)}")
    _check_options(info.cls, arch, options)
    kwargs = {**info.sizes[size], **options}
    return info.cls(latent_size=latent_size, in_channels=in_channels, num_classes=num_classes, **kwargs)


def model_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a model from its ``config`` attribute (e.g. read back from a checkpoint's JSON)."""
    config = dict(config)
    arch = config.pop("arch", None)
    if arch not in REGISTRY:
        raise ValueError(f"unknown arch {arch!r} in model config; valid: {', '.join(REGISTRY)}")
    cls = REGISTRY[arch].cls
    _check_options(cls, arch, config)
    return cls(**config)
