"""Benchmark for a GPU machine, one prepared script: what every stage of the paper-scale study costs per device.

Measured, each in this one process:
- training steps of DiT-XL/2 and improved-XL/2 at 256 px (SD-VAE latents 32x32, published conditioning), bf16
  autocast: images/s, MFU (the project's FLOP counter, `ldm.models.inventory`: 3 x forward FLOPs per image over
  the device's peak), peak memory; with and without `torch.compile`, gradient checkpointing off and on;
- whether the flash SDPA kernel is active (one step with only FLASH_ATTENTION allowed: it raises when flash
  cannot serve the model's attention);
- sampling images/s at 256 and 512 px (DiT-XL/2, guided: 2 passes per step), reported per 50-step image;
- Inception features images/s (clean-fid's "clean" protocol, as `ldm evaluate` runs it);
- `AutoencoderKL` encode images/s in the SD-VAE configuration (random weights: the cost, not the quality).
On CPU (and with `--tiny`, tiny models at 64 px, a few steps, so that a test runs it in a minute) it also times
the `small` study's training step and reports its FLOP rate as a fraction of this machine's own fp32 matmul peak
measured in the same run (same threads, same dtype): the CPU's MFU, the anchor the GPU numbers are read against.

Prints a table; writes JSON (default benchmarks/results/gpu.json on a GPU, gpu-cpu.json on CPU) with the device.

    python benchmarks/gpu.py --out $OUT/gpu.json          # on the GPU machine (the device tool's $OUT)
    python benchmarks/gpu.py --device cpu --tiny          # anywhere, in about a minute
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ldm.control import CONTROL_WIDTH  # noqa: E402
from ldm.diffusion import build_objective  # noqa: E402
from ldm.models import architecture, build_model  # noqa: E402
from ldm.models.inventory import count_forward_flops  # noqa: E402

#: dense bf16 peak TFLOP/s by device name (vendor data sheets, SXM parts); --peak-tflops for any other device
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").is_file() else \
        platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Seconds per call of `fn` (median of `repeats`, after `warmup` calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def conditioning(model, arch: str, batch: int, device: torch.device) -> dict:
    """The published conditioning of `arch` as random inputs: class labels or caption states, plus control."""
    text_tokens = int(dict(architecture(arch).published_conditioning).get("text_tokens", 0))
    if model.text_dim:
        kwargs = {"text": torch.randn(batch, text_tokens, model.text_dim, device=device)}
    else:
        kwargs = {"class_labels": torch.randint(0, 1000, (batch,), device=device)}
    if model.takes_control:
        kwargs["control"] = torch.rand(batch, CONTROL_WIDTH, device=device)
    return kwargs


def published_model(arch: str, size: str, latent: int, device: torch.device, **options):
    spec = dict(architecture(arch).published_conditioning)
    text_tokens = int(spec.pop("text_tokens", 0))
    with torch.device("meta"):
        meta = build_model(arch, size, latent_size=latent, in_channels=4, num_classes=1000, **spec, **options)
    flops = count_forward_flops(meta.eval(), (4, latent, latent), text_tokens)
    torch.manual_seed(0)
    return build_model(arch, size, latent_size=latent, in_channels=4, num_classes=1000, **spec, **options).to(device), flops


def published_objective(model):
    """DDPM for a learned-sigma model (DiT as published: its VLB term trains the sigma head), else flow."""
    return build_objective("ddpm") if model.learns_sigma else build_objective("rectified_flow")


def training_step(model, objective, batch: int, latent: int, kwargs: dict, device: torch.device, bf16: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    x0 = torch.randn(batch, 4, latent, latent, device=device)
    gen = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = objective.loss(model, x0, kwargs, gen).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def bench_training(args, device, rows: list) -> None:
    bf16 = device.type == "cuda"
    for arch in ("dit", "improved"):
        for checkpointing in (False, True):
            for compiled in ((False, True) if args.compile and not checkpointing else (False,)):
                model, fwd = published_model(arch, args.size, args.latent, device, gradient_checkpointing=checkpointing)
                model.train()
                runnable = torch.compile(model) if compiled else model
                kwargs = conditioning(model, arch, args.batch, device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = timed(training_step(runnable, published_objective(model), args.batch, args.latent, kwargs, device, bf16),
                                device, args.warmup, args.repeats)
                achieved = 3 * fwd * args.batch / seconds
                rows.append({"what": f"train {arch}-{args.size} {args.image}px", "compile": compiled,
                             "checkpointing": checkpointing, "dtype": "bf16" if bf16 else "fp32",
                             "batch": args.batch, "images_per_s": args.batch / seconds, "tflops": achieved / 1e12,
                             "mfu": achieved / (args.peak * 1e12) if args.peak else None,
                             "peak_memory_gib": peak_memory_gib(device)})
                del model, runnable


def flash_active(args, device) -> dict:
    """One training step with only the flash kernel allowed (raises when flash cannot serve the model)."""
    if device.type != "cuda":
        return {"active": None, "why": "flash attention is a CUDA kernel"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out = {}
    for arch in ("dit", "improved"):
        model, _ = published_model(arch, args.size, args.latent, device)
        step = training_step(model.train(), published_objective(model), args.batch, args.latent,
                             conditioning(model, arch, args.batch, device), device, True)
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                step()
            out[arch] = {"active": True}
        except RuntimeError as exc:
            out[arch] = {"active": False, "why": str(exc).splitlines()[0][:200]}
        del model
    return out


def bench_sampling(args, device, rows: list) -> None:
    from ldm.sampling import sample_latents

    for image in args.sample_sizes:
        latent = image // 8
        model, fwd = published_model("dit", args.size, latent, device)
        model.eval()
        labels, objective = torch.arange(args.batch) % 1000, published_objective(model)

        def draw():  # as `ldm sample` runs it: fp32 (no autocast), forward groups of 16
            sample_latents(model, objective, labels, None, latent_shape=(4, latent, latent),
                           steps=args.sample_steps, guidance_semantic=1.5, seeds=list(range(args.batch)),
                           batch_size=args.batch, sampler="ddim")
        seconds = timed(draw, device, 1, args.repeats) * 50 / args.sample_steps  # per 50-step image batch
        rows.append({"what": f"sample dit-{args.size} {image}px (fp32, guided, per 50-step image)", "batch": args.batch,
                     "images_per_s": args.batch / seconds,
                     "mfu": 2 * fwd * 50 * args.batch / seconds / (args.peak * 1e12) if args.peak else None})
        del model


def bench_inception(args, device, rows: list) -> None:
    from ldm.metrics.inception import inception_features

    images = np.random.default_rng(0).integers(0, 256, (args.eval_images, args.image, args.image, 3), dtype=np.uint8)
    seconds = timed(lambda: inception_features(images, "clean", device=device), device, 1, args.repeats)
    rows.append({"what": f"inception features (clean) {args.image}px", "batch": args.eval_images,
                 "images_per_s": args.eval_images / seconds})


def bench_vae(args, device, rows: list) -> None:
    from diffusers import AutoencoderKL

    widths = (128, 256, 512, 512) if not args.tiny else (32, 32, 64, 64)  # SD-VAE's widths; tiny: same depth
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=widths,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=2, norm_num_groups=32, sample_size=args.image).to(device).eval()
    x = torch.rand(args.eval_images, 3, args.image, args.image, device=device) * 2 - 1

    def encode():
        with torch.no_grad():
            vae.encode(x).latent_dist.mean
    seconds = timed(encode, device, 1, args.repeats)
    rows.append({"what": f"vae encode (SD-VAE config{', tiny widths' if args.tiny else ''}) {args.image}px",
                 "batch": args.eval_images, "images_per_s": args.eval_images / seconds})


def cpu_matmul_peak(repeats: int = 5, n: int = 1024) -> float:
    """This machine's fp32 matmul FLOP/s with the current threads (the best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b), torch.device("cpu"), 0, 1) for _ in range(repeats))
    return 2 * n ** 3 / best


