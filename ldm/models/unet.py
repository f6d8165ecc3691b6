"""LDM-4 class-conditional UNet (Rombach et al. 2022) on diffusers' ``UNet2DConditionModel``.

Reference config: CompVis ``configs/latent-diffusion/cin256-v2.yaml`` (read from CompVis/stable-diffusion):
``model_channels 192, channel_mult [1, 2, 3, 5], num_res_blocks 2, attention_resolutions [8, 4, 2]`` (the
downsample factors at which a SpatialTransformer follows each ResBlock: every level but the first, and the
middle), ``num_heads 1`` (one head over all channels; not 32-channel heads), ``transformer_depth 1``,
``context_dim 512``, the class label through a trainable ``ClassEmbedder`` (512-d) used as a one-token
cross-attention context (``conditioning_key: crossattn``). That model ran on a 64x64x3 VQ-f4 latent; here
the latent size/channels come from the project's autoencoder. The mapping onto diffusers is exact:
timestep features [cos, sin] with frequencies over ``half`` (``flip_sin_to_cos``, shift 0), time MLP to
4 x 192, conv downsampling, GroupNorm(32, eps 1e-5), conv ``proj_in``/``proj_out``, GEGLU feed-forward.
As in LDM, the output conv, every ResBlock's second conv and every transformer's ``proj_out`` start at
zero (``zero_module``), so a fresh model outputs 0.

Conditioning routes (``semantic``):
- ``cross_attention`` (default, LDM's own): the class embedding (context_dim) is the single context token
  (softmax over one key: a per-sample bias, as in cin256-v2); with ``text_dim`` set, caption tokens are
  projected to context_dim, dropped captions use a learned null token;
- ``adaln``: the class embedding (or the masked mean of the projected caption) is added to the time
  embedding, as ADM/LDM do for ``num_classes``; the cross-attention layers stay and attend to one learned
  constant token, so both routes share one backbone and an ablation changes only where semantics enter.
- ``attention`` (joint attention, ``layers.SemanticKeys``) is not built for the UNet: diffusers' attention
  blocks would need their own processor and per-stream projections; LDM's route is cross-attention.
Control metadata (``conditioning.ControlEmbedder``) is added to the time embedding; it reaches diffusers as
an extra additive embedding through ``class_embed_type="identity"`` (no parameters), so with nothing extra
the wrapper computes exactly what a plain ``UNet2DConditionModel`` with the same weights does.
No positional embedding: resolution transfer copies every weight (``transfer.transfer_state``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import ArchitectureInfo, DiffusionModel
from .layers import CaptionEmbedder, LabelEmbedder, zero_module

__all__ = ["UNET_SIZES", "LDMUNet", "backbone_kwargs", "ARCHITECTURE"]

# LDM-4 (cin256-v2) at 64x64x3, 1000 classes: see the module docstring; "tiny"/"small" are ours for CPU runs.
UNET_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), context_dim=64),
    "small": dict(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2), context_dim=128),
    "LDM-4": dict(model_channels=192, channel_mult=(1, 2, 3, 5), num_res_blocks=2, attention_levels=(1, 2, 3), context_dim=512),
}


def backbone_kwargs(
    in_channels: int,
    out_channels: int,
    model_channels: int,
    channel_mult: tuple[int, ...],
    num_res_blocks: int,
    attention_levels: tuple[int, ...],
    context_dim: int,
    num_heads: int,
) -> dict[str, Any]:
    """``UNet2DConditionModel`` arguments for an LDM openaimodel UNet with SpatialTransformers at the given
    levels (level i has downsample factor 2**i) and in the middle."""
    n = len(channel_mult)
    levels = set(attention_levels)
    return dict(
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=tuple(model_channels * m for m in channel_mult),
        layers_per_block=num_res_blocks,
        down_block_types=tuple("CrossAttnDownBlock2D" if i in levels else "DownBlock2D" for i in range(n)),
        up_block_types=tuple("CrossAttnUpBlock2D" if i in levels else "UpBlock2D" for i in reversed(range(n))),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=context_dim,
        # diffusers' legacy name: this is the number of heads (LDM cin256-v2: num_heads 1)
        attention_head_dim=num_heads,
        norm_num_groups=32,
        norm_eps=1e-5,
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
        downsample_padding=1,
        center_input_sample=False,
        use_linear_projection=False,
        resnet_time_scale_shift="default",
    )


class LDMUNet(DiffusionModel):
    """Our model contract around a diffusers UNet (``self.unet``); ``config`` rebuilds it."""

    arch = "unet"
    name = "UNet"
    default_semantic = "cross_attention"
    semantic_modes = ("adaln", "cross_attention")
    text_needs_attention = False  # adaLN gets the masked mean of the projected caption

    def __init__(
        self,
        *,
        latent_size: int = 64,
        in_channels: int = 3,
        num_classes: int = 1000,
        text_dim: int | None = None,
        model_channels: int = 192,
        channel_mult: tuple[int, ...] | list[int] = (1, 2, 3, 5),
        num_res_blocks: int = 2,
        attention_levels: tuple[int, ...] | list[int] = (1, 2, 3),
        context_dim: int = 512,
        num_heads: int = 1,
        learn_sigma: bool = False,
        qk_norm: bool = False,
        semantic: str | None = None,
        class_dropout_prob: float = 0.1,
        control_mode: str | None = None,
        control_exponents: dict[str, float] | None = None,
        control_offsets: dict[str, float] | None = None,
        control_dropout_prob: float = 0.1,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.setup(LDMUNet, locals())
        down = 2 ** (len(channel_mult) - 1)
        if latent_size % down:
            raise ValueError(f"latent_size {latent_size} is not divisible by the UNet's total downsampling {down}")
        # imported on use: diffusers' UNet costs ~2.7 s of import, paid by every job of every architecture
        # if it sat at module level (ldm.models registers all of them)
        from diffusers import UNet2DConditionModel

        self.unet = UNet2DConditionModel(
            **backbone_kwargs(
                in_channels, self.out_channels, model_channels, tuple(channel_mult), num_res_blocks,
                tuple(attention_levels), context_dim, num_heads,
            ),
            class_embed_type="identity",
        )
        temb = self.unet.time_embedding.linear_2.out_features
        sem_dim = context_dim if self.semantic == "cross_attention" else temb
        if text_dim is None:
            self.y_embedder = LabelEmbedder(num_classes, sem_dim)
        else:
            # linear caption projection + learned null caption for dropped captions (the shared embedder)
            self.text_embedder = CaptionEmbedder(text_dim, sem_dim, projection="linear")
        if self.semantic == "adaln":
            self.null_context = nn.Parameter(torch.zeros(1, 1, context_dim))
        self.control_embedder = self.make_control_embedder(temb)
        if qk_norm:
            for module in self.unet.modules():
                if type(module).__name__ == "Attention":
                    module.norm_q = nn.LayerNorm(module.inner_dim // module.heads, eps=1e-6)
                    module.norm_k = nn.LayerNorm(module.inner_dim // module.heads, eps=1e-6)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """LDM's zero_module()s on top of diffusers' (PyTorch default) init; N(0, 1) class table as
        ``nn.Embedding`` in LDM's ClassEmbedder; small random null caption/context tokens."""
        for name, module in self.unet.named_modules():
            if name == "conv_out" or name.endswith("proj_out") or (name.endswith("conv2") and ".resnets." in name):
                zero_module(module)
        if self.text_dim is None:
            self.y_embedder.initialize(std=1.0)
        else:
            nn.init.normal_(self.text_embedder.y_embedding, std=self.text_dim**-0.5)
        if self.semantic == "adaln":
            nn.init.normal_(self.null_context, std=self.config["context_dim"] ** -0.5)
        if self.control_embedder is not None:
            self.control_embedder.initialize()

    @property
    def semantic_embedder(self) -> nn.Module:
        return self.y_embedder if self.text_dim is None else self.text_embedder

    def condition(self, t, class_labels, text, text_mask, text_keep):
        """-> (extra time embedding: pooled semantics with semantic="adaln", else zeros; context tokens (the
        learned constant token with "adaln"); their key mask)."""
        y, context, mask = self.semantic_inputs(class_labels, text, text_mask, text_keep)
        B = t.shape[0]
        tokens = context if y is None else y
        extra = torch.zeros(B, self.unet.time_embedding.linear_2.out_features, device=tokens.device, dtype=tokens.dtype)
        if y is not None:
            extra = extra + y
            context = self.null_context.to(tokens.dtype).expand(B, -1, -1)
        return extra, context, mask

    def denoise(self, x, t, extra, context, context_mask) -> torch.Tensor:
        return self.unet(
            x,
            t,
            encoder_hidden_states=context,
            class_labels=extra,
            encoder_attention_mask=None if context_mask is None else context_mask.to(x.dtype),
            return_dict=False,
        )[0]


ARCHITECTURE = ArchitectureInfo(
    name="unet",
    cls=LDMUNet,
    sizes=UNET_SIZES,
    published_size="LDM-4",
    published_conditioning={"learn_sigma": False},  # ImageNet labels; LDM has no variance head
    published_fid=3.60,
    published_fid_source="LDM-4-G, Rombach et al. 2022",
)
