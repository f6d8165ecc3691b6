"""`ldm reference-stats`: evaluator-feature statistics (mean, covariance) of a prepared dataset, the real
side of `fd_evaluator`, with the hashes of the data and the evaluator they were computed from.

With `--inception MODE` (clean, legacy_tensorflow; repeatable) it also writes the Inception statistics of the
same images for that protocol (fid_clean, fid_legacy_tf) next to them, at
`ldm.metrics.fid.inception_reference_path(out, mode)`, so evaluation never recomputes them. The Inception
network runs at 299 px (a few images per second per CPU core): `--inception-max-images K` caps the images used
to K evenly spaced ones (image i * N // K of N, so every part of the prepared order, e.g. every class, keeps its
share); the meta of each file says how many were used (`count`) out of how many (`of`).

Memory is bounded whatever the number of images: the prepared images are decoded a chunk at a time
(`ldm.data.prepared.PreparedImages`) and both statistics accumulate moments (`ldm.metrics.fid.StreamingMoments`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.prepared import REPORT, evenly_spaced, image_chunks
from ..progress import progress
from ..data.prepared import open_prepared as load_prepared  # lazy: (PreparedImages, meta); tests swap in arrays
from ..metrics.evaluator import WEIGHTS, load_evaluator
from ..metrics.fid import reference_statistics, save_stats
from ..metrics.inception import PROTOCOLS, inception_reference_path, save_inception_reference
from ..provenance import file_sha256


__all__ = ["evenly_spaced", "inception_device", "run"]  # evenly_spaced: ldm.data.prepared's, kept importable here

#: images decoded at a time for the Inception statistics (a whole number of its batches of 32; 200 MB at 512 px)
CHUNK = 256


def inception_device(requested: str | None = None) -> str:
    """The Inception runs on `requested`, else on the GPU when there is one (the 299 px network is the slow part)."""
    import torch

    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def run(args) -> None:
    prepared = Path(args.prepared)
    modes = list(dict.fromkeys(getattr(args, "inception", None) or []))
    unknown = [m for m in modes if m not in PROTOCOLS]
    if unknown:  # before any work: a typo should not cost a run
        raise ValueError(f"--inception: unknown mode(s) {unknown}; known: {sorted(PROTOCOLS)}")
    images, _ = load_prepared(prepared)
    evaluator = load_evaluator(Path(args.evaluator))
    provenance = {"prepared": str(args.prepared), "prepared_report_sha256": file_sha256(prepared / REPORT)}
    cap = getattr(args, "inception_max_images", None)
    pick = evenly_spaced(len(images), cap) if modes else np.arange(len(images))
    selection = "all images" if len(pick) == len(images) else f"{len(pick)} evenly spaced: image i * N // K"
    device = inception_device(getattr(args, "device", None)) if modes else "cpu"
    for mode in modes:  # written before the evaluator statistics, the file the rule's consumers wait on
        out = inception_reference_path(args.out, mode)
        chunks = progress(image_chunks(images, pick, CHUNK), f"reference-stats inception {mode}",
                          total=-(-len(pick) // CHUNK), unit="chunk")
        meta = save_inception_reference(chunks, mode, out, device=device,
                                        meta={**provenance, "of": int(len(images)), "max_images": cap,
                                              "selection": selection})
        print(f"{meta['protocol']} reference statistics of {meta['count']} of {len(images)} images written to {out}")
    mu, sigma = reference_statistics(images, evaluator)
    save_stats(Path(args.out), mu, sigma, {**provenance, "count": int(len(images)),
                                           "evaluator_weights_sha256": file_sha256(Path(args.evaluator) / WEIGHTS)})
    print(f"reference statistics of {len(images)} images written to {args.out}")