def small_training_step(rows: list, repeats: int) -> dict:
    """The `small` study's DiT training step (tiny DiT, 64 px, factor-4 latents 16x16, batch 32, fp32) as a
    fraction of the measured matmul peak."""
    from ldm.config import load_config
    from ldm.recipe import build_run_model, build_run_objective
    from ldm.spec import Scenario

    scenario = Scenario(load_config(REPO / "config" / "small.yaml"))
    run = scenario.run("dit.synthetic.transfer.64.s0")
    batch, latent = scenario.config["training"]["batch_size"], run.resolution // 4
    with torch.device("meta"):
        flops = count_forward_flops(build_run_model(scenario, run, (4, latent, latent), 4).eval(), (4, latent, latent))
    torch.manual_seed(0)
    model = build_run_model(scenario, run, (4, latent, latent), 4).train()
    kwargs = {"class_labels": torch.randint(0, 4, (batch,)), "control": torch.rand(batch, CONTROL_WIDTH)}
    cpu = torch.device("cpu")
    seconds = timed(training_step(model, build_run_objective(scenario, run), batch, latent, kwargs, cpu, False),
                    cpu, 2, repeats)
    peak = cpu_matmul_peak()
    achieved = 3 * flops * batch / seconds
    rows.append({"what": "train small-study dit-tiny 64px (cpu)", "batch": batch, "images_per_s": batch / seconds,
                 "tflops": achieved / 1e12, "mfu": achieved / peak})
    return {"matmul_peak_gflops": peak / 1e9, "step_gflops": achieved / 1e9, "fraction_of_peak": achieved / peak}


