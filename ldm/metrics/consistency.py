"""Size-condition consistency: the paper's Figure 2 effect as a number.

Same noise seed and class, only the size condition (SDXL's original size) changes. A model whose size
embedding is entangled with content changes *what* it draws, not only how sharp it is; the evaluator's
predicted class then flips between sizes. Two numbers per run:
- `size_consistency`: share of (seed, image) groups whose predicted class is the same at every size;
- `size_consistency_pairwise`: mean over pairs of sizes of the share of groups that agree on that pair.
Conditional accuracy per size is reported next to them, since a model that never draws the right class
can still be "consistent".
"""
from __future__ import annotations

from itertools import combinations

import numpy as np

__all__ = ["size_consistency"]


def size_consistency(predicted: np.ndarray, labels: np.ndarray | None = None,
                     sizes: list[int] | None = None) -> dict:
    """predicted: (S, G) evaluator classes, row s = size condition s, column g = one (seed, image) group."""
    pred = np.asarray(predicted)
    if pred.ndim != 2 or pred.shape[0] < 2 or pred.shape[1] < 1:
        raise ValueError(f"need predictions of shape (sizes >= 2, groups >= 1), got {pred.shape}")
    all_same = (pred == pred[:1]).all(0).mean()
    pairwise = np.mean([(pred[a] == pred[b]).mean() for a, b in combinations(range(len(pred)), 2)])
    out = {"size_consistency": float(all_same), "size_consistency_pairwise": float(pairwise)}
    if labels is not None:
        acc = (pred == np.asarray(labels)[None]).mean(1)
        names = sizes if sizes is not None else list(range(len(pred)))
        out["cond_accuracy_by_size"] = {str(s): float(a) for s, a in zip(names, acc)}
    return out
