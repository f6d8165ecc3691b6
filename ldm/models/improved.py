"""The paper's improved model, as far as it is public: a DiT backbone with its conditioning changes.

What 2411.03177 describes (PAPER.md, "conditioning mechanisms"): semantic conditions (class, text) enter
through attention rather than adaLN; control metadata (size, crop) enters the modulation path scaled by a
time schedule w(t); attention logits are bounded (QK-norm) for stable large-scale training. The exact
block layout, widths and the w(t) formula are not public, so this is a DiT (same sizes, same
initialisation, DiT-XL/2 = the published scale) whose defaults are those choices: ``semantic="attention"``,
``control_mode="disentangled"``, ``qk_norm=True``. Every one of them is a knob, which is what the ablations
turn; recipe-level choices (rectified flow, noisy-replicate padding) live in the config.
"""
from __future__ import annotations

from .base import ArchitectureInfo
from .dit import DIT_SIZES, DiT

__all__ = ["ImprovedDiT", "IMPROVED_SIZES", "ARCHITECTURE"]

IMPROVED_SIZES = dict(DIT_SIZES)


class ImprovedDiT(DiT):
    """DiT with the paper's conditioning defaults; constructor keywords are DiT's."""

    arch = "improved"

    def __init__(self, *, semantic: str | None = "attention", control_mode: str | None = "disentangled",
                 qk_norm: bool = True, **kwargs):
        super().__init__(semantic=semantic, control_mode=control_mode, qk_norm=qk_norm, **kwargs)


ARCHITECTURE = ArchitectureInfo(
    name="improved",
    cls=ImprovedDiT,
    sizes=IMPROVED_SIZES,
    published_size="XL/2",
    published_conditioning={"learn_sigma": True},  # counted as DiT-XL/2, the published scale
    published_fid=None,  # no ImageNet 256 px figure in public text
    published_fid_source="2411.03177: 2.76 at ImageNet 512 px (summary site, unverified)",
)
