"""Fréchet distances, always computed by clean-fid's `frechet_distance`, so every number here is comparable
with clean-fid's own (one implementation of the matrix square root, not three).

Two protocols, never mixed (metrics are named by protocol, see ARCHITECTURE.md):
- `fd_evaluator`: features of the offline evaluator (`ldm.metrics.evaluator`). Works offline. The same
  numbers come out of clean-fid's folder API with `compute_fid(d1, d2, **clean_fid_kwargs(evaluator), ...)`:
  `EvaluatorResize` replaces clean-fid's 299 px bicubic resize with the evaluator's own resize (identity at
  the evaluator's native size), so a folder of PNGs and the same images in memory give the same features.
  Without `custom_fn_resize`, clean-fid would upsample to 299 px and the evaluator would downsample again:
  valid, but a different protocol.
- `fid_clean` / `fid_legacy_tf` (`inception_fid`): clean-fid's TorchScript Inception. Its weights are
  downloaded at first use; offline we check clean-fid's cache file first and fail in one line instead of
  waiting on network retries.

Statistics are float64 (mu, sigma with ddof=1 like clean-fid) and stored as npz with `mu`, `sigma`
(the clean-fid / ADM reference layout) plus a JSON `meta` string; nothing is loaded with pickle.
"""
from __future__ import annotations

import io
import json
import os
import platform
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from cleanfid import fid as cleanfid_fid

from ldm.errors import MissingWeightsError
from ldm.metrics.evaluator import Evaluator, resize_to_input
from ldm.provenance import atomic_write_bytes

INCEPTION_FILE = "inception-2015-12-05.pt"  # cleanfid/downloads_helper.py: check_download_inception
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
PROTOCOLS = {"clean": "fid_clean", "legacy_tensorflow": "fid_legacy_tf"}


