"""Benchmark: `ldm encode`'s batched VAE path against a per-image loop over the same VAE, in images/s.

Both sides start from the same prepared rows (PNG bytes, already read from parquet) of the embedded
default's 64 px data and do the same work per image: decode the PNG, and take the VAE posterior (mean,
std) of the crop and of its horizontal mirror. The batched side is `ldm.stages.encode._encode_shard`, the code
`ldm encode` runs per shard (crop and mirror of `--batch-size` images in one forward); the loop side calls
`vae.encode` once per image and once per mirror. Text encoding is left out of both (`--text-encoder none`).
Repeats alternate the two sides so that machine load hits both alike; medians are reported, and the
outputs are checked to agree. Model loading, parquet reading and shard writing are outside the timing.

    python benchmarks/encode.py [--images 128] [--batch-size 64] [--repeats 3] [--json]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.train_overhead import cpu_model  # noqa: E402
from ldm.autoencoder import load_vae  # noqa: E402
from ldm.config import load_config  # noqa: E402
from ldm.data.prepared import PreparedRows  # noqa: E402
from ldm.stages.encode import _encode_shard  # noqa: E402


@torch.no_grad()
def per_image(rows: dict, vae, resolution: int) -> dict[str, torch.Tensor]:
    """The naive script: one image at a time, crop and mirror in separate forwards."""
    from PIL import Image

    out: dict[str, list[torch.Tensor]] = {"mean": [], "std": [], "mean_flip": [], "std_flip": []}
    for blob in rows["image"]:
        im = np.array(Image.open(io.BytesIO(blob)).convert("RGB"))
        assert im.shape[:2] == (resolution, resolution)
        x = torch.from_numpy(im).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        for suffix, xi in (("", x), ("_flip", x.flip(-1))):
            post = vae.encode(xi).latent_dist
            out["mean" + suffix].append(post.mean)
            out["std" + suffix].append(post.std)
    return {k: torch.cat(v).half() for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="as `ldm encode --batch-size` (its default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/encode.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(REPO / "config" / "default.yaml")
    resolution = config["resolutions"]["high"]
    prepared = Path(config["workdir"]) / "prepared" / config["dataset"]["name"] / f"r{resolution}"
    vae_dir = Path(config["workdir"]) / "vae"
    if not (prepared / "report.json").exists() or not (vae_dir / "config.json").exists():
        sys.exit("no prepared data or VAE: run `snakemake --cores 2` (the embedded default) first")
    source = PreparedRows(prepared, json.loads((prepared / "report.json").read_text()))
    n = min(args.images, len(source))
    rows = source.rows(0, n)
    vae = load_vae(str(vae_dir))
    device = torch.device("cpu")

    # Warm-up (allocator, first-call dispatch) on a few images, outside the timing.
    few = {k: v[:4] for k, v in rows.items()}
    _encode_shard(few, vae, None, resolution, args.batch_size, device)
    per_image(few, vae, resolution)

    batched_s, loop_s = [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        got = _encode_shard(rows, vae, None, resolution, args.batch_size, device)
        batched_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        want = per_image(rows, vae, resolution)
        loop_s.append(time.perf_counter() - t)
    max_diff = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    med_b, med_l = statistics.median(batched_s), statistics.median(loop_s)
    rate_b, rate_l = n / med_b, n / med_l
    print(f"{'path':<40}{'median s':>10}{'images/s':>10}   repeats (s)")
    print(f"{f'ldm encode batched (batch {args.batch_size})':<40}{med_b:>10.2f}{rate_b:>10.1f}   "
          + ", ".join(f"{t:.2f}" for t in batched_s))
    print(f"{'per-image loop':<40}{med_l:>10.2f}{rate_l:>10.1f}   " + ", ".join(f"{t:.2f}" for t in loop_s))
    print(f"{n} images of {resolution} px (+ mirrors), VAE {vae_dir}, {args.threads} thread(s); "
          f"max |batched - loop| = {max_diff:.2e}")
    ratio = rate_b / rate_l
    if args.json:
        (REPO / "benchmarks" / "results" / "encode.json").write_text(json.dumps({
            "benchmark": "encode", "images": n, "resolution": resolution, "batch_size": args.batch_size,
            "repeats": args.repeats, "threads": args.threads, "batched_s": batched_s, "per_image_s": loop_s,
            "batched_images_per_s": rate_b, "per_image_images_per_s": rate_l, "ratio": ratio,
            "max_abs_diff": max_diff, "vae_block_out_channels": list(vae.config.block_out_channels),
            "device": str(device), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0], "torch": torch.__version__,
            "python": platform.python_version()}, indent=2) + "\n")
    print(f"batched / per-image throughput: {ratio:.2f}x")


if __name__ == "__main__":
    main()
