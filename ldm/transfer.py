"""Low-resolution -> high-resolution initialisation (the paper's pre-train-then-fine-tune strategy).

Every weight of the low-resolution model is copied unchanged; only the 2-D sin-cos positional embedding
differs, and it is a non-persistent buffer recomputed from the config, so nothing is resized:

- ``interpolate`` (the paper's resampling): the high-res grid covers the low-res model's coordinate range
  at a higher density, i.e. ``pos_embed_base`` = the low model's range (its grid, or its own base if it
  was itself transferred);
- ``extrapolate`` (plain DiT): the high-res grid keeps the low model's spacing and extends it to
  coordinates never seen in training (``pos_embed_base=None`` when the low model had the default spacing).

Dataset transfer (a stage with ``init_checkpoint`` from another scenario and ``semantic_transfer: swap``)
goes through the same function: a class-conditional model initialises a text-conditional one, every shared
weight is copied and only the semantic embedder starts fresh.

The high-res model's ``config`` is updated, so saving it and rebuilding with ``model_from_config`` gives
the same embedding. Architectures with grid-shaped learned tables (mDT's learned positional residuals and
relative-position biases) resample them in their own ``adapt_low_res_state(state, low_config)``, called
after the new base is set. A model without ``set_pos_embed_base`` (the UNet: no positional embedding) just
gets every weight copied; ``pos_embed`` is then ignored.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["SEMANTIC_MODES", "transfer_state", "POS_EMBED_MODES"]

POS_EMBED_MODES = ("interpolate", "extrapolate")
SEMANTIC_MODES = ("keep", "swap")
# entries a low-res state may carry that are recomputed rather than loaded (the reference DiT stores
# its fixed sin-cos table as a parameter named pos_embed)
_RECOMPUTED = ("pos_embed",)


def _grid(config: dict[str, Any]) -> int:
    return config["latent_size"] // config["patch_size"]


def _conditioning(config: dict[str, Any]) -> str:
    return "text" if config.get("text_dim") else "class"


def transfer_state(
    low_res_state: dict[str, torch.Tensor], low_config: dict[str, Any], high_model: nn.Module, pos_embed: str,
    semantic: str = "keep", log=None,
) -> nn.Module:
    """Load ``low_res_state`` into ``high_model`` (in place, returned) and set its positional embedding.

    ``semantic="swap"`` is dataset transfer across condition types (a class-conditional pre-training
    initialising a text-to-image model, or back): the two models then differ only in their semantic
    embedders (label table vs. caption projection and null caption), so parameters present in one model
    only are allowed: the target's keep their fresh initialisation, the source's are dropped, and both
    lists are logged. Every shared parameter is still copied and must match in shape.
    """
    if semantic not in SEMANTIC_MODES:
        raise ValueError(f"unknown semantic transfer {semantic!r}; valid: {', '.join(SEMANTIC_MODES)}")
    if pos_embed not in POS_EMBED_MODES:
        raise ValueError(f"unknown pos_embed mode {pos_embed!r}; valid: {', '.join(POS_EMBED_MODES)}")
    high_config = high_model.config
    if low_config.get("arch") != high_config.get("arch"):
        raise ValueError(f"cannot transfer arch {low_config.get('arch')!r} into {high_config.get('arch')!r}")

    if high_model.has_pos_embed:
        low_grid = _grid(low_config)
        low_base = low_config.get("pos_embed_base")
        low_range = float(low_grid if low_base is None else low_base)
        if pos_embed == "interpolate":
            base = low_range
        else:
            spacing = low_range / low_grid
            base = None if spacing == 1.0 else _grid(high_config) * spacing
        if base is not None and base == _grid(high_config):
            base = None  # same range as the plain grid: keep the config canonical
        high_model.set_pos_embed_base(base)

    target = high_model.state_dict()
    source = {k: v for k, v in low_res_state.items() if k not in _RECOMPUTED}
    source = high_model.adapt_low_res_state(source, low_config)  # resamples grid-shaped tables (mDT); else as is
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    if semantic == "swap":
        if _conditioning(low_config) == _conditioning(high_config):
            raise ValueError(f"semantic transfer 'swap' needs different condition types, but both models are "
                             f"{_conditioning(high_config)}-conditional (use 'keep')")
        if log is not None:
            log(f"semantic embedder swapped ({_conditioning(low_config)} -> {_conditioning(high_config)}): "
                f"fresh {missing}; dropped {unexpected}")
        source = {k: v for k, v in source.items() if k in target}
        target_fresh = {k: v for k, v in target.items() if k in missing}
        source.update(target_fresh)
    elif missing or unexpected:
        raise ValueError(f"state mismatch: missing in low-res state {missing}, not in high-res model {unexpected}")
    for name, tensor in source.items():
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise ValueError(
                f"shape mismatch for parameter {name!r}: low-res {tuple(tensor.shape)} vs "
                f"high-res {tuple(target[name].shape)}"
            )
    high_model.load_state_dict(source, strict=True)
    return high_model
