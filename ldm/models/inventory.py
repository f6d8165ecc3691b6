"""Parameter and FLOP counts of every registered architecture and size (``ldm models``).

Models are built on the ``meta`` device, so even XL sizes cost no memory and no time to "run": the
forward pass only propagates shapes while ``torch.utils.flop_counter.FlopCounterMode`` counts the
matmuls, convolutions and attention kernels (2 FLOPs per multiply-add; elementwise ops are not counted,
which is also the convention of the DiT paper's Gflops column).

Each architecture is counted as published: image latents of the SD-VAE (f = 8, 4 channels) and the
conditioning its paper trains with (1000 ImageNet classes; caption tokens for the text-to-image models):
each architecture's registry entry (``published_conditioning``, ``published_size``) says which.
``learn_sigma`` follows the published models too (DiT, mDT, PixArt-α predict the variance; mmDiT and the
LDM UNet do not).
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..control import CONTROL_WIDTH
from . import REGISTRY, architecture, build_model

__all__ = ["PUBLISHED_SIZE", "PUBLISHED_CONDITIONING", "count_parameters", "count_forward_flops", "forward_flops",
           "run_cost", "inventory"]

VAE_FACTOR = 8
VAE_CHANNELS = 4
IMAGENET_CLASSES = 1000

#: name of the configuration the paper compares, per architecture (views of the registry, for old importers)
PUBLISHED_SIZE = {name: info.published_size for name, info in REGISTRY.items()}
#: constructor keywords and text length (tokens) of each architecture's published conditioning
PUBLISHED_CONDITIONING: dict[str, dict[str, Any]] = {
    name: dict(info.published_conditioning) for name, info in REGISTRY.items()
}


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _build(arch: str, size: str, latent_size: int) -> tuple[torch.nn.Module, int]:
    spec = dict(architecture(arch).published_conditioning)
    text_tokens = int(spec.pop("text_tokens", 0))
    with torch.device("meta"):
        model = build_model(arch, size, latent_size=latent_size, in_channels=VAE_CHANNELS,
                            num_classes=IMAGENET_CLASSES, **spec)
    return model.eval(), text_tokens


def count_forward_flops(model: torch.nn.Module, latent_shape: tuple[int, int, int], text_tokens: int = 0) -> int:
    """FLOPs of one forward pass of a meta-device ``model`` for one latent of ``latent_shape`` (C, H, W),
    with its conditioning: caption tokens if it is text-conditional, else a class label, plus control
    metadata if it was built with a control embedding."""
    meta = torch.device("meta")
    x = torch.empty(1, *latent_shape, device=meta)
    t = torch.empty(1, device=meta)
    kwargs: dict[str, torch.Tensor] = {"class_labels": torch.zeros(1, dtype=torch.long, device=meta)}
    if model.text_dim:
        kwargs = {"text": torch.empty(1, max(text_tokens, 1), model.text_dim, device=meta),
                  "text_keep": torch.ones(1, device=meta)}
    if model.takes_control:
        kwargs["control"] = torch.empty(1, CONTROL_WIDTH, device=meta)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, **kwargs)
    return int(counter.get_total_flops())


def forward_flops(arch: str, size: str, image_size: int) -> int:
    """FLOPs of one forward pass for one image of ``image_size`` px (SD-VAE latent), meta device."""
    latent = image_size // VAE_FACTOR
    model, text_tokens = _build(arch, size, latent)
    return count_forward_flops(model, (VAE_CHANNELS, latent, latent), text_tokens)


def run_cost(model_config: dict, latent_shape: tuple[int, int, int], text_tokens: int = 0) -> dict[str, Any]:
    """Parameters and per-image training cost of a trained run's model (3 x forward: forward + backward),
    for the efficiency table; guidance passes and masked second passes (mDT) are not included."""
    from . import model_from_config

    with torch.device("meta"):
        model = model_from_config(model_config).eval()
    fwd = count_forward_flops(model, latent_shape, text_tokens)
    return {"arch": model_config.get("arch"), "params": count_parameters(model),
            "fwd_gflops_per_image": fwd / 1e9, "train_gflops_per_image": 3 * fwd / 1e9}


def inventory(archs: list[str] | None = None, sizes: list[str] | None = None) -> list[dict[str, Any]]:
    """One record per (arch, size): params at the published conditioning and forward GFLOPs at 256/512 px."""
    rows = []
    for arch in archs or list(REGISTRY):
        info = architecture(arch)
        for size in info.sizes:
            if sizes and size not in sizes:
                continue
            model, _ = _build(arch, size, 256 // VAE_FACTOR)
            rows.append({
                "arch": arch,
                "size": size,
                "published": size == info.published_size,
                "params": count_parameters(model),
                "fwd_gflops_256": round(forward_flops(arch, size, 256) / 1e9, 2),
                "fwd_gflops_512": round(forward_flops(arch, size, 512) / 1e9, 2),
            })
    return rows
