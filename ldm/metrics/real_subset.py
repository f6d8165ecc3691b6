"""The real side of precision / recall: a fixed-size subset of the real prepared images
(`evaluation.pr_real_images`), its evaluator features and its k-NN radii, computed once per evaluation.

Why a subset: the real manifold's radii cost O(M²) distances and its features M × F floats; at M = N = 1.28M
(ImageNet) neither fits an evaluation. The subset is evenly spaced in prepared order (image i * N // M, as
`reference-stats --inception-max-images`), so every class keeps its share and the choice is deterministic; with
M >= N it is every image in order, which gives the numbers of the full set bit for bit. The images are decoded a
chunk at a time (`ldm.data.prepared.image_chunks`), in chunks of whole evaluator batches, so the evaluator sees the
batches of one pass over the subset (the same bits as one array).
"""
from __future__ import annotations

import numpy as np

from ..data.prepared import evenly_spaced, image_chunks
from .evaluator import BATCH
from .manifold import knn_radii


class RealManifold:
    """Evaluator features and k-NN radii of at most `max_images` evenly spaced images of `images` (a decoded uint8
    array or a `PreparedImages`)."""

    def __init__(self, images, evaluator, max_images: int | None, k: int, chunk: int = BATCH):
        if chunk % BATCH:
            raise ValueError(f"chunk {chunk} must be whole evaluator batches of {BATCH}")
        self.of, self.max_images, self.k = len(images), max_images, k
        self.indices = evenly_spaced(self.of, max_images)
        feats = [evaluator.features(c) for c in image_chunks(images, self.indices, chunk)]
        self.features = np.concatenate(feats) if feats else np.zeros((0, evaluator.feature_dim))
        self.radii = knn_radii(self.features, k)

    def provenance(self) -> dict:
        """What a metrics record says about the real side of precision / recall."""
        everything = len(self.indices) == self.of
        return {"real_images": int(len(self.indices)), "of": int(self.of), "pr_real_images": self.max_images,
                "selection": "all images" if everything else "evenly spaced: image i * N // M", "k": self.k}
