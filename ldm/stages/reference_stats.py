"""`ldm reference-stats`: evaluator-feature statistics (mean, covariance) of a prepared dataset, the real
side of `fd_evaluator`, with the hashes of the data and the evaluator they were computed from."""
from __future__ import annotations

from pathlib import Path

from ..data.prepared import REPORT, load_prepared
from ..metrics.evaluator import WEIGHTS, load_evaluator
from ..metrics.fid import reference_statistics, save_stats
from ..provenance import file_sha256


def run(args) -> None:
    images, _ = load_prepared(Path(args.prepared))
    evaluator = load_evaluator(Path(args.evaluator))
    mu, sigma = reference_statistics(images, evaluator)
    save_stats(Path(args.out), mu, sigma, {"prepared": str(args.prepared), "count": int(len(images)),
                                           "prepared_report_sha256": file_sha256(Path(args.prepared) / REPORT),
                                           "evaluator_weights_sha256": file_sha256(Path(args.evaluator) / WEIGHTS)})
    print(f"reference statistics of {len(images)} images written to {args.out}")
