"""Autoencoder: load a pretrained diffusers `AutoencoderKL` (local path or hub id) or train the tiny default.

The embedded default has no pretrained VAE it could download, so it trains a tiny `AutoencoderKL` on the
prepared synthetic images. The result is an ordinary `save_pretrained` directory, so every later stage
loads a trained tiny VAE and a real SD VAE through the same `load_vae` code path.

Training details that matter for speed on one CPU thread (see `train_tiny_vae`):
- the model is fully convolutional (no mid-block attention), so it is trained on random crops of
  `train_crop` pixels and still encodes/decodes full 32/64 px images;
- downsampling factor 4 (three encoder blocks: 32 px -> 8x8 latents, 64 px -> 16x16);
- widths (16, 32, 32): on the synthetic shapes (1000 images each at 32 and 64 px, one thread) it
  reached the same held-out PSNR per step as (32, 64, 64) at about half the cost; 1500 steps of
  batch 8 at lr 1e-3 give ~28 dB, 300 steps ~20 dB. GroupNorm (every diffusers VAE block) makes the
  absolute colour of flat regions slow to learn: a plain conv autoencoder without it learns faster,
  but the project needs the diffusers class so that SD VAEs drop in.
- crops smaller than the 32 px images (16 px) train faster per step but generalise worse to full
  images (GroupNorm statistics differ between a crop and a whole image), hence 32.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ldm.errors import MissingWeightsError
from ldm.progress import progress
from ldm.provenance import atomic_replace_dir, file_sha256

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"


# --------------------------------------------------------------------------------------------- config
def tiny_vae_config(
    latent_channels: int = 4,
    block_out_channels: Sequence[int] = (16, 32, 32),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    mid_block_add_attention: bool = False,
) -> dict:
    """Config of a tiny `AutoencoderKL`. diffusers downsamples once per block except the last, so the
    factor is 2**(len(block_out_channels) - 1): three widths give the factor 4 the pipeline expects.
    No mid-block attention by default: it is the only non-convolutional layer, it would tie the
    model to the training crop size, and it costs CPU time for nothing on flat-colour shapes."""
    n = len(block_out_channels)
    if n < 1 or any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(f"block_out_channels {tuple(block_out_channels)} must be divisible by "
                         f"norm_num_groups={norm_num_groups}")
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": layers_per_block,
        "act_fn": "silu",
        "latent_channels": latent_channels,
        "norm_num_groups": norm_num_groups,
        "sample_size": 64,
        "scaling_factor": 1.0,
        "shift_factor": 0.0,
        "force_upcast": False,
        "mid_block_add_attention": mid_block_add_attention,
    }


def downsample_factor(vae) -> int:
    """Spatial downsampling of an AutoencoderKL (8 for SD VAEs, 4 for the tiny default)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


# ------------------------------------------------------------------------------------------- training
def _to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W in [-1, 1] (the range SD VAEs expect)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class _UnitRows:
    """Rows lo..hi of a uint8 image array or reader (`ldm.data.prepared.PreparedImages`) as float32 [-1, 1]
    N x 3 x H x W, converted only when indexed: training holds one batch, not the dataset (the values are
    those of converting everything first, so the weights do not change)."""

    def __init__(self, images, lo: int, hi: int):
        self.images, self.lo, self.hi = images, lo, hi
        self.shape = (hi - lo, 3, *images.shape[1:3])

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, key) -> torch.Tensor:
        rows = (np.arange(*key.indices(len(self))) if isinstance(key, slice) else np.asarray(key)) + self.lo
        return _to_unit(self.images[rows])


def _as_list(images) -> list:
    arrays = [images] if isinstance(images, np.ndarray) else list(images)
    for a in arrays:
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3 or len(a) == 0:
            raise ValueError(f"expected non-empty uint8 N x H x W x 3 arrays, got {a.dtype} {a.shape}")
    return arrays


