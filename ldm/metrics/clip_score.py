"""CLIPScore (Hessel et al. 2021) through transformers: 100 * max(cos(E_image, E_caption), 0) per image, mean.

The CLIP is configurable (`evaluation.clip_model`: a local directory or a hub id; clusters use
openai/clip-vit-large-patch14). Images go through the model's own CLIPProcessor, the same preprocessing
torchmetrics' CLIPScore applies. Unlike torchmetrics, which clamps the *mean* at 0, each image's cosine is
clamped, as in the paper's definition; the two agree whenever no cosine is negative.

When the model is not configured or cannot be loaded offline, `load_clip` raises `ClipUnavailable` with a
one-line reason and the evaluation skips the metric with that line (it does not fail the run).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["ClipUnavailable", "load_clip", "clip_score", "class_captions", "CAPTION_TEMPLATE"]

CAPTION_TEMPLATE = "a photo of a {}"  # caption of a class-conditional sample (CLIP's zero-shot template)


class ClipUnavailable(RuntimeError):
    """clip_score cannot be computed here (no model configured, or weights not on disk while offline)."""


def load_clip(name: str | None, device: str | torch.device = "cpu"):
    """(model, processor) in eval mode, or ClipUnavailable with the reason in one line."""
    if not name:
        raise ClipUnavailable("clip_score skipped: evaluation.clip_model is null")
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(name)
        processor = CLIPProcessor.from_pretrained(name)
    except (OSError, ValueError) as exc:  # hub id not cached while offline, or a broken directory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClipUnavailable(f"clip_score skipped: CLIP {name!r} not available offline ({first[:160]})") from exc
    return model.to(device).eval(), processor


def _embedding(out) -> torch.Tensor:
    """transformers < 5 return the projected embedding; 5.x a model output whose pooler_output holds it."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


#: images per CLIP forward pass (also the unit of a rank's share in `ldm evaluate`: same batches, same bits)
BATCH = 64


@torch.no_grad()
def clip_score(images: np.ndarray, captions: list[str], model, processor, batch_size: int = BATCH) -> np.ndarray:
    """Per-image CLIPScore (N,) float64 of uint8 N×H×W×3 images against their captions."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    device = next(model.parameters()).device
    out = []
    for s in range(0, len(images), batch_size):
        pix = processor(images=list(images[s:s + batch_size]), return_tensors="pt")["pixel_values"]
        txt = processor(text=list(captions[s:s + batch_size]), return_tensors="pt", padding=True, truncation=True)
        e_img = _embedding(model.get_image_features(pixel_values=pix.to(device))).double()
        e_txt = _embedding(model.get_text_features(input_ids=txt["input_ids"].to(device),
                                                   attention_mask=txt["attention_mask"].to(device))).double()
        cos = torch.nn.functional.cosine_similarity(e_img, e_txt, dim=-1)
        out.append((100.0 * cos.clamp(min=0)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def class_captions(labels: np.ndarray, classes: list[str]) -> list[str]:
    return [CAPTION_TEMPLATE.format(classes[int(y)]) for y in labels]
