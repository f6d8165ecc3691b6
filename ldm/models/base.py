"""What every architecture shares: the contract's constructor keywords, its forward, and capability hooks.

The model contract (``ldm.models``) used to be kept by each architecture on its own; here it is written once.
``DiffusionModel.setup`` records the shared keywords (config, ``semantic``, output channels), ``forward``
turns the condition inputs into (adaLN vector c, context tokens, their mask) and hands them to the
architecture's ``denoise``. Optional capabilities have no-op defaults, so callers (training, transfer,
sampling) ask every model the same question instead of probing with ``hasattr``:

- ``has_pos_embed``: the model has ``set_pos_embed_base(base)``, a sin-cos positional embedding that
  resolution transfer re-evaluates; ``adapt_low_res_state(state, low_config)``: resample grid-shaped learned
  tables (mDT; identity elsewhere);
- ``masks_tokens``: the training objective adds a masked second pass (mDT);
- ``learns_sigma``: the output carries the variance head (2C channels); ``takes_control``: built with a
  control embedding.

``PatchTransformer`` is the constructor the patch transformers (DiT, PixArt-α, MM-DiT) have in common: the same
keywords in the same order, patch and timestep embedders, and the 2-D sin-cos positional embedding.
``ArchitectureInfo`` is one registry entry: how to build an architecture and what its own paper published.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .conditioning import SEMANTIC_MODES, ControlEmbedder, resolve_semantic, semantic_condition
from .layers import CaptionEmbedder, LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_2d

__all__ = ["ArchitectureInfo", "DiffusionModel", "PatchTransformer", "constructor_config"]


def constructor_config(cls: type, arguments: dict) -> dict:
    """A model's ``config``: ``arch`` and every argument of ``cls.__init__`` by name, read from the
    constructor's ``locals()`` (after it resolved defaults such as ``semantic``), so that
    ``model_from_config(config)`` rebuilds the model. Mappings become plain dicts (empty -> None) and
    tuples lists, so the config is JSON as saved in checkpoints."""
    config = {"arch": arguments["self"].arch}  # the instance's: a subclass (the improved model) keeps its own
    for name in inspect.signature(cls.__init__).parameters:
        if name == "self":
            continue
        value = arguments[name]
        if isinstance(value, Mapping):
            value = dict(value) if value else None
        elif isinstance(value, tuple):
            value = list(value)
        config[name] = value
    return config


class DiffusionModel(nn.Module):
    """Base of every architecture. Subclasses set ``arch``/``name``, call ``setup`` first thing in their
    constructor, and implement ``denoise``; everything else here is shared or a default."""

    arch: ClassVar[str] = ""
    #: how error messages call the model ("DiT")
    name: ClassVar[str] = ""
    #: the semantic route when the constructor gets ``semantic=None``
    default_semantic: ClassVar[str] = "adaln"
    #: the semantic routes the architecture can build (`conditioning.SEMANTIC_MODES`)
    semantic_modes: ClassVar[tuple[str, ...]] = SEMANTIC_MODES
    #: True: captions can only enter through attention (no pooled caption vector for adaLN)
    text_needs_attention: ClassVar[bool] = True
    #: True: ``set_pos_embed_base`` re-evaluates a sin-cos positional embedding (resolution transfer)
    has_pos_embed: ClassVar[bool] = False

    control_embedder: ControlEmbedder | None
    t_embedder: TimestepEmbedder

    # --- the shared constructor keywords ------------------------------------------------------------------
    def setup(self, signature: type, arguments: dict[str, Any]) -> None:
        """Record the constructor's arguments (``locals()`` of ``signature.__init__``) as ``config`` and set the
        contract's attributes. ``semantic`` is resolved first, so the config names the route actually built."""
        arguments = dict(arguments)
        text_dim = arguments["text_dim"]
        arguments["semantic"] = resolve_semantic(
            arguments["semantic"], self.default_semantic, text_dim if self.text_needs_attention else None, self.name,
            self.semantic_modes)
        self.config = constructor_config(signature, arguments)
        self.latent_size = arguments["latent_size"]
        self.in_channels = arguments["in_channels"]
        self.out_channels = 2 * self.in_channels if arguments["learn_sigma"] else self.in_channels
        self.num_classes = arguments["num_classes"]
        self.text_dim = text_dim
        self.semantic = arguments["semantic"]
        self.gradient_checkpointing = arguments["gradient_checkpointing"]

    def make_label_or_caption_embedder(self, hidden_size: int, null_caption_tokens: int = 1) -> nn.Module:
        """The semantic embedder ``y_embedder`` of DiT and PixArt: a label table (with the null class) for a
        class-conditional model, PixArt's caption projection with a learned null caption for a text one."""
        if self.text_dim is None:
            return LabelEmbedder(self.num_classes, hidden_size)
        return CaptionEmbedder(self.text_dim, hidden_size, null_caption_tokens)

    def make_control_embedder(self, hidden_size: int) -> ControlEmbedder | None:
        """The control embedding of ``config["control_mode"]`` (None: the model takes no control)."""
        cfg = self.config
        if not cfg["control_mode"]:
            return None
        return ControlEmbedder(hidden_size, cfg["control_mode"], cfg["control_exponents"], cfg["control_offsets"])

    # --- capabilities (no-op defaults) --------------------------------------------------------------------
    # ``set_pos_embed_base(base)`` exists exactly where ``has_pos_embed`` is True: the base it takes is computed
    # from the patch grid, which a model without positional embedding (the UNet) does not have.

    def adapt_low_res_state(self, state: dict[str, torch.Tensor], low_config: dict[str, Any]) -> dict[str, Any]:
        """No grid-shaped learned tables: a low-res state loads as it is."""
        return dict(state)

    @property
    def masks_tokens(self) -> bool:
        """Whether training adds a masked pass with ``mask_generator`` (mDT)."""
        return False

    @property
    def learns_sigma(self) -> bool:
        """Whether the output has 2C channels, the second half the learned variance (DiT's ``learn_sigma``)."""
        return self.out_channels == 2 * self.in_channels

    @property
    def takes_control(self) -> bool:
        """Whether the model was built with a control embedding (``control_mode`` set)."""
        return self.control_embedder is not None

    # --- forward ------------------------------------------------------------------------------------------
    @property
    def semantic_embedder(self) -> nn.Module:
        """The label table or caption embedder that ``semantic_inputs`` reads."""
        return self.y_embedder

    def semantic_inputs(self, class_labels, text, text_mask, text_keep):
        """-> (vector added to c or None, context tokens (B, L, D) or None, their key mask or None)."""
        return semantic_condition(self.semantic_embedder, self.semantic, class_labels, text, text_mask, text_keep)

    def condition(self, t, class_labels, text, text_mask, text_keep):
        """-> (adaLN conditioning c (B, D) = time + pooled semantics, context tokens, their key mask)."""
        y, context, mask = self.semantic_inputs(class_labels, text, text_mask, text_keep)
        c = self.t_embedder(t)
        return (c if y is None else c + y), context, mask

    def add_control(self, c: torch.Tensor, control, t: torch.Tensor, control_keep) -> torch.Tensor:
        """c + the control embedding; ``control=None`` means dropped (nothing added)."""
        if control is None:
            return c
        if self.control_embedder is None:
            raise ValueError(
                f"this {self.name} was built without control conditioning (control_mode=None) but got control"
            )
        return c + self.control_embedder(control, t, control_keep)

    def run_block(self, block: nn.Module, *args: Any) -> Any:
        """``block(*args)``, under activation checkpointing when it is on and gradients are being taken."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        control: torch.Tensor | None = None,
        control_keep: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        text_keep: torch.Tensor | None = None,
        **backbone: Any,
    ) -> torch.Tensor:
        """The model contract's forward (``ldm.models``): x (B, C, H, W), t (B,) or a scalar, float 0..999;
        class_labels (B,) with num_classes = null, or text (B, L, text_dim) + text_mask/text_keep; control
        (B, CONTROL_WIDTH) raw pixels (``ldm.control``) or None (= dropped), control_keep (B,) 0/1. ``backbone`` keywords go to ``denoise``
        (mDT's ``mask_generator``). Returns (B, C or 2C, H, W)."""
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        c, context, mask = self.condition(t, class_labels, text, text_mask, text_keep)
        c = self.add_control(c, control, t, control_keep)
        return self.denoise(x, t, c, context, mask, **backbone)

    def denoise(self, x, t, c, context, mask, **backbone: Any) -> torch.Tensor:
        """The architecture's network on latents x given the conditioning from ``forward``."""
        raise NotImplementedError


class PatchTransformer(DiffusionModel):
    """Constructor and positional embedding of DiT, PixArt-α and MM-DiT (one signature: one config layout).

    Subclasses build their own layers in ``build_layers`` (after the patch and timestep embedders, before the
    positional embedding, so that parameter order and the draws of a seed are those of each reference) and
    initialise them in ``initialize_weights``. The sin-cos embedding is a non-persistent buffer recomputed from
    ``pos_embed_base``; other grid sizes at forward time get one at the configured coordinate spacing.
    """

    has_pos_embed = True

    def __init__(
        self,
        *,
        latent_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 1000,
        text_dim: int | None = None,
        semantic: str | None = None,
        null_caption_tokens: int = 1,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        qk_norm: bool = False,
        class_dropout_prob: float = 0.1,
        control_mode: str | None = None,
        control_exponents: dict[str, float] | None = None,
        control_offsets: dict[str, float] | None = None,
        control_dropout_prob: float = 0.1,
        pos_embed_base: float | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if latent_size % patch_size:
            raise ValueError(f"latent_size {latent_size} is not divisible by patch_size {patch_size}")
        # class_dropout_prob / control_dropout_prob are recipe values read by the training loop; kept in the
        # config so a checkpoint records how it was trained.
        self.setup(PatchTransformer, locals())
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.build_layers(depth, num_heads, mlp_ratio, qk_norm, null_caption_tokens)
        self.grid_size = latent_size // patch_size
        self.register_buffer("pos_embed", self._pos_embed_for(self.grid_size, self.grid_size), persistent=False)
        self.initialize_weights()

    def build_layers(self, depth: int, num_heads: int, mlp_ratio: float, qk_norm: bool, null_caption_tokens: int):
        """Create the architecture's own modules, in its reference's order (parameter names and seed draws)."""
        raise NotImplementedError

    def initialize_weights(self) -> None:
        """The reference's initialisation, once every module exists."""
        raise NotImplementedError

    # --- positional embedding -----------------------------------------------------------------------------
    def _pos_embed_for(self, gh: int, gw: int) -> torch.Tensor:
        """Embedding for a gh x gw token grid at the configured coordinate spacing (base / grid)."""
        base = self.config["pos_embed_base"]
        if base is None:
            return sincos_2d(self.hidden_size, (gh, gw)).unsqueeze(0)
        if (gh, gw) == (self.grid_size, self.grid_size):
            return sincos_2d(self.hidden_size, (gh, gw), float(base)).unsqueeze(0)
        spacing = float(base) / self.grid_size
        return sincos_2d(self.hidden_size, (gh, gw), (gh * spacing, gw * spacing)).unsqueeze(0)

    def set_pos_embed_base(self, base: float | None) -> None:
        """Re-evaluate the sin-cos embedding with a new coordinate range (resolution transfer)."""
        self.config["pos_embed_base"] = base
        device = self.pos_embed.device
        self.pos_embed = self._pos_embed_for(self.grid_size, self.grid_size).to(device)

    def embed_patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Latents (B, C, H, W) -> tokens with positional embedding added, and the token grid (gh, gw)."""
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        pos = self.pos_embed if (gh, gw) == (self.grid_size, self.grid_size) else self._pos_embed_for(gh, gw)
        return self.x_embedder(x) + pos.to(device=x.device, dtype=x.dtype), (gh, gw)


@dataclass(frozen=True)
class ArchitectureInfo:
    """One registry entry, kept in the architecture's own file: how to build it (class, size presets) and
    what its own paper published (the configuration it compares, the conditioning it trains with, its FID)."""

    name: str
    cls: type[DiffusionModel]
    sizes: dict[str, dict[str, Any]]
    #: size preset of the configuration the paper compares
    published_size: str
    #: constructor keywords (and ``text_tokens``: caption length) of the published conditioning
    published_conditioning: Mapping[str, Any]
    #: ImageNet 256 px FID-50k with guidance from the architecture's own paper (None: not published there)
    published_fid: float | None = None
    #: where ``published_fid`` comes from, or a note when there is no comparable number (None: nothing)
    published_fid_source: str | None = None
