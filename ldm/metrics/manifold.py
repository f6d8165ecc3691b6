"""Improved precision and recall (Kynkäänniemi et al. 2019) on k-NN manifolds of evaluator features.

Each set's manifold is the union of balls around its points, the radius of a point being the distance to
its k-th nearest other point of the same set (k = 3, the paper's default). Precision = share of generated
points inside the real manifold (fidelity); recall = share of real points inside the generated manifold
(coverage). Distances are exact float64 Euclidean (no |a|^2 - 2ab + |b|^2 expansion, whose rounding makes
a point's distance to itself non-zero), computed in row chunks to bound memory.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["knn_radii", "manifold_coverage", "precision_recall"]


def _as64(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if t.ndim != 2:
        raise ValueError(f"expected an N×F feature array, got shape {tuple(t.shape)}")
    return t


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(feats, k: int = 3, chunk: int = 1024) -> np.ndarray:
    """Distance of every point to its k-th nearest *other* point (duplicates count as neighbours at 0)."""
    x = _as64(feats)
    if not 1 <= k < len(x):
        raise ValueError(f"k must be in 1..{len(x) - 1} for {len(x)} points, got {k}")
    # the point itself is at distance 0, i.e. the smallest: the k-th other neighbour is the (k+1)-th value
    return torch.cat([_dist(x[s:s + chunk], x).kthvalue(k + 1, dim=1).values
                      for s in range(0, len(x), chunk)]).numpy()


def manifold_coverage(manifold, radii, queries, chunk: int = 1024) -> np.ndarray:
    """Boolean per query: inside at least one ball (distance <= radius, boundary included as in the paper)."""
    m, q, r = _as64(manifold), _as64(queries), torch.as_tensor(np.asarray(radii, np.float64))
    return torch.cat([(_dist(q[s:s + chunk], m) <= r[None]).any(1) for s in range(0, len(q), chunk)]).numpy()


def precision_recall(real, fake, real_radii=None, k: int = 3) -> dict[str, float]:
    """{"precision", "recall"} of generated features `fake` against real features `real` (both N×F).
    `real_radii`: `knn_radii(real, k)` computed once beforehand (the real manifold is the same for every image
    set of an evaluation; recomputing it is O(N²) per call)."""
    real, fake = _as64(real), _as64(fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature widths differ: real {real.shape[1]}, fake {fake.shape[1]}")
    if real_radii is not None and np.shape(real_radii) != (len(real),):
        raise ValueError(f"{np.shape(real_radii)} radii for {len(real)} real points")
    radii = knn_radii(real, k) if real_radii is None else real_radii
    precision = manifold_coverage(real, radii, fake).mean()
    recall = manifold_coverage(fake, knn_radii(fake, k), real).mean()
    return {"precision": float(precision), "recall": float(recall)}
