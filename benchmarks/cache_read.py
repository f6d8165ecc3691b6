"""Benchmark: latent-cache read throughput against the rate at which the default model consumes samples.

Reads the 64 px cache of the embedded default through `ShardShuffledLatents` (shard order shuffled,
rows shuffled within a window of shards) + a torch DataLoader (one persistent worker, the training batch
size) and compares samples/s with the training consumption rate of the default DiT on the same cache,
measured in this run. Issue #4 asks for >= 20x headroom. The read rate covers whole epochs after a
warm-up epoch (which pays for worker start-up), so every shard load and shuffle is inside the timing.
Read and training rates are measured in alternation, `--repeats` times; the ratio is the median of the
per-repeat ratios (the machine's load changes between repeats, less within one).
For reference it also prints the random-access path (`LatentDataset` + `shuffle=True`), which reloads a
shard whenever consecutive indices fall in different shards.

    python benchmarks/cache_read.py [--epochs 5] [--window 4] [--steps 40] [--repeats 3] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.train_overhead import cpu_model, minimal_step_fn  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.layout import Layout  # noqa: E402
from ldm.data.latent_cache import LatentDataset, ShardShuffledLatents  # noqa: E402

RUN = "dit.synthetic.scratch.64"
RUN_DATA = "r64"  # the run's latent cache (64 px, center crop)


def read_rate(cache: Path, batch_size: int, epochs: int, window: int) -> float:
    """Samples/s of the shard-aware shuffled reader over `epochs` full epochs, after a warm-up epoch."""
    loader = torch.utils.data.DataLoader(ShardShuffledLatents(cache, window=window, seed=0, verify=False),
                                         batch_size=batch_size, num_workers=1, persistent_workers=True)
    for _ in loader:  # warm-up epoch: worker start-up
        pass
    seen, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            seen += len(batch["label"])
    return seen / (time.perf_counter() - start)


def random_access_rate(cache: Path, batch_size: int, batches: int) -> float:
    """The previous definition: map-style `LatentDataset`, shuffle=True, first batch excluded."""
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


def training_rate(step, steps: int) -> float:
    step()  # the first step pays for allocator warm-up
    start, seen = time.perf_counter(), 0
    for _ in range(steps):
        seen += step()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs of the shard-aware reader")
    parser.add_argument("--window", type=int, default=4, help="shards shuffled together")
    parser.add_argument("--batches", type=int, default=40, help="batches of the random-access reference")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/cache_read.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(REPO / "config" / "default.yaml")
    cache = Layout.of(config).latents(RUN_DATA)
    if not (cache / "manifest.json").exists():
        sys.exit(f"no latent cache at {cache}: run `snakemake --cores 2` (the embedded default) first")
    batch_size = config["training"]["batch_size"]
    step = minimal_step_fn(config, RUN)
    reads, randoms, trains = [], [], []
    for _ in range(args.repeats):  # interleaved, so that a change in machine load hits both sides alike
        reads.append(read_rate(cache, batch_size, args.epochs, args.window))
        randoms.append(random_access_rate(cache, batch_size, args.batches))
        trains.append(training_rate(step, args.steps))
    ratios = [r / t for r, t in zip(reads, trains)]
    random_ratios = [r / t for r, t in zip(randoms, trains)]
    read, random_access, train = (statistics.median(x) for x in (reads, randoms, trains))
    ratio, random_ratio = statistics.median(ratios), statistics.median(random_ratios)
    name = f"cache read (shard-shuffled, window {args.window}, 1 worker)"
    print(f"{'what (median of ' + str(args.repeats) + ' repeats)':<52}{'samples/s':>12}   repeats")
    for label, med, xs in ((name, read, reads), ("  reference: random access (LatentDataset, shuffle)", random_access, randoms),
                           ("training consumption (default DiT, 64 px)", train, trains)):
        print(f"{label:<52}{med:>12.1f}   " + ", ".join(f"{x:.1f}" for x in xs))
    if args.json:
        (REPO / "benchmarks" / "results" / "cache_read.json").write_text(json.dumps({
            "benchmark": "cache_read", "reader": "ShardShuffledLatents", "window": args.window,
            "epochs": args.epochs, "repeats": args.repeats, "shards": len(LatentDataset(cache, verify=False).shards),
            "read_samples_per_s": read, "random_access_samples_per_s": random_access,
            "train_samples_per_s": train, "ratio": ratio, "random_access_ratio": random_ratio,
            "repeat_read_samples_per_s": reads, "repeat_random_access_samples_per_s": randoms,
            "repeat_train_samples_per_s": trains, "repeat_ratios": ratios,
            "batch_size": batch_size, "threads": 1, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0], "torch": torch.__version__}, indent=2) + "\n")
    print(f"random access / training consumption: {random_ratio:.1f}x (median of per-repeat ratios)")
    print(f"cache read / training consumption: {ratio:.1f}x (median of per-repeat ratios; target >= 20x)")


if __name__ == "__main__":
    main()
