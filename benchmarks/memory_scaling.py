"""Benchmark: peak RSS of every pipeline stage at N and 4N prepared images (issue 15: memory bounded by design).

For each size it synthesizes N (then 4N) synthetic images and runs the embedded default's chain on them, each
stage as its own process (`ldm ... --threads 1`, the arguments the workflow's rules pass), reading that process's
peak RSS (`os.wait4`'s ru_maxrss): `prepare` (64 px, streamed into shards; the 32 px data the VAE also reads is
prepared unmeasured), `train-vae`, `encode` (the 64 px latent cache, shard by shard), `train` of
`dit.synthetic.scratch.64` (few steps: batches read from the memory-mapped cache), `sample` (a fixed number of
images), `train-evaluator` (few steps), `reference-stats` (with `--inception clean` under `--inception`: the 299 px
network runs a few images/s per CPU core) and `evaluate` (fd_evaluator, cond_accuracy, precision, recall) of the
run just sampled. Training, sampling and evaluator steps are cut down in the generated config (the JSON records
how): peaks, not run times, are measured, and none of them should depend on N. It also measures `load_prepared`,
the in-memory reader the evaluation stages used before, as the contrast: its peak grows with N. Prints the 4N / N
ratio per stage (goal <= 1.25) and writes benchmarks/results/memory_scaling.json with the machine load.

    python benchmarks/memory_scaling.py [--images 2500] [--factor 4] [--inception] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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
#: Kept from an existing result file: measured by hand with the code before issue 15, not by this script.
KEPT = ("pre_change_code",)


def peak_rss_mb(cmd: list[str], log: Path) -> float:
    """Run `cmd` as a child process and return its own peak resident set size in MiB (Linux ru_maxrss: KiB)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-2000:]}")
    return usage.ru_maxrss / 1024


def reduced_work(args) -> dict:
    """What the generated config cuts (steps and repeats, never batch sizes or sample counts: those set the peaks)."""
    return {"autoencoder_steps": args.vae_steps, "train_steps": args.train_steps, "training_snapshots": 1,
            "sampling_steps": args.sample_steps, "sampling_seeds": [0], "guidance_sweep": [],
            "evaluator_steps": args.evaluator_steps}


def scenario(root: Path, args) -> tuple[Path, dict]:
    """A copy of the default config with its workdir under `root` and the work of each stage cut down."""
    config = yaml.safe_load((REPO / "config" / "default.yaml").read_text())
    config.update(workdir=str(root / "work"), results=str(root / "results"))
    work = reduced_work(args)
    config["autoencoder"]["steps"] = work["autoencoder_steps"]
    config["stages"]["scratch"]["steps"] = work["train_steps"]
    config["training"]["snapshots"] = work["training_snapshots"]
    config["sampling"].update(steps=work["sampling_steps"], seeds=work["sampling_seeds"],
                              guidance_sweep=work["guidance_sweep"])
    config["evaluator"]["steps"] = work["evaluator_steps"]
    config["evaluation"]["metrics"] = ["fd_evaluator", "cond_accuracy", "precision", "recall"]
    path = root / "config.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, load_config(path)


