"""Benchmark: `ldm prepare --workers 2` against one process on the same synthetic source, with byte identity.

Both sides prepare the same folder tree of synthetic images (written once, outside the timing; its files
are in the page cache for both) at 64 px with the center crop, through `ldm.stages.prepare.prepare`, the
code `ldm prepare` runs: one process streams rows into shards; two workers prepare parts of the source and
then assemble the shards (`ldm.data.prepare_parallel`). Every file the workers write (shards and
report.json) must equal the single process's byte for byte, or the benchmark fails. Repeats alternate
which side goes first, so that machine load hits both alike; medians are reported. Goal: >= 1.7x on 2 cores.
The machine's own ceiling (a pure-CPU loop in 1 vs 2 processes, `ceiling`) is measured before and after: on
a shared machine it shows how much of a second core there was to gain, which limits the speed-up.

    python benchmarks/prepare.py [--images 25000] [--workers 2] [--repeats 2] [--data DIR] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.train_overhead import cpu_model  # noqa: E402
from ldm.data.synthetic_writer import write_synthetic  # noqa: E402
from ldm.stages.prepare import prepare  # noqa: E402

GOAL = 1.7


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def cpu_s() -> float:
    """CPU seconds of this process and its finished children (the workers, joined when prepare returns)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def ceiling(workers: int, n: int = 10_000_000) -> float:
    """What this machine gives `workers` processes right now: the speed-up of a pure-CPU loop run by that many
    processes at once over the same loops one after another (the 2 cores are shared with other people's jobs;
    under their load this falls well below `workers`, and no parallel prepare can beat it)."""
    import multiprocessing

    t = time.perf_counter()
    for _ in range(workers):
        _spin(n)
    serial = time.perf_counter() - t
    t = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_spin, [n] * workers)
    return serial / (time.perf_counter() - t)


def timed(source: Path, out: Path, workers: int, resolution: int, shard_size: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one prepare."""
    shutil.rmtree(out, ignore_errors=True)
    t, c = time.perf_counter(), cpu_s()
    prepare(str(source), out, resolution, shard_size=shard_size, workers=workers)
    return time.perf_counter() - t, cpu_s() - c


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=25000, help="synthetic images (~20 s for one process here)")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=1000, help="as `ldm prepare --shard-size` (its default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, default=None, help="keep the synthetic source here (reused if there)")
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/prepare.json")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    source = args.data or scratch / "synthetic"
    if not (source / "dataset.json").is_file():
        print(f"writing {args.images} synthetic images to {source} (not timed)")
        write_synthetic(source, args.images, seed=0)
    load_before, ceiling_before = os.getloadavg(), ceiling(args.workers)
    print(f"machine ceiling now: {ceiling_before:.2f}x for {args.workers} processes (pure-CPU loop)")
    one_s, many_s, cpu, identical = [], [], {1: [], args.workers: []}, True
    try:
        for r in range(args.repeats):
            order = (1, args.workers) if r % 2 == 0 else (args.workers, 1)
            for w in order:
                took, used = timed(source, scratch / f"w{w}", w, args.resolution, args.shard_size)
                (one_s if w == 1 else many_s).append(took)
                cpu[w].append(used)
                print(f"repeat {r + 1}: {w} worker(s) {took:.2f} s wall, {used:.2f} s CPU")
            same = files(scratch / f"w{args.workers}") == files(scratch / "w1")
            identical &= same
            print(f"repeat {r + 1}: {len(files(scratch / 'w1'))} files, byte-identical: {same}")
        report = json.loads((scratch / "w1" / "report.json").read_text())
    finally:  # the outputs, and the source unless --data keeps it elsewhere
        shutil.rmtree(scratch, ignore_errors=True)
    load_after, ceiling_after = os.getloadavg(), ceiling(args.workers)
    med_1, med_n = statistics.median(one_s), statistics.median(many_s)
    ratio = med_1 / med_n
    paired = [a / b for a, b in zip(one_s, many_s)]  # each pair ran back to back: under similar load
    n = report["kept"]
    print(f"{'path':<26}{'median s':>10}{'images/s':>10}   repeats (s)")
    print(f"{'1 process':<26}{med_1:>10.2f}{n / med_1:>10.1f}   " + ", ".join(f"{t:.2f}" for t in one_s))
    print(f"{f'{args.workers} workers':<26}{med_n:>10.2f}{n / med_n:>10.1f}   " + ", ".join(f"{t:.2f}" for t in many_s))
    print(f"{n} images at {args.resolution} px into {len(report['shards'])} shards; {os.cpu_count()} cpus, "
          f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; machine ceiling "
          f"(pure-CPU loop, {args.workers} processes) {ceiling_before:.2f}x before, {ceiling_after:.2f}x after")
    if args.json:
        (REPO / "benchmarks" / "results" / "prepare.json").write_text(json.dumps({
            "benchmark": "prepare", "images": n, "resolution": args.resolution, "crop": "center",
            "shard_size": args.shard_size, "shards": len(report["shards"]), "workers": args.workers,
            "repeats": args.repeats, "one_process_s": one_s, "workers_s": many_s,
            "one_process_cpu_s": cpu[1], "workers_cpu_s": cpu[args.workers],
            "paired_speedups": paired, "one_process_images_per_s": n / med_1, "workers_images_per_s": n / med_n, "speedup": ratio,
            "goal": GOAL, "byte_identical": identical, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "load_avg_1min_before": load_before[0], "load_avg_1min_after": load_after[0],
            "machine_ceiling_before": ceiling_before, "machine_ceiling_after": ceiling_after,
            "python": platform.python_version()}, indent=2) + "\n")
    print("speed-up of each back-to-back pair: " + ", ".join(f"{r:.2f}x" for r in paired))
    print(f"speed-up at {args.workers} workers vs 1 process: {ratio:.2f}x (goal >= {GOAL}x); "
          f"byte-identical: {identical}")
    if not identical:
        sys.exit(f"{args.workers} workers did not write the bytes of one process")


if __name__ == "__main__":
    main()