def _atomic_save(vae, out: Path, extra: dict[str, dict]) -> None:
    """save_pretrained into a sibling temp dir, then rename: a reader never sees half a VAE."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    for name, obj in extra.items():
        (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    atomic_replace_dir(tmp, out)


@torch.no_grad()
def _psnr(vae, x: torch.Tensor, batch_size: int) -> list[float]:
    """Per-image PSNR (dB, images in [0, 1]) of decode(posterior mean)."""
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        rec = vae.decode(vae.encode(xb).latent_dist.mean).sample.clamp(-1, 1)
        mse = ((rec - xb) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        out += (-10 * torch.log10(mse)).tolist()
    return out


def train_tiny_vae(
    images,
    out: Path,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    kl_weight: float = 1e-6,
    config: dict | None = None,
    train_crop: int | None = 32,
    holdout: float = 0.05,
    max_stat_images: int = 1024,
) -> dict:
    """Train a tiny AutoencoderKL with MSE + kl_weight * KL and save it (atomically) to `out`.

    Why no LPIPS/GAN loss (as SD's VAE uses): LPIPS needs downloaded VGG weights (offline here), a
    discriminator doubles the CPU cost, and on flat-colour synthetic shapes MSE alone already gives
    sharp edges. The KL weight only keeps the latent scale bounded.

    `images`: one uint8 N x H x W x 3 array or a list of arrays or readers such as `PreparedImages` (e.g. 32 px
    and 64 px; only the batches drawn are decoded, so memory does not grow with N). The last `holdout`
    fraction of each array (at least one image when it has two) is held out for the returned PSNR.
    Steps cycle through the arrays; each batch is a random `train_crop` crop (the model is fully
    convolutional). Deterministic from `seed`: one generator drives initialisation, batches, crops and
    posterior noise, and the caller's global RNG state is restored afterwards.
    After training, `scaling_factor` = 1/std and `shift_factor` = mean of posterior samples over (up to
    `max_stat_images` of) the training images go into the config, so scaled latents have unit std.
    Returns psnr (held-out, dB), scaling_factor, shift_factor, final loss, counts and seconds.
    """
    from diffusers import AutoencoderKL

    t0 = time.perf_counter()
    arrays = _as_list(images)
    train, held = [], []
    for a in arrays:
        k = int(round(len(a) * holdout))
        k = min(max(k, 1 if len(a) >= 2 else 0), len(a) - 1)
        train.append(_UnitRows(a, 0, len(a) - k))
        if k:
            held.append(_UnitRows(a, len(a) - k, len(a)))
    cfg = dict(tiny_vae_config() if config is None else config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**cfg)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, min(50, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1)))))
    vae.train()
    loss_value = float("nan")
    for step in progress(range(steps), "train-vae", unit="step"):
        x = train[step % len(train)]
        idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=g)
        xb = x[idx]
        c = min(train_crop or xb.shape[-1], xb.shape[-2], xb.shape[-1])
        if c < xb.shape[-1] or c < xb.shape[-2]:
            top = int(torch.randint(xb.shape[-2] - c + 1, (1,), generator=g))
            left = int(torch.randint(xb.shape[-1] - c + 1, (1,), generator=g))
            xb = xb[:, :, top:top + c, left:left + c]
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        mse = torch.nn.functional.mse_loss(rec, xb)
        kl = post.kl().mean() / xb[0].numel()
        loss = mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
    vae.eval()

    # Latent statistics on the training images (posterior samples, fixed generator).
    with torch.no_grad():
        gs = torch.Generator().manual_seed(seed + 1)
        per = max(1, max_stat_images // len(train))
        s1 = s2 = n = 0.0
        for x in train:
            for i in range(0, min(len(x), per), batch_size * 4):
                z = vae.encode(x[i:min(i + batch_size * 4, per)]).latent_dist.sample(generator=gs).double()
                s1, s2, n = s1 + float(z.sum()), s2 + float((z * z).sum()), n + z.numel()
        mean = s1 / n
        std = math.sqrt(max(s2 / n - mean * mean, 1e-12))
        per_res = {int(x.shape[-1]): _psnr(vae, x, batch_size * 4) for x in (held or train)}
        psnr = [p for v in per_res.values() for p in v]
    vae.register_to_config(scaling_factor=float(1.0 / std), shift_factor=float(mean))
    result = {
        "psnr": float(np.mean(psnr)),
        "psnr_on": "heldout" if held else "train",
        "psnr_by_resolution": {str(r): float(np.mean(v)) for r, v in per_res.items()},
        "scaling_factor": float(1.0 / std),
        "shift_factor": float(mean),
        "final_loss": loss_value,
        "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "kl_weight": kl_weight,
        "train_images": int(sum(len(x) for x in train)), "heldout_images": int(sum(len(x) for x in held)),
    }
    _atomic_save(vae, Path(out), {"training.json": result})
    result["seconds"] = time.perf_counter() - t0
    return result


# -------------------------------------------------------------------------------------------- loading
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _looks_local(s: str) -> bool:
    return s.startswith(("/", ".", "~")) or s.count("/") != 1 or Path(s).exists()


def _local_vae_dir(d: Path) -> Path | None:
    """A diffusers VAE directory, or the `vae/` folder of a full pipeline directory."""
    for cand in (d, d / "vae"):
        cfg = cand / CONFIG_NAME
        if cfg.is_file():
            try:
                cls = json.loads(cfg.read_text()).get("_class_name")
            except (OSError, json.JSONDecodeError):
                continue
            if cls in (None, "AutoencoderKL"):
                return cand
    return None


def resolve_vae(path_or_id: str, subfolder: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """Local directory holding the VAE's config.json and safetensors weights.

    A local path is checked on disk (no hub call). A hub id ("org/name") is fetched through the hub
    cache, with `local_files_only` when HF_HUB_OFFLINE is set so that a missing model fails at once
    instead of retrying; `subfolder` defaults to "" for VAE repos (sd-vae-ft-mse/ema) and falls back to
    "vae" for full pipeline repos. Anything missing raises MissingWeightsError naming the path or id.
    """
    s = str(path_or_id)
    if _looks_local(s):
        d = Path(s).expanduser()
        found = _local_vae_dir(d / subfolder if subfolder else d)
        if found is None or not (found / WEIGHTS_NAME).is_file():
            what = "no AutoencoderKL config.json" if found is None else f"no {WEIGHTS_NAME}"
            raise MissingWeightsError(f"VAE not found at {d}: {what} (nor in vae/)")
        return found
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HFValidationError, LocalEntryNotFoundError

    kw = dict(local_files_only=_offline(), cache_dir=str(cache_dir) if cache_dir else None)
    last: Exception | None = None
    for sub in ([subfolder] if subfolder is not None else ["", "vae"]):
        try:
            cfg = Path(hf_hub_download(s, CONFIG_NAME, subfolder=sub or None, **kw))
            if json.loads(cfg.read_text()).get("_class_name") not in (None, "AutoencoderKL"):
                continue
            hf_hub_download(s, WEIGHTS_NAME, subfolder=sub or None, **kw)
            return cfg.parent
        except (EntryNotFoundError, LocalEntryNotFoundError) as e:
            last = e
        except (HFValidationError, OSError, ValueError) as e:  # bad id, no network, repo not found
            last = e
            break
    mode = "offline (HF_HUB_OFFLINE=1), not in the hub cache" if _offline() else type(last).__name__
    raise MissingWeightsError(f"VAE hub id {s!r} unavailable: {mode}")


def load_vae(path_or_id: str, subfolder: str | None = None, cache_dir: str | Path | None = None):
    """`AutoencoderKL.from_pretrained` of a local directory or a hub id (see `resolve_vae`), in eval mode."""
    from diffusers import AutoencoderKL

    d = resolve_vae(path_or_id, subfolder, cache_dir)
    vae = AutoencoderKL.from_pretrained(d, local_files_only=True)
    return vae.eval().requires_grad_(False)




def vae_identity(path_or_id: str, subfolder: str | None = None, cache_dir: str | Path | None = None) -> dict:
    """Identity of a VAE for cache manifests: sha256 of the canonical config JSON (sorted keys, no
    whitespace, without `_diffusers_version` so a library upgrade does not invalidate caches) and of the
    weights file. scaling/shift factors are part of the config, so re-measuring them changes the hash."""
    d = resolve_vae(path_or_id, subfolder, cache_dir)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg.pop("_diffusers_version", None)
    cfg.pop("_name_or_path", None)
    canon = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
    return {
        "source": str(path_or_id),
        "config_sha256": hashlib.sha256(canon.encode()).hexdigest(),
        "weights_sha256": file_sha256(d / WEIGHTS_NAME),
    }