def measure(root: Path, n: int, args) -> dict[str, dict[str, float]]:
    ldm = [sys.executable, "-m", "ldm.cli"]
    config_path, config = scenario(root, args)
    layout, (low, res) = Layout.of(config), (config["resolutions"]["low"], config["resolutions"]["high"])
    prepared, latents, logs = layout.prepared(data_key(res)), layout.latents(data_key(res)), root / "logs"
    for made in (layout.workdir / d for d in ("prepared", "vae", "latents", "runs", "evaluator", "reference")):
        shutil.rmtree(made, ignore_errors=True)  # a kept --workdir: every measured stage does its whole work again
    logs.mkdir(exist_ok=True)
    if not (layout.synthetic / "dataset.json").is_file():
        subprocess.run([*ldm, "synthesize", "--out", str(layout.synthetic), "--num-images", str(n)], cwd=REPO,
                       check=True, capture_output=True)

    def prepare(px: int) -> list[str]:
        return [*ldm, "prepare", layout.source("synthetic"), "--out", str(layout.prepared(data_key(px))),
                "--resolution", str(px), "--crop", "center", "--crops", "1", "--seed", str(config["seed"])]

    subprocess.run(prepare(low), cwd=REPO, check=True, capture_output=True)  # train-vae reads both resolutions
    # in pipeline order: each stage reads what the ones before it wrote
    stages = {
        "prepare": prepare(res),
        "train-vae": [*ldm, "train-vae", "--config", str(config_path), "--out", str(layout.trained_vae),
                      "--threads", "1"],
        "encode": [*ldm, "encode", "--prepared", str(prepared), "--vae", layout.vae, "--out", str(latents),
                   "--text-encoder", "none", "--heldout", str(config["dataset"]["heldout"]),
                   "--split-seed", str(config["seed"]), "--threads", "1"],
        "train": [*ldm, "train", "--config", str(config_path), "--run", RUN, "--threads", "1"],
        "sample": [*ldm, "sample", "--config", str(config_path), "--run", RUN, "--threads", "1"],
        "train-evaluator": [*ldm, "train-evaluator", "--config", str(config_path), "--out", str(layout.evaluator),
                            "--threads", "1"],
        "reference-stats": [*ldm, "reference-stats", "--prepared", str(prepared), "--evaluator", str(layout.evaluator),
                            "--out", str(layout.reference(res)), "--threads", "1",
                            *(["--inception", "clean", "--device", "cpu"] if args.inception else [])],
        "evaluate": [*ldm, "evaluate", "--config", str(config_path), "--run", RUN, "--threads", "1"],
        "load_prepared (old input path)": [sys.executable, "-c", OLD_PATH, str(prepared)],
    }
    out = {}
    for name, cmd in stages.items():
        start = time.perf_counter()
        peak = round(peak_rss_mb(cmd, logs / f"{name.split()[0]}.log"), 1)
        out[name] = {"peak": peak, "seconds": round(time.perf_counter() - start, 1)}
        if name == "prepare":
            count = json.loads((prepared / "report.json").read_text())["kept"]
        print(f"  {count} images, {name}: peak RSS {peak:.1f} MiB ({out[name]['seconds']:.0f} s)", flush=True)
    # what holding them all costs
    return {"images": count, "decoded_mib": round(count * res * res * 3 / 2**20, 1), "stages": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2500,
                        help="N (the second size is factor * N; at 4N = 10000, 117 MiB of decoded images)")
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--inception", action="store_true", help="reference-stats also writes fid_clean statistics")
    parser.add_argument("--vae-steps", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--sample-steps", type=int, default=4, help="sampler steps (the sample count is the default's)")
    parser.add_argument("--evaluator-steps", type=int, default=20)
    parser.add_argument("--workdir", default=None, help="keep the generated data here (default: a temporary dir)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory_scaling.json"))
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    load_before, start = os.getloadavg(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.workdir or tmp)
        sizes = [args.images, args.factor * args.images]
        rows = [measure(base / f"n{n}", n, args) for n in sizes]
    stages = list(rows[0]["stages"])
    result = {
        "benchmark": "memory_scaling", "goal_ratio": GOAL, "images": [r["images"] for r in rows],
        "decoded_images_mib": [r["decoded_mib"] for r in rows], "resolution": 64, "run": RUN,
        "inception": args.inception, "evaluator_steps": args.evaluator_steps, "reduced_work": reduced_work(args),
        "stages": {s: {"peak_rss_mib": [r["stages"][s]["peak"] for r in rows],
                       "ratio": round(rows[1]["stages"][s]["peak"] / rows[0]["stages"][s]["peak"], 3),
                       "seconds": [r["stages"][s]["seconds"] for r in rows]} for s in stages},
        "runtime_s": round(time.perf_counter() - start),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    out = Path(args.out)
    if out.is_file():
        old = json.loads(out.read_text())
        result.update({k: old[k] for k in KEPT if k in old})
    out.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{'stage':32s} {'N':>10s} {'4N':>10s} {'ratio':>7s}")
    for s in stages:
        a, b = result["stages"][s]["peak_rss_mib"]
        flag = "" if s.startswith("load_prepared") else ("  ok" if b / a <= GOAL else "  over the goal")
        print(f"{s:32s} {a:9.1f}M {b:9.1f}M {b / a:7.3f}{flag}")
    print(f"runtime {result['runtime_s']} s")


if __name__ == "__main__":
    main()
