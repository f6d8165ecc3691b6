"""Fréchet distances as clean-fid computes them: clean-fid's `frechet_distance` formula (scipy `sqrtm`), except for
the Inception FIDs of fewer generated images than feature dimensions, where the same quantity is computed exactly
in the images' subspace (`frechet_distance_of_features`: an N×N eigenproblem instead of a 2048×2048 square root,
hundreds of times faster, the same number to ~1e-7 relative, the rounding of scipy's root).

Two protocols, never mixed (metrics are named by protocol, see ARCHITECTURE.md):
- `fd_evaluator` (here): features of the offline evaluator (`ldm.metrics.evaluator`). Works offline. The same
  numbers come out of clean-fid's folder API with `compute_fid(d1, d2, **clean_fid_kwargs(evaluator), ...)`:
  `EvaluatorResize` replaces clean-fid's 299 px bicubic resize with the evaluator's own resize (identity at
  the evaluator's native size), so a folder of PNGs and the same images in memory give the same features.
  Without `custom_fn_resize`, clean-fid would upsample to 299 px and the evaluator would downsample again:
  valid, but a different protocol.
- `fid_clean` / `fid_legacy_tf`: the TF Inception network, in `ldm.metrics.inception`.

Statistics are float64 (mu, sigma with ddof=1 like clean-fid) and stored as npz with `mu`, `sigma`
(the clean-fid / ADM reference layout) plus a JSON `meta` string; nothing is loaded with pickle.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from scipy import linalg

from ldm.metrics.evaluator import Evaluator, resize_to_input
from ldm.provenance import atomic_write_bytes


# ---------------------------------------------------------------------------------------------------- statistics
def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of N×F features in float64; ddof=1 as in clean-fid's `fid_from_feats`."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need an N×F feature array with N >= 2, got shape {feats.shape}")
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


class StreamingMoments:
    """(mean, covariance) of feature rows added chunk by chunk, in memory bounded by `block` rows (plus one F×F
    matrix), whatever the number of rows: the Inception features of 1.28M images (10 GB) are never held.

    Rows are buffered in blocks of exactly `block` (so any chunking of the same rows gives the same bits); each
    block's mean and centred scatter are merged pairwise (Chan, Golub & LeVeque 1979), as accurate as the two-pass
    covariance, unlike a running sum of outer products (cancellation). With at most `block` rows nothing is merged:
    the result is `feature_statistics` of all rows, bit for bit.
    """

    def __init__(self, block: int = 4096):
        self.block, self.count, self._rows, self._buffered = block, 0, [], 0
        self._mean: np.ndarray | None = None
        self._scatter: np.ndarray | None = None

    @classmethod
    def of(cls, chunks, block: int = 4096) -> "StreamingMoments":
        """The moments of every N×F array of the iterable `chunks`."""
        moments = cls(block)
        for chunk in chunks:
            moments.add(chunk)
        return moments

    def add(self, feats) -> None:
        feats = np.asarray(feats, np.float64)
        if feats.ndim != 2:
            raise ValueError(f"expected an N×F feature array, got shape {feats.shape}")
        self._rows.append(feats)
        self._buffered += len(feats)
        if self._buffered <= self.block:  # keep at most one block buffered; fold whole blocks only
            return
        rows = np.concatenate(self._rows)  # once: a large chunk is folded by offset, not copied per block
        start = 0
        while len(rows) - start > self.block:
            self._fold(rows[start:start + self.block])
            start += self.block
        self._rows, self._buffered = [rows[start:]], len(rows) - start

    def _fold(self, rows: np.ndarray) -> None:
        mean = rows.mean(axis=0)
        centred = rows - mean
        scatter, n = centred.T @ centred, len(rows)
        if self._mean is None:
            self._mean, self._scatter, self.count = mean, scatter, n
            return
        total = self.count + n
        delta = mean - self._mean
        self._scatter = self._scatter + scatter + np.outer(delta, delta) * (self.count * n / total)
        self._mean = self._mean + delta * (n / total)
        self.count = total

    @property
    def rows(self) -> int:
        return self.count + self._buffered

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance with ddof=1), float64, as `feature_statistics`."""
        rows = np.concatenate(self._rows) if self._rows else np.zeros((0, 0))
        if self._mean is None:
            return feature_statistics(rows)  # at most one block: the two-pass statistics of all rows
        if len(rows):
            self._fold(rows)
            self._rows, self._buffered = [], 0
        return self._mean, np.atleast_2d(self._scatter / (self.count - 1))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """clean-fid's Fréchet distance of two Gaussians (its `frechet_distance`, operation for operation: scipy `sqrtm`
    of sigma1·sigma2, eps on the diagonals if that is singular, the real part), as a Python float.

    Why not call clean-fid's function: importing `cleanfid.fid` pulls in torchvision and torch._dynamo, 3-4 CPU-s
    per process, and every `ldm evaluate` job computes `fd_evaluator` (a study runs about a hundred) while only the
    Inception protocols need clean-fid itself. tests/test_metrics.py holds the two equal bit for bit."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def low_rank_frechet_distance(feats1, mu2, sigma2) -> float:
    """The Fréchet distance between the Gaussian of N features `feats1` (N×D, N - 1 < D) and (mu2, sigma2), exactly,
    without a D×D matrix square root.

    Why: clean-fid's `frechet_distance` takes scipy's `sqrtm` of the D×D matrix sigma1 @ sigma2 (D = 2048 for the
    Inception: 15-40 s on one CPU thread, per seed and snapshot; this takes 0.01-0.05 s for N = 8-256), and reads
    only its trace. With N images, sigma1 =
    A Aᵀ for A = (features - mean)ᵀ / sqrt(N - 1) (D×N, the ddof=1 covariance of `feature_statistics`), so sigma1
    @ sigma2 = A (Aᵀ sigma2) has rank < N and the same non-zero eigenvalues as the N×N matrix Aᵀ sigma2 A (XY and
    YX share them). That matrix is symmetric positive semi-definite (sigma2 is a covariance), so its eigenvalues
    are real, >= 0, and tr sqrt(sigma1 sigma2) = sum of their square roots: the same number clean-fid's formula
    computes (|mu1 - mu2|² + tr sigma1 + tr sigma2 - 2 tr sqrt(sigma1 sigma2)), with an N×N symmetric
    eigendecomposition instead of a D×D Schur decomposition. Exact, not an approximation; if anything, more
    accurate than scipy's root of a singular matrix (good to ~sqrt(machine eps)). tests/test_inception.py checks it
    against clean-fid's `frechet_distance` to 1e-6 relative.
    """
    feats1 = np.asarray(feats1, np.float64)
    mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    n, dim = feats1.shape if feats1.ndim == 2 else (0, 0)
    if n < 2 or sigma2.shape != (dim, dim) or mu2.shape != (dim,):
        raise ValueError(f"need N×D features with N >= 2 and D-dim statistics: features {feats1.shape}, "
                         f"mu {mu2.shape}, sigma {sigma2.shape}")
    mu1 = feats1.mean(axis=0)
    a = (feats1 - mu1).T / np.sqrt(n - 1)  # D×N, sigma1 = a @ a.T
    small = a.T @ sigma2 @ a
    eigenvalues = np.linalg.eigvalsh((small + small.T) / 2)
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()  # rounding can leave tiny negative ones
    diff = mu1 - mu2
    return float(diff @ diff + np.einsum("ij,ij->", a, a) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_of_features(feats1, mu2, sigma2) -> float:
    """Fréchet distance between the features `feats1` (N×D) and (mu2, sigma2): `low_rank_frechet_distance` when
    N - 1 < D (sigma1 then has rank < D), else clean-fid's `frechet_distance` of `feature_statistics(feats1)`."""
    feats1 = np.asarray(feats1, np.float64)
    if feats1.ndim == 2 and 2 <= len(feats1) and len(feats1) - 1 < feats1.shape[1]:
        return low_rank_frechet_distance(feats1, mu2, sigma2)
    return frechet_distance(*feature_statistics(feats1), mu2, sigma2)


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, meta: dict) -> None:
    """Write npz {mu, sigma, meta (JSON string)} atomically; values are stored exactly as given."""
    buf = io.BytesIO()
    np.savez(buf, mu=np.asarray(mu), sigma=np.asarray(sigma), meta=np.array(json.dumps(meta, sort_keys=True)))
    atomic_write_bytes(path, buf.getvalue())


