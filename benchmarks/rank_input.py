"""Benchmark: what each rank reads per training step, and whether reading keeps up with training.

`ldm train` under torchrun makes every random draw of the global batch on every rank but reads only the rank's
own rows from the memory-mapped cache (`MappedRows.gather(idx, keep=share)`). For world sizes 1, 2, 4 and 8
this replays the batches of a run (the same global batch indices on every rank) and prints, per rank, the
bytes read per step against the global batch's bytes (the target: 1 / world), and the rate at which one rank
gathers its rows against the rate the run's training step consumes them (measured in the same run, same
threads): above 1, the input never starves the step.

Then the trainer's own input pipeline (`ldm.data.loader`: the run's data order, a DataLoader over this rank's
rows) with 0 and 2 workers, for world 1 and rank 0 of world 2: bytes read per step, the loader's free-running
rows/s against the step's consumption, and the time the training step waits for its batch when the two
alternate (with workers, the next batches are read while the step computes).

    python benchmarks/rank_input.py [--config CONFIG --run RUN] [--steps 50] [--json]

Default: the embedded default's run and cache (run `snakemake --cores 2` first).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.train_overhead import RUN, minimal_step_fn  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.data.latent_cache import LatentDataset  # noqa: E402
from ldm.data.loader import StepIndices, rank_loader  # noqa: E402
from ldm.layout import Layout  # noqa: E402
from ldm.spec import Scenario  # noqa: E402
from ldm.stages.train import _micro_batches  # noqa: E402


def rank_reads(cache: Path, batch: int, world: int, steps: int, seed: int = 0) -> list[dict]:
    """Per rank: bytes read per step, their fraction of the global batch's bytes, rows gathered per second."""
    out = []
    for rank in range(world):
        rows = LatentDataset(cache, verify=False).rows()
        gen = torch.Generator().manual_seed(seed)  # the same global batches on every rank, as in training
        micro = _micro_batches(batch, world, rank, 1)
        own = slice(micro[0].start, micro[-1].stop)
        per_batch = batch * sum(rows.row_bytes.values())
        start = time.perf_counter()
        for _ in range(steps):
            rows.gather(torch.randint(0, len(rows), (batch,), generator=gen), keep=own if world > 1 else None)
        seconds = time.perf_counter() - start
        out.append({"world": world, "rank": rank, "bytes_per_step": rows.bytes_read / steps,
                    "fraction_of_global_batch": rows.bytes_read / steps / per_batch,
                    "rows_per_s": (own.stop - own.start) * steps / seconds})
    return out


def loader_rates(cache: Path, batch: int, world: int, workers: int, steps: int, step_fn, seed: int = 0) -> dict:
    """Rank 0's loader over a run's data order: bytes per step, free-running rows/s (after the first batch, which
    pays for starting the workers), and the mean wait for a batch when each is followed by a training step."""
    train_rows = LatentDataset(cache, verify=False).split_rows(heldout=False)
    micro = _micro_batches(batch, world, 0, 1)
    own = slice(micro[0].start, micro[-1].stop) if world > 1 else None

    def batches(count):
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(train_rows), generator=gen)
        sampler = StepIndices(order, {"epoch": 0, "position": 0}, gen.get_state(), batch, train_rows, count)
        return iter(rank_loader(cache, own, sampler, workers))

    it = batches(steps + 1)
    next(it)
    start, read = time.perf_counter(), 0
    for _ in range(steps):
        read += next(it)["bytes_read"]
    rows_per_s = (micro[-1].stop - micro[0].start) * steps / (time.perf_counter() - start)
    it = batches(steps + 1)
    next(it)
    waited, start = 0.0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        next(it)
        waited += time.perf_counter() - t
        step_fn()
    step_s = (time.perf_counter() - start - waited) / steps
    per_batch = batch * sum(LatentDataset(cache, verify=False).rows().row_bytes.values())
    return {"world": world, "rank": 0, "workers": workers, "bytes_per_step": read / steps,
            "fraction_of_global_batch": read / steps / per_batch, "rows_per_s": rows_per_s,
            "wait_ms_per_step": 1e3 * waited / steps, "step_ms": 1e3 * step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "config" / "default.yaml"))
    parser.add_argument("--run", default=RUN, help="the run whose cache is read and whose step is timed")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/rank_input.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = load_config(args.config)
    cache = Layout.of(config).latents(Scenario(config).run(args.run).data_key)
    if not (cache / "manifest.json").is_file():
        sys.exit(f"no latent cache at {cache}: run the pipeline of {args.config} first")
    batch = config["training"]["batch_size"]
    step = minimal_step_fn(config, args.run)
    step()
    start = time.perf_counter()
    for _ in range(10):
        step()
    consumed = 10 * batch / (time.perf_counter() - start)  # rows per second one process trains on
    results = []
    print(f"cache {cache}, global batch {batch}; one training step consumes {consumed:.0f} rows/s")
    print(f"{'world':>5} {'rank':>4} {'KiB/step':>9} {'of batch':>9} {'rows/s read':>12} {'read / consumed':>16}")
    for world in (1, 2, 4, 8):
        for r in rank_reads(cache, batch, world, args.steps):
            # a rank trains on batch / world rows per step in 1 / world of the time: the same rows/s to consume
            r["read_over_consumed"] = r["rows_per_s"] / consumed
            results.append(r)
            print(f"{r['world']:>5} {r['rank']:>4} {r['bytes_per_step'] / 1024:>9.1f} "
                  f"{r['fraction_of_global_batch']:>9.3f} {r['rows_per_s']:>12.0f} {r['read_over_consumed']:>16.1f}")
    worst = max(abs(r["fraction_of_global_batch"] - 1 / r["world"]) for r in results)
    print(f"largest deviation of a rank's share from 1/world: {worst:.4f}; slowest read / consumed: "
          f"{min(r['read_over_consumed'] for r in results):.1f}")
    print("\nthe trainer's DataLoader (ldm.data.loader), rank 0; wait: per step, batches alternating with steps")
    print(f"{'world':>5} {'workers':>7} {'KiB/step':>9} {'of batch':>9} {'rows/s':>8} {'/ consumed':>10} "
          f"{'wait ms':>8} {'step ms':>8}")
    loaders = []
    for world in (1, 2):
        for workers in (0, 2):
            r = loader_rates(cache, batch, world, workers, args.steps, step)
            r["loader_over_consumed"] = r["rows_per_s"] / consumed
            loaders.append(r)
            print(f"{world:>5} {workers:>7} {r['bytes_per_step'] / 1024:>9.1f} {r['fraction_of_global_batch']:>9.3f} "
                  f"{r['rows_per_s']:>8.0f} {r['loader_over_consumed']:>10.1f} {r['wait_ms_per_step']:>8.2f} "
                  f"{r['step_ms']:>8.1f}")
    load = os.getloadavg()
    print(f"load average (1, 5, 15 min) at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    if args.json:
        out = REPO / "benchmarks" / "results" / "rank_input.json"
        out.write_text(json.dumps({"benchmark": "rank_input", "config": args.config, "run": args.run, "batch": batch,
                                   "consumed_rows_per_s": consumed, "ranks": results, "loader": loaders,
                                   "cpus": os.cpu_count(), "loadavg_end": load}, indent=1) + "\n")


if __name__ == "__main__":
    main()
