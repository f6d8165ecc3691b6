"""Precision/recall against a brute-force reference and closed forms; size consistency; CLIPScore with a
tiny CLIP saved locally, checked against torchmetrics and against a hand-written computation."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.metrics.clip_score import ClipUnavailable, class_captions, clip_score, load_clip
from ldm.metrics.consistency import size_consistency
from ldm.metrics.manifold import knn_radii, manifold_coverage, precision_recall


# ------------------------------------------------------------------------------------- precision / recall
def brute_force_pr(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019 written out with Python loops: radius = k-th nearest other point."""
    def radii(x):
        return [sorted(np.linalg.norm(x[i] - x[j]) for j in range(len(x)) if j != i)[k - 1] for i in range(len(x))]

    def covered(manifold, r, q):
        return np.mean([any(np.linalg.norm(p - manifold[j]) <= r[j] for j in range(len(manifold))) for p in q])

    return covered(real, radii(real), fake), covered(fake, radii(fake), real)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(0)
    real = rng.standard_normal((60, 5))
    fake = rng.standard_normal((45, 5)) * 1.6 + 0.7  # wider and shifted: precision and recall both < 1
    got = precision_recall(real, fake, k=3)
    want = brute_force_pr(real, fake, 3)
    assert 0 < got["precision"] < 1 and 0 < got["recall"] < 1
    assert got["precision"] == pytest.approx(want[0], abs=0) and got["recall"] == pytest.approx(want[1], abs=0)
    # chunking does not change anything
    assert np.array_equal(knn_radii(real, 3, chunk=7), knn_radii(real, 3))


def test_precision_recall_closed_forms():
    line = np.arange(10, dtype=float)[:, None]  # 0..9 on a line
    # k = 3: the two ends have radius 3 (0 -> 1, 2, 3), every other point 2 (1 -> 0, 2, then 3)
    assert knn_radii(line, 3).tolist() == [3, 2, 2, 2, 2, 2, 2, 2, 2, 3]
    # the real manifold covers [-3, 12]: 12 and -3 are on the boundary (inside), 12.5 and -3.5 are not
    inside = manifold_coverage(line, knn_radii(line, 3), np.array([[12.0], [12.5], [-3.0], [-3.5]]))
    assert inside.tolist() == [True, False, True, False]
    assert precision_recall(line, np.array([[12.0], [12.5], [-3.0], [-3.5]]), k=3)["precision"] == 0.5
    same = precision_recall(line, line.copy(), k=3)
    assert same == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(line, line + 100.0, k=3)
    assert far == {"precision": 0.0, "recall": 0.0}
    # mode collapse: fake points all near the real point 4 -> precision 1, but their balls (radius <= 0.03)
    # hold only that one real point: recall 1/10
    collapsed = np.array([[4.0], [4.01], [4.02], [3.99]])
    pr = precision_recall(line, collapsed, k=3)
    assert pr["precision"] == 1.0 and pr["recall"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="k must be"):
        knn_radii(line[:3], 3)


# --------------------------------------------------------------------------------------- size consistency
def test_size_consistency_counts_groups_and_pairs():
    pred = np.array([[0, 1, 2, 3],   # size 64
                     [0, 1, 2, 0],   # size 128
                     [0, 2, 2, 0]])  # size 256
    out = size_consistency(pred, labels=np.array([0, 1, 2, 3]), sizes=[64, 128, 256])
    assert out["size_consistency"] == 0.5  # groups 0 and 2 agree at every size
    # pairs (64,128): 3/4, (64,256): 2/4, (128,256): 3/4
    assert out["size_consistency_pairwise"] == pytest.approx((0.75 + 0.5 + 0.75) / 3)
    assert out["cond_accuracy_by_size"] == {"64": 1.0, "128": 0.75, "256": 0.5}
    assert size_consistency(np.zeros((2, 5), int))["size_consistency"] == 1.0
    with pytest.raises(ValueError, match="sizes >= 2"):
        size_consistency(np.zeros((1, 5), int))


# -------------------------------------------------------------------------------------------- CLIPScore
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A CLIP with 2-layer, 32-wide towers and a byte-level vocabulary, saved with save_pretrained."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab[ch + suffix] = len(vocab)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=CLIPTokenizer(vocab=vocab, merges=[]))
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1, **tower),
                        vision_config=dict(image_size=32, patch_size=8, **tower), projection_dim=16)
    model = CLIPModel(config)
    # CLIP's own init (std 0.02) maps every input to nearly one direction (all cosines ~ -0.35); wider
    # random weights give varied embeddings, positive and negative cosines, so the clamp is exercised
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    path = tmp_path_factory.mktemp("tiny-clip")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def images_and_captions(n=12, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 24, 24, 3), dtype=np.uint8)
    return images, class_captions(np.arange(n) % 3, ["circle", "square", "cross"])


def test_clip_score_matches_torchmetrics_and_a_direct_computation(tiny_clip):
    from torchmetrics.multimodal.clip_score import CLIPScore

    model, processor = load_clip(str(tiny_clip))
    images, captions = images_and_captions()
    ours = clip_score(images, captions, model, processor, batch_size=5)
    assert ours.shape == (12,) and (ours >= 0).all() and (ours <= 100).all()

    # direct: vision/text towers, their projections, cosine, clamp — no get_*_features helpers
    with torch.no_grad():
        pix = processor(images=list(images), return_tensors="pt")["pixel_values"]
        txt = processor(text=captions, return_tensors="pt", padding=True)
        e_i = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output).double()
        e_t = model.text_projection(model.text_model(**txt).pooler_output).double()
    cos = (e_i / e_i.norm(dim=1, keepdim=True) * e_t / e_t.norm(dim=1, keepdim=True)).sum(1)
    direct = (100 * cos.clamp(min=0)).numpy()
    assert np.abs(ours - direct).max() <= 1e-4
    assert (cos < 0).any() and (cos > 0).any()  # the clamp is exercised: some scores are 0, some positive
    assert (ours == 0).sum() == (cos < 0).sum()

    # torchmetrics, given the same model (a thin adapter: transformers 5 returns output objects from
    # get_*_features, torchmetrics 1.9 expects tensors). One image per call: torchmetrics clamps the mean.
    class Adapter(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def get_image_features(self, *a, **kw):
            return self.inner.get_image_features(*a, **kw).pooler_output

        def get_text_features(self, *a, **kw):
            return self.inner.get_text_features(*a, **kw).pooler_output

    metric = CLIPScore(model_name_or_path=lambda: (Adapter(model), processor))
    reference = []
    for img, cap in zip(images, captions):
        metric.reset()
        metric.update(torch.from_numpy(img).permute(2, 0, 1)[None], [cap])
        reference.append(float(metric.compute()))
    assert np.allclose(ours, reference, rtol=1e-5, atol=1e-4)


def test_clip_unavailable_is_one_clear_line(tmp_path):
    with pytest.raises(ClipUnavailable, match="evaluation.clip_model is null"):
        load_clip(None)
    with pytest.raises(ClipUnavailable) as err:
        load_clip(str(tmp_path / "no-such-clip"))
    assert "not available offline" in str(err.value) and "\n" not in str(err.value)
