"""Benchmark: latent-cache read throughput against the rate at which the default model consumes samples.

Reads the 64 px cache of the embedded default through `LatentDataset` + a torch DataLoader (one worker,
random order: the access pattern of training) and compares samples/s with the training consumption rate
of the default DiT on the same cache, measured in this run. Issue #4 asks for >= 20x headroom.

    python benchmarks/cache_read.py [--batches 40] [--steps 40] [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.train_overhead import cpu_model, minimal_step_fn  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.latents import LatentDataset  # noqa: E402
from ldm.train import latents_dir  # noqa: E402

RUN = "dit.synthetic.scratch.64"


def read_rate(cache: Path, batch_size: int, batches: int) -> float:
    loader = torch.utils.data.DataLoader(LatentDataset(cache, verify=False), batch_size=batch_size, shuffle=True,
                                         num_workers=1, generator=torch.Generator().manual_seed(0))
    seen, start = 0, None
    for i, batch in enumerate(loader):
        if i == 1:  # the first batch pays for worker start-up
            start, seen = time.perf_counter(), 0
        seen += len(batch["label"])
        if i == batches:
            break
    return seen / (time.perf_counter() - start)


def training_rate(config: dict, steps: int) -> float:
    step = minimal_step_fn(config, RUN)
    step()  # the first step pays for allocator warm-up
    start, seen = time.perf_counter(), 0
    for _ in range(steps):
        seen += step()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/cache_read.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(REPO / "config" / "default.yaml")
    cache = latents_dir(config, config["resolutions"]["high"])
    if not (cache / "manifest.json").exists():
        sys.exit(f"no latent cache at {cache}: run `snakemake --cores 2` (the embedded default) first")
    batch_size = config["training"]["batch_size"]
    read = read_rate(cache, batch_size, args.batches)
    train = training_rate(config, args.steps)
    print(f"{'what':<44}{'samples/s':>12}")
    print(f"{'cache read (DataLoader, 1 worker, shuffled)':<44}{read:>12.1f}")
    print(f"{'training consumption (default DiT, 64 px)':<44}{train:>12.1f}")
    ratio = read / train
    if args.json:
        (REPO / "benchmarks" / "results" / "cache_read.json").write_text(json.dumps({
            "benchmark": "cache_read", "read_samples_per_s": read, "train_samples_per_s": train, "ratio": ratio,
            "batch_size": batch_size, "threads": 1, "cpu": cpu_model(), "torch": torch.__version__}, indent=2) + "\n")
    print(f"cache read / training consumption: {ratio:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
