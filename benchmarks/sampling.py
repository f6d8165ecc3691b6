"""Benchmark: sampling images/s of the default model, and where evaluation time goes.

The default's 64 px DiT (trained weights of `dit.synthetic.scratch.64` when the pipeline has run, else a
randomly initialised model of the same config: throughput does not depend on the weights) is sampled with
the default's sampler, steps, guidance and batch size. One evaluation of a seed is timed in its three
parts: denoising (`sample_latents`), VAE decoding, and evaluator feature extraction (features and
predicted classes, one pass); the share of each is printed. The cost of bit-exact batch invariance is
measured too: fixed forward groups of `FORWARD_BATCH` images against one model call per whole batch.
Repeats alternate between the variants so machine load hits them alike; medians are reported.

    python benchmarks/sampling.py [--samples 100] [--repeats 3] [--threads 1] [--json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.train_overhead import cpu_model  # noqa: E402
from ldm.checkpoint import load_final  # noqa: E402
from ldm.config import load_scenario  # noqa: E402
from ldm.models import build_model, model_from_config  # noqa: E402
from ldm.recipe import build_run_objective  # noqa: E402
from ldm.sampling import FORWARD_BATCH, sample_latents  # noqa: E402
from ldm.stages.sample import decode_to_uint8, image_seeds, sampling_conditions  # noqa: E402

RUN = "dit.synthetic.scratch.64"
LATENT = (4, 16, 16)  # the default's 64 px latents (tiny VAE, factor 4)
NUM_CLASSES = 4


def default_model(config: dict):
    final = REPO / config["workdir"] / "runs" / RUN / "final.safetensors"
    if final.exists():
        weights, model_config, _ = load_final(final)
        model = model_from_config(model_config)
        model.load_state_dict(weights)
        return model.eval(), "trained (" + str(final.relative_to(REPO)) + ")"
    recipe = config["recipes"]["dit"]
    torch.manual_seed(0)
    model = build_model(recipe["arch"], recipe["size"], latent_size=LATENT[1], in_channels=LATENT[0],
                        num_classes=NUM_CLASSES, learn_sigma=False, control_mode=recipe["control"])
    return model.eval(), "random init (no trained run in workdir)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="images per timed sampling (default's num_samples)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/sampling.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scenario = load_scenario(REPO / "config" / "default.yaml")
    config, run = scenario.config, scenario.run(RUN)
    scfg = config["sampling"]
    model, weights = default_model(config)
    objective = build_run_objective(scenario, run)
    sampler = scenario.sampler(run)
    labels, control = sampling_conditions(args.samples, NUM_CLASSES, scfg["original_size"])
    kw = dict(latent_shape=LATENT, steps=scfg["steps"], guidance_semantic=scfg["guidance"],
              guidance_control=scfg["guidance_control"], guidance_interval=scfg["guidance_interval"],
              seeds=image_seeds(0, args.samples), batch_size=scfg["batch_size"], sampler=sampler)

    vae_dir, evaluator_dir = REPO / config["workdir"] / "vae", REPO / config["workdir"] / "evaluator"
    vae = evaluator = None
    if (vae_dir / "config.json").exists():
        from ldm.autoencoder import load_vae

        vae = load_vae(str(vae_dir)).eval()
    if (evaluator_dir / "config.json").exists():
        from ldm.metrics.evaluator import load_evaluator

        evaluator = load_evaluator(evaluator_dir)

    times = {"denoise_fixed_groups": [], "denoise_whole_batch": [], "decode": [], "features": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        latents = sample_latents(model, objective, labels, control, micro_batch=FORWARD_BATCH, **kw)
        times["denoise_fixed_groups"].append(time.perf_counter() - start)
        start = time.perf_counter()
        sample_latents(model, objective, labels, control, micro_batch=scfg["batch_size"], **kw)
        times["denoise_whole_batch"].append(time.perf_counter() - start)
        if vae is not None:
            start = time.perf_counter()
            images = decode_to_uint8(vae, latents, 1.0, 0.0)  # the cache's scale factors do not change the cost
            times["decode"].append(time.perf_counter() - start)
            if evaluator is not None:
                start = time.perf_counter()
                evaluator.features_and_predictions(images.numpy())
                times["features"].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    print(f"model: {weights}; {sampler}, {scfg['steps']} steps, guidance {scfg['guidance']} "
          f"(2 passes), batch {scfg['batch_size']}, {args.samples} images, {args.threads} thread(s)")
    print(f"{'part':<22}{'median s':>10}{'images/s':>10}   repeats (s)")
    for name, value in med.items():
        print(f"{name:<22}{value:>10.2f}{args.samples / value:>10.1f}   " + ", ".join(f"{t:.2f}" for t in times[name]))
    shares = None
    if "features" in med:
        total = med["denoise_fixed_groups"] + med["decode"] + med["features"]
        shares = {k: med[key] / total for k, key in (("denoising", "denoise_fixed_groups"), ("decoding", "decode"),
                                                       ("feature_extraction", "features"))}
        print("evaluation time per seed: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items()))
    else:
        print("no VAE/evaluator in the workdir (run the pipeline): denoising only")
    cost = med["denoise_fixed_groups"] / med["denoise_whole_batch"]
    print(f"sampling images/s: {args.samples / med['denoise_fixed_groups']:.1f} "
          f"(fixed groups of {FORWARD_BATCH} / one call per batch wall time: {cost:.3f})")
    if args.json:
        out = REPO / "benchmarks" / "results" / "sampling.json"
        out.write_text(json.dumps({
            "benchmark": "sampling", "weights": weights, "sampler": sampler, "steps": scfg["steps"],
            "guidance": scfg["guidance"], "batch_size": scfg["batch_size"], "forward_batch": FORWARD_BATCH,
            "samples": args.samples, "repeats": args.repeats, "threads": args.threads, "seconds": times,
            "images_per_s": args.samples / med["denoise_fixed_groups"],
            "images_per_s_whole_batch": args.samples / med["denoise_whole_batch"],
            "fixed_group_cost_ratio": cost, "evaluation_time_shares": shares,
            "cpu": cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