# ---------------------------------------------------------------------------------------------------- statistics
def feature_statistics(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of N×F features in float64; ddof=1 as in clean-fid's `fid_from_feats`."""
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"need an N×F feature array with N >= 2, got shape {feats.shape}")
    return feats.mean(axis=0), np.atleast_2d(np.cov(feats, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """clean-fid's Fréchet distance (scipy sqrtm) of two Gaussians, as a Python float."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    with warnings.catch_warnings():  # clean-fid 0.1.35 passes sqrtm(disp=False); scipy < 1.18 is pinned for it
        warnings.filterwarnings("ignore", message=".*`disp` argument is deprecated", category=DeprecationWarning)
        return float(cleanfid_fid.frechet_distance(mu1, sigma1, mu2, sigma2))


def save_stats(path: str | Path, mu: np.ndarray, sigma: np.ndarray, meta: dict) -> None:
    """Write npz {mu, sigma, meta (JSON string)} atomically; values are stored exactly as given."""
    buf = io.BytesIO()
    np.savez(buf, mu=np.asarray(mu), sigma=np.asarray(sigma), meta=np.array(json.dumps(meta, sort_keys=True)))
    atomic_write_bytes(path, buf.getvalue())


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, meta) from our npz or a plain clean-fid / ADM one (meta {} there); never unpickles."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"{path}: expected arrays 'mu' and 'sigma', found {f.files}")
        meta = json.loads(str(f["meta"])) if "meta" in f.files else {}
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
    """(mu, sigma) of the evaluator features of real images (uint8 N×H×W×3)."""
    return feature_statistics(evaluator.features(images, batch_size))


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


# ----------------------------------------------------------------------------------------- clean-fid Inception
def inception_weights_path(weights_dir: str | Path | None = None) -> Path:
    """The file clean-fid's `feature_extractor` loads: "./" on Windows, "/tmp" elsewhere (cleanfid/features.py),
    unless `weights_dir` or $LDM_INCEPTION_DIR (e.g. a pre-staged copy on a cluster) says otherwise."""
    if weights_dir is None:
        weights_dir = os.environ.get("LDM_INCEPTION_DIR") or ("./" if platform.system() == "Windows" else "/tmp")
    return Path(weights_dir) / INCEPTION_FILE


def _load_inception(mode: str, device: torch.device, weights_dir=None):
    """clean-fid's InceptionV3W as `build_feature_extractor(mode)` builds it, minus download and DataParallel."""
    path = inception_weights_path(weights_dir)
    if not path.is_file():
        raise MissingWeightsError(f"clean-fid Inception weights not found in {path}; put {INCEPTION_URL} there "
                                  "(clean-fid would download it, which needs network; offline)")
    from cleanfid.inception_torchscript import InceptionV3W

    try:
        model = InceptionV3W(str(path.parent), download=False, resize_inside=(mode == "legacy_tensorflow"))
    except RuntimeError as exc:  # a truncated download leaves a file torch.jit cannot read
        raise MissingWeightsError(f"clean-fid Inception weights in {path} are unreadable "
                                  f"({type(exc).__name__}); delete the file and fetch it again") from exc
    model = model.to(device).eval()
    return lambda x: model(x)


def _array_batches(images: np.ndarray, mode: str, batch_size: int):
    """In-memory twin of clean-fid's ResizeDataset: same resizer, same ToTensor conversion, same dtypes."""
    import torchvision
    from cleanfid.resize import build_resizer

    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise TypeError(f"expected uint8 images N×H×W×3, got {getattr(images, 'shape', type(images))}")
    fn_resize, to_tensor = build_resizer(mode), torchvision.transforms.ToTensor()
    for i in range(0, len(images), batch_size):
        out = []
        for img in images[i : i + batch_size]:
            r = fn_resize(img)
            out.append(to_tensor(np.array(r)) * 255 if r.dtype == np.uint8 else to_tensor(r))
        yield torch.stack(out)


def _inception_features(images, model, mode: str, device: torch.device, batch_size: int) -> np.ndarray:
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {folder}")
        if any(folder.glob("shard-*.parquet")):
            raise ValueError(f"{folder} is a prepared parquet directory: pass its images (uint8 array) or stats")
        feats = cleanfid_fid.get_folder_features(str(folder), model, num_workers=0, batch_size=batch_size,
                                                 device=device, mode=mode, verbose=False)
    else:
        feats = np.concatenate([cleanfid_fid.get_batch_features(b, model, device)
                                for b in _array_batches(images, mode, batch_size)])
    return np.asarray(feats, np.float64)


def inception_fid(gen_images, ref, mode: str = "clean", *, device: str | torch.device = "cpu",
                  batch_size: int = 32, weights_dir: str | Path | None = None) -> float:
    """FID with clean-fid's Inception: `mode` "clean" (fid_clean) or "legacy_tensorflow" (fid_legacy_tf).

    gen_images: uint8 N×H×W×3 or an image folder. ref: the same kinds, or (mu, sigma), or a stats npz
    (refused if its meta names another protocol). Raises MissingWeightsError at once when offline.
    """
    if mode not in PROTOCOLS:
        raise ValueError(f"mode must be one of {sorted(PROTOCOLS)}, got {mode!r}")
    device = torch.device(device)
    model = _load_inception(mode, device, weights_dir)  # before any other work: fail fast
    if isinstance(ref, tuple):
        mu2, sigma2 = ref
    elif isinstance(ref, (str, Path)) and str(ref).endswith(".npz"):
        mu2, sigma2, meta = load_stats(ref)
        if meta.get("protocol", PROTOCOLS[mode]) != PROTOCOLS[mode]:
            raise ValueError(f"{ref} holds {meta['protocol']} statistics, not {PROTOCOLS[mode]}")
    else:
        mu2, sigma2 = feature_statistics(_inception_features(ref, model, mode, device, batch_size))
    mu1, sigma1 = feature_statistics(_inception_features(gen_images, model, mode, device, batch_size))
    return frechet_distance(mu1, sigma1, mu2, sigma2)