#: arrays only an ADM reference batch (openai/guided-diffusion `evaluations/`) holds besides mu and sigma
ADM_MARKERS = {"mu_s", "sigma_s", "arr_0"}


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, meta) from our npz or a plain clean-fid / ADM one (meta {} there); never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', found {f.files}")
        meta = json.loads(str(f["meta"])) if "meta" in f.files else {}
        if "meta" not in f.files and ADM_MARKERS & set(f.files):  # guided-diffusion's evaluator wrote it
            meta = {"adm_reference_batch": True}
        return f["mu"], f["sigma"], meta


# ------------------------------------------------------------------------------------------- evaluator features
class EvaluatorFeatures(nn.Module):
    """The evaluator as a plain feature extractor, for clean-fid (`custom_feat_extractor`, float 0..255
    N×3×H×W) and torchmetrics (`FrechetInceptionDistance(feature=...)`, uint8 N×3×H×W). Returns float64
    on the input's device, so neither library accumulates statistics in float32."""

    def __init__(self, evaluator: Evaluator, batch_size: int = 256):
        super().__init__()
        self.evaluator, self.batch_size = evaluator, batch_size
        self.num_features = evaluator.feature_dim  # torchmetrics reads this instead of probing with a dummy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.evaluator.features(x, self.batch_size)).to(x.device)


