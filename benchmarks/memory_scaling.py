"""Benchmark: peak RSS of the evaluation stages at N and 4N prepared images (issue 15: memory bounded by design).

For each size it synthesizes and prepares N (then 4N) synthetic images at the sampled run's resolution (64 px),
then runs, each as its own process (`ldm ... --threads 1`), and reads that process's peak RSS (`os.wait4`'s
ru_maxrss): `train-evaluator` (few steps), `reference-stats` (with `--inception clean` under `--inception`:
the 299 px network runs a few images/s per CPU core) and `evaluate` (fd_evaluator, cond_accuracy, precision,
recall) of an already sampled run (default: the default config's `dit.synthetic.scratch.64`, linked into each
size's work directory; only the real images change with N). It also measures `load_prepared`, the in-memory
reader every one of these stages used before, as the contrast: its peak grows with N. Prints the 4N / N ratio
per stage (goal <= 1.25) and writes benchmarks/results/memory_scaling.json with the machine load.

    python benchmarks/memory_scaling.py [--images 2500] [--factor 4] [--inception] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ldm.config import load_config  # noqa: E402
from ldm.layout import Layout, data_key  # noqa: E402

RUN = "dit.synthetic.scratch.64"
GOAL = 1.25
OLD_PATH = "import sys; from ldm.data.prepared import load_prepared; load_prepared(sys.argv[1])"


def peak_rss_mb(cmd: list[str], log: Path) -> float:
    """Run `cmd` as a child process and return its own peak resident set size in MiB (Linux ru_maxrss: KiB)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-2000:]}")
    return usage.ru_maxrss / 1024


def scenario(root: Path, n: int, run_dir: Path, steps: int) -> tuple[Path, dict]:
    """A copy of the default config whose workdir holds n prepared images and a link to the sampled run."""
    config = yaml.safe_load((REPO / "config" / "default.yaml").read_text())
    config.update(workdir=str(root / "work"), results=str(root / "results"))
    config["evaluator"]["steps"] = steps
    config["evaluation"]["metrics"] = ["fd_evaluator", "cond_accuracy", "precision", "recall"]
    path = root / "config.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    full = load_config(path)
    run = Layout.of(full).run(RUN).samples.parent
    run.parent.mkdir(parents=True, exist_ok=True)
    if not run.exists():
        run.symlink_to(run_dir.resolve())
    return path, full


def measure(root: Path, n: int, args) -> dict[str, float]:
    ldm = [sys.executable, "-m", "ldm.cli"]
    config_path, config = scenario(root, n, Path(args.run_dir), args.evaluator_steps)
    layout, res = Layout.of(config), config["resolutions"]["high"]
    prepared, logs = layout.prepared(data_key(res)), root / "logs"
    logs.mkdir(exist_ok=True)
    if not (prepared / "report.json").is_file():
        subprocess.run([*ldm, "synthesize", "--out", str(layout.synthetic), "--num-images", str(n)], cwd=REPO,
                       check=True, capture_output=True)
        subprocess.run([*ldm, "prepare", str(layout.synthetic / "folders"), "--out", str(prepared), "--resolution",
                        str(res)], cwd=REPO, check=True, capture_output=True)
    count = json.loads((prepared / "report.json").read_text())["kept"]
    stages = {
        "train-evaluator": [*ldm, "train-evaluator", "--config", str(config_path), "--out", str(layout.evaluator),
                            "--threads", "1"],
        "reference-stats": [*ldm, "reference-stats", "--prepared", str(prepared), "--evaluator", str(layout.evaluator),
                            "--out", str(layout.reference(res)), "--threads", "1",
                            *(["--inception", "clean", "--device", "cpu"] if args.inception else [])],
        "evaluate": [*ldm, "evaluate", "--config", str(config_path), "--run", RUN, "--threads", "1"],
        "load_prepared (old input path)": [sys.executable, "-c", OLD_PATH, str(prepared)],
    }
    out = {"images": count, "decoded_mib": round(count * res * res * 3 / 2**20, 1)}  # what holding them all costs
    for name, cmd in stages.items():
        start = time.perf_counter()
        out[name] = round(peak_rss_mb(cmd, logs / f"{name.split()[0]}.log"), 1)
        print(f"  {count} images, {name}: peak RSS {out[name]:.1f} MiB ({time.perf_counter() - start:.0f} s)",
              flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2500,
                        help="N (the second size is factor * N; at 4N = 10000, 117 MiB of decoded images)")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--inception", action="store_true", help="reference-stats also writes fid_clean statistics")
    parser.add_argument("--evaluator-steps", type=int, default=20)
    parser.add_argument("--run-dir", default=str(REPO / "work" / "runs" / RUN),
                        help="a sampled run of the default config (its samples/ and final weights are read)")
    parser.add_argument("--workdir", default=None, help="keep the generated data here (default: a temporary dir)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory_scaling.json"))
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    if not (Path(args.run_dir) / "samples" / "index.json").is_file():
        raise SystemExit(f"{args.run_dir}: no sampled run (make it with `snakemake --cores 2` on config/default.yaml)")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.workdir or tmp)
        sizes = [args.images, args.factor * args.images]
        rows = [measure(base / f"n{n}", n, args) for n in sizes]
    stages = [k for k in rows[0] if k not in ("images", "decoded_mib")]
    result = {
        "benchmark": "memory_scaling", "goal_ratio": GOAL, "images": [r["images"] for r in rows],
        "decoded_images_mib": [r["decoded_mib"] for r in rows], "resolution": 64, "inception": args.inception, "evaluator_steps": args.evaluator_steps,
        "stages": {s: {"peak_rss_mib": [r[s] for r in rows], "ratio": round(rows[1][s] / rows[0][s], 3)}
                   for s in stages},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'stage':32s} {'N':>10s} {'4N':>10s} {'ratio':>7s}")
    for s in stages:
        a, b = result["stages"][s]["peak_rss_mib"]
        flag = "" if s.startswith("load_prepared") else ("  ok" if b / a <= GOAL else "  over the goal")
        print(f"{s:32s} {a:9.1f}M {b:9.1f}M {b / a:7.3f}{flag}")


if __name__ == "__main__":
    main()
