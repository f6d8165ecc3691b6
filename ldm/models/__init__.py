"""Model registry: one architecture per file, built by (arch, size) or rebuilt from a saved ``config``.

Every model exposes ``config`` (JSON-able, includes ``arch``) so that a checkpoint's ``state.json`` is
enough to rebuild it with ``model_from_config``; sizes are presets of the constructor arguments.
"""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .dit import DIT_SIZES, DiT

__all__ = ["build_model", "model_from_config", "ARCHITECTURES"]

# arch -> (class, {size name -> preset kwargs})
ARCHITECTURES: dict[str, tuple[type[nn.Module], dict[str, dict[str, Any]]]] = {
    "dit": (DiT, DIT_SIZES),
}


def _check_options(cls: type[nn.Module], arch: str, options: dict[str, Any]) -> None:
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
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