class EvaluatorResize:
    """clean-fid `custom_fn_resize`: H×W×3 image -> float32 size×size×3 through the evaluator's own resize.

    A class, not a closure, so clean-fid's DataLoader can pickle it when num_workers > 0.
    """

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        return resize_to_input(x, self.size)[0].permute(1, 2, 0).numpy()


def clean_fid_kwargs(evaluator: Evaluator) -> dict:
    """Arguments that make `cleanfid.fid.compute_fid(dir1, dir2, ...)` compute our `fd_evaluator`."""
    return {"mode": "clean", "custom_feat_extractor": EvaluatorFeatures(evaluator),
            "custom_fn_resize": EvaluatorResize(evaluator.input_size)}


def reference_statistics(images, evaluator: Evaluator, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the evaluator features of images (uint8 N×H×W×3 or `ldm.data.prepared.PreparedImages`),
    streamed: one batch decoded at a time (the network sees the batches of one pass over all images), moments
    accumulated (`StreamingMoments`; bit for bit the statistics of all features up to its block)."""
    return StreamingMoments.of(evaluator.features(images[start:start + batch_size], batch_size)
                               for start in range(0, len(images), batch_size)).statistics()


def fd_evaluator(gen_images, ref_stats, evaluator: Evaluator, batch_size: int = 256) -> float:
    """Fréchet distance between generated images and reference stats ((mu, sigma) or an npz path).

    A stats file made with other evaluator weights is refused (its meta names the weights' sha256).
    """
    if isinstance(ref_stats, (str, Path)):
        mu2, sigma2, meta = load_stats(ref_stats)
        want, have = meta.get("evaluator_weights_sha256"), evaluator.config.get("weights_sha256")
        if want and have and want != have:
            raise ValueError(f"{ref_stats} was computed with another evaluator "
                             f"(weights {want[:12]}, loaded {have[:12]})")
    else:
        mu2, sigma2 = ref_stats
    mu1, sigma1 = reference_statistics(gen_images, evaluator, batch_size)
    return frechet_distance(mu1, sigma1, mu2, sigma2)


# ------------------------------------------------------------------------------------- Inception (TF 2015-12-05)