def table(rows: list) -> str:
    head = f"{'what':58s} {'compile':>7s} {'ckpt':>5s} {'batch':>5s} {'img/s':>9s} {'TFLOP/s':>8s} {'MFU':>6s} {'mem GiB':>7s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
        yes = lambda v: "" if v is None else ("yes" if v else "no")  # noqa: E731
        lines.append(f"{r['what']:58s} {yes(r.get('compile')):>7s} {yes(r.get('checkpointing')):>5s} "
                     f"{r['batch']:>5d} {r['images_per_s']:>9.2f} {fmt(r.get('tflops'), '>8.3f')} "
                     f"{fmt(r.get('mfu'), '>6.1%')} {fmt(r.get('peak_memory_gib'), '>7.1f')}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models at 64 px, few steps (CPU, tests)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak (default: "
                        "by name, " + ", ".join(PEAK_TFLOPS) + "; CPU: the measured fp32 matmul peak)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: on for CUDA")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    args.size, args.image, args.batch = ("tiny", 64, 4) if args.tiny else ("XL/2", 256, 32)
    args.latent = args.image // 8
    args.sample_sizes = [64] if args.tiny else [256, 512]
    args.sample_steps, args.eval_images = (2, 8) if args.tiny else (10, 64)
    args.warmup, args.repeats = (1, 2) if args.tiny else (3, 10)
    name = device_name(device)
    args.peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    result: dict = {"device": name, "torch": torch.__version__, "tiny": args.tiny, "compile": args.compile}
    rows: list = []
    if device.type == "cpu":
        result["cpu"] = small_training_step(rows, args.repeats)
        args.peak = args.peak or result["cpu"]["matmul_peak_gflops"] / 1e3  # MFU against the measured fp32 peak
    result["peak_tflops"], result["rows"], result["failed"] = args.peak, rows, {}
    out = Path(args.out or REPO / "benchmarks" / "results" / ("gpu.json" if device.type == "cuda" else "gpu-cpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    sections = [("training", lambda: bench_training(args, device, rows)),
                ("flash_sdpa", lambda: result.__setitem__("flash_sdpa", flash_active(args, device))),
                ("sampling", lambda: bench_sampling(args, device, rows)),
                ("inception", lambda: bench_inception(args, device, rows)), ("vae", lambda: bench_vae(args, device, rows))]
    for section, measure in sections:
        # one run on a lent GPU: a section that fails (a compiler missing, out of memory) is recorded with its
        # error and the others still run; the JSON is rewritten after every section, so a kill keeps the rest
        try:
            measure()
        except Exception as exc:  # noqa: BLE001 - recorded, not swallowed: the JSON and the table say it failed
            result["failed"][section] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            print(f"{section} failed: {result['failed'][section]}", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"device: {name}; peak {args.peak} TFLOP/s; flash SDPA: {result.get('flash_sdpa')}; failed: {result['failed']}")
    print(table(rows))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
