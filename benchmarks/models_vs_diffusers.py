"""Benchmark: training-step throughput of our DiT, PixArt-α and MM-DiT against diffusers' class of the same shape.

One training step = forward, MSE loss, backward, AdamW step, on CPU with one thread (the CI machine's budget).
Ours and theirs are built in this process with the same widths/depths/heads and input shapes (DiT
class-conditional; PixArt and MM-DiT text-conditional with 32 caption tokens of 384-d, MiniLM's width), timed
one step at a time, alternating sides (and which side goes first) so that load on a shared machine hits both
alike; the median step counts (repeats x steps-per-repeat steps each). The ratio column is ours/theirs in
steps per second (>= 1: ours is at least as fast), followed by its 95% bootstrap interval (both sides' steps
resampled 2000 times): an interval that contains 1 means the two are at parity within what this run can resolve.

    python benchmarks/models_vs_diffusers.py [--sizes tiny small] [--repeats 5] [--json]
"""
from __future__ import annotations

import argparse
import json
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
from ldm.models import ARCHITECTURES, build_model  # noqa: E402

LATENT, CHANNELS, CLASSES, BATCH, TEXT_LEN, TEXT_DIM = 16, 4, 10, 8, 32, 384
STEPS = {"tiny": 10, "small": 3}


def diffusers_model(arch: str, size: str) -> torch.nn.Module:
    """diffusers' reference class at our preset's shape (no sigma head, as the project's recipes)."""
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    p = ARCHITECTURES[arch][1][size]
    heads, head_dim, depth = p["num_heads"], p["hidden_size"] // p["num_heads"], p["depth"]
    if arch == "dit":
        return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=CHANNELS,
                                     out_channels=CHANNELS, num_layers=depth, sample_size=LATENT,
                                     patch_size=p["patch_size"], num_embeds_ada_norm=CLASSES, norm_eps=1e-6)
    if arch == "pixart":
        return PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=CHANNELS,
                                        out_channels=CHANNELS, num_layers=depth, cross_attention_dim=p["hidden_size"],
                                        sample_size=LATENT, patch_size=p["patch_size"], caption_channels=TEXT_DIM)
    return SD3Transformer2DModel(sample_size=LATENT, patch_size=p["patch_size"], in_channels=CHANNELS,
                                 out_channels=CHANNELS, num_layers=depth, attention_head_dim=head_dim,
                                 num_attention_heads=heads, joint_attention_dim=TEXT_DIM,
                                 caption_projection_dim=p["hidden_size"], pooled_projection_dim=TEXT_DIM,
                                 pos_embed_max_size=LATENT // p["patch_size"])


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Small seeded weights everywhere, so zero-initialised layers do not make either side artificially cheap."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.train()


def step_fn(arch: str, size: str, ours: bool):
    """One training step closure for `arch` at `size`, ours or diffusers'."""
    torch.manual_seed(0)
    text_dim = None if arch == "dit" else TEXT_DIM
    if ours:
        model = build_model(arch, size, latent_size=LATENT, in_channels=CHANNELS, num_classes=CLASSES,
                            learn_sigma=False, **({"text_dim": text_dim} if text_dim else {}))
    else:
        model = diffusers_model(arch, size)
    model = randomize(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, CHANNELS, LATENT, LATENT, generator=g)
    target = torch.randn_like(x)
    t = torch.rand(BATCH, generator=g) * 999
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    text = torch.randn(BATCH, TEXT_LEN, TEXT_DIM, generator=g)

    def forward() -> torch.Tensor:
        if ours:
            return model(x, t, y) if arch == "dit" else model(x, t, text=text)
        if arch == "dit":
            return model(x, timestep=t, class_labels=y).sample
        if arch == "pixart":
            return model(x, encoder_hidden_states=text, timestep=t).sample
        return model(x, encoder_hidden_states=text, pooled_projections=text.mean(1), timestep=t).sample

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        loss = (forward() - target).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in model.parameters())


def seconds(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - start


def ratio_interval(ours: list[float], theirs: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of median(theirs) / median(ours) (the speed ratio ours/theirs)."""
    rng = np.random.default_rng(seed)
    o, t = np.asarray(ours), np.asarray(theirs)
    ratios = (np.median(rng.choice(t, (resamples, len(t))), axis=1)
              / np.median(rng.choice(o, (resamples, len(o))), axis=1))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(STEPS))
    parser.add_argument("--archs", nargs="+", default=["dit", "pixart", "mmdit"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="write benchmarks/results/models_vs_diffusers.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'model':<14}{'params':>12}{'ours steps/s':>14}{'theirs steps/s':>16}{'ours/theirs':>13}{'95% interval':>17}")
    for size in args.sizes:
        for arch in args.archs:
            n = STEPS[size]
            (ours, p_ours), (theirs, p_theirs) = step_fn(arch, size, True), step_fn(arch, size, False)
            ours(), theirs()  # warm-up (allocator, lazy init)
            t_ours, t_theirs = [], []
            for i in range(args.repeats * n):  # single steps, alternating which side goes first
                for side in ((ours, t_ours), (theirs, t_theirs))[:: 1 if i % 2 == 0 else -1]:
                    side[1].append(seconds(side[0], 1))
            med_o, med_t = n * statistics.median(t_ours), n * statistics.median(t_theirs)
            ratio, (low, high) = med_t / med_o, ratio_interval(t_ours, t_theirs)
            rows.append({"arch": arch, "size": size, "steps_timed": args.repeats * n, "params_ours": p_ours,
                         "params_theirs": p_theirs, "ours_step_s": t_ours, "theirs_step_s": t_theirs,
                         "ours_steps_per_s": n / med_o, "theirs_steps_per_s": n / med_t, "ratio": ratio,
                         "ratio_95": [low, high]})
            print(f"{arch + ' ' + size:<14}{p_ours:>12,}{n / med_o:>14.2f}{n / med_t:>16.2f}{ratio:>13.3f}"
                  f"{f'[{low:.3f}, {high:.3f}]':>17}")
    if args.json:
        out = REPO / "benchmarks" / "results" / "models_vs_diffusers.json"
        out.write_text(json.dumps({
            "benchmark": "models_vs_diffusers", "batch": BATCH, "latent": [CHANNELS, LATENT, LATENT],
            "text": [TEXT_LEN, TEXT_DIM], "repeats": args.repeats, "threads": args.threads, "rows": rows,
            "cpu": cpu_model(), "cpus_online": len(__import__("os").sched_getaffinity(0)),
            "torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
            "python": platform.python_version(),
        }, indent=2) + "\n")
    print("min ours/theirs: " + f"{min(r['ratio'] for r in rows):.3f}")


if __name__ == "__main__":
    main()
