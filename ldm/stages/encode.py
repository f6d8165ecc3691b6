"""`ldm encode`: prepared images -> latent cache (VAE posteriors of each crop and its mirror, caption states).

The cache's format and why it holds posterior moments rather than latents: `ldm.data.latent_cache` (its
reader) and docs/formats.md.

Resumability: output shard k always holds prepared rows [k*shard_size, (k+1)*shard_size) and is
encoded in fixed batches within that shard, so re-encoding one shard reproduces its bytes exactly.
Each shard is written atomically and recorded (with its sha256) in `.manifest.partial.R.json` (R the
rank; 0 for a single process); a rerun with the same inputs/parameters keeps every shard whose file
still matches its recorded checksum and re-encodes the others. Ranks (`rank`, `world_size`) split the
shards k % world_size. `manifest.json` is written last, once every shard exists, so its presence means
the cache is complete.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ldm.autoencoder import downsample_factor, load_vae, vae_identity
from ldm.control import CONTROL_FIELDS
from ldm.data.latent_cache import FORMAT, MANIFEST, MOMENTS, shard_name
from ldm.data.prepared import PreparedRows
from ldm.data.split import heldout_mask
from ldm.layout import PREPARED_REPORT
from ldm.provenance import atomic_write_json, file_sha256

log = logging.getLogger(__name__)

def _decode_images(blobs: list[bytes], resolution: int) -> torch.Tensor:
    """PNG bytes -> float32 B x 3 x R x R in [-1, 1]."""
    from PIL import Image

    arr = []
    for b in blobs:
        im = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
        if im.shape[:2] != (resolution, resolution):
            raise ValueError(f"prepared image is {im.shape[1]}x{im.shape[0]}, report says {resolution}")
        arr.append(im)
    x = torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


@torch.no_grad()
def _encode_shard(rows: dict, vae, te, resolution: int, batch_size: int, device,
                  heldout: tuple[float, int] = (0.0, 0)) -> dict[str, torch.Tensor]:
    """The cache tensors of a range of prepared rows; `heldout` (fraction, seed) adds the held-out flag per
    row (`ldm.data.split`; absent at fraction 0, which leaves the shard as it was before the split existed)."""
    parts: dict[str, list[torch.Tensor]] = {}
    n = len(rows["label"])
    for a in range(0, n, batch_size):
        b = min(n, a + batch_size)
        x = _decode_images(rows["image"][a:b], resolution).to(device)
        post = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
        mean, std = post.mean.float().cpu(), post.std.float().cpu()
        k = b - a
        got = {"mean": mean[:k], "std": std[:k], "mean_flip": mean[k:], "std_flip": std[k:]}
        if te is not None:
            got["text_emb"], got["text_len"] = te.encode([c or "" for c in rows["caption"][a:b]])
        for name, t in got.items():
            parts.setdefault(name, []).append(t)
    out = {name: torch.cat(parts[name]).half().contiguous() for name in (*MOMENTS, *(("text_emb",) if te else ()))}
    if te is not None:
        out["text_len"] = torch.cat(parts["text_len"]).to(torch.int64)
    out["label"] = torch.tensor(rows["label"], dtype=torch.int64)
    if heldout[0] > 0:
        out["heldout"] = torch.from_numpy(heldout_mask(rows["key"], *heldout).astype(np.uint8))
    out["control"] = torch.tensor([[rows[c][i] for c in CONTROL_FIELDS] for i in range(n)],
                                  dtype=torch.float32).reshape(n, len(CONTROL_FIELDS))
    return out


def _partial_name(rank: int) -> str:
    return f".manifest.partial.{rank}.json"


def _read_records(out: Path, params: dict, names: list[str]) -> dict[str, dict]:
    """Shard records ({file: {file, rows, sha256}}) of earlier/other runs with the same parameters."""
    records: dict[str, dict] = {}
    for name in names:
        p = out / name
        try:
            rec = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):  # absent, or removed by a rank that just finished
            continue
        if rec.get("format") == FORMAT and rec.get("params") == params:
            records.update({s["file"]: s for s in rec.get("shards", [])})
    return records


def _partials(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".manifest.partial*.json"))


def encode_latents(
    prepared: Path,
    vae: str,
    out: Path,
    text_encoder: str | None = "minilm",
    batch_size: int = 64,
    shard_size: int = 1000,
    max_text_length: int = 32,
    device: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    heldout: float = 0.0,
    split_seed: int = 0,
) -> dict:
    """Encode a prepared directory into a latent cache at `out`.

    With `world_size` W > 1 this process (rank R) encodes only shards k with k % W == R and records them
    in its own `.manifest.partial.R.json`, so ranks never write the same file; ranks may run at the same
    time (torchrun) or one after another. Each rank, once done, collects every rank's records, and if
    every shard is there writes `manifest.json` (the last rank to finish does; more than one writing
    it is harmless, the content is the same). Its own shards are checked by sha256 before reuse; other
    ranks' shards by their records and presence.

    Returns the manifest plus a `run` entry (not written to disk) listing the shards encoded and reused
    by this call, and which of the encoded ones replaced a file that failed its checksum (`corrupt`), and
    `complete` (whether the manifest now exists); an incomplete call returns only
    count, num_shards, complete, missing and run.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ldm.text import load_text_encoder

    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    prepared, out = Path(prepared), Path(out)
    report_path = prepared / PREPARED_REPORT
    if not report_path.is_file():
        raise FileNotFoundError(f"not a prepared directory (no report.json): {prepared}")
    report_bytes = report_path.read_bytes()
    report = json.loads(report_bytes)
    resolution = int(report["resolution"])
    source = PreparedRows(prepared, report)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    identity = vae_identity(vae)
    model = load_vae(vae).to(device)
    te = load_text_encoder(text_encoder, max_text_length, device=device)
    f = downsample_factor(model)
    latent_shape = [int(model.config.latent_channels), resolution // f, resolution // f]
    params = {
        "prepared_report_sha256": hashlib.sha256(report_bytes).hexdigest(),
        "vae": identity,
        "text_encoder": None if te is None else {"name": te.name, "dim": te.dim, "max_length": max_text_length},
        "shard_size": int(shard_size),
        "batch_size": int(batch_size),
    }
    if heldout > 0:  # only then: caches encoded before the split existed keep their records
        params["heldout"] = {"fraction": float(heldout), "seed": int(split_seed)}

    out.mkdir(parents=True, exist_ok=True)
    previous = _read_records(out, params, [MANIFEST, *_partials(out)])
    n = len(source)
    n_shards = max(1, math.ceil(n / shard_size)) if n else 0
    expected = {shard_name(k) for k in range(n_shards)}
    mine = [k for k in range(n_shards) if k % world_size == rank]
    for stale in out.glob("shard-*.safetensors"):
        if stale.name not in expected:  # from a run with another shard count
            stale.unlink()
    own = {shard_name(k) for k in mine}
    for tmp in out.glob("shard-*.safetensors.tmp"):  # writes cut short by a crash; other ranks' may be in flight
        if tmp.name[:-len(".tmp")] not in expected or tmp.name[:-len(".tmp")] in own:
            tmp.unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the cache is "in progress"

    shards, encoded, reused, corrupt = [], [], [], []
    for k in tqdm(mine, desc=f"encode {out.name}" + (f" rank {rank}/{world_size}" if world_size > 1 else ""),
                  unit="shard", disable=None):
        a, b = k * shard_size, min(n, (k + 1) * shard_size)
        name = shard_name(k)
        path = out / name
        rec = previous.get(name)
        if rec and rec.get("rows") == b - a and path.is_file():
            if file_sha256(path) == rec["sha256"]:
                shards.append({"file": name, "rows": b - a, "sha256": rec["sha256"]})
                reused.append(name)
                continue
            log.warning("%s: sha256 differs from its record (corrupt or modified); re-encoding it", path)
            corrupt.append(name)
        tensors = _encode_shard(source.rows(a, b), model, te, resolution, batch_size, device,
                                (float(heldout), int(split_seed)))
        tmp = path.with_name(name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        os.replace(tmp, path)
        shards.append({"file": name, "rows": b - a, "sha256": file_sha256(path)})
        encoded.append(name)
        atomic_write_json(out / _partial_name(rank), {"format": FORMAT, "params": params, "shards": shards})
        log.info("encoded %s (%d rows)", name, b - a)
    # Reused shards are recorded too: their old record may have lived only in the manifest just removed.
    atomic_write_json(out / _partial_name(rank), {"format": FORMAT, "params": params, "shards": shards})
    run = {"encoded": encoded, "reused": reused, "corrupt": corrupt}

    records = {**previous, **_read_records(out, params, _partials(out)), **{s["file"]: s for s in shards}}
    missing = []
    for k in range(n_shards):
        rec = records.get(shard_name(k))
        if not (rec and rec.get("rows") == min(n, (k + 1) * shard_size) - k * shard_size
                and (out / rec["file"]).is_file()):
            missing.append(shard_name(k))
    if missing:
        log.info("rank %d/%d done; waiting for %d shards of other ranks", rank, world_size, len(missing))
        return {"count": n, "num_shards": n_shards, "complete": False, "missing": missing, "run": run}

    shift = model.config.get("shift_factor")
    manifest = {
        "format": FORMAT,
        "count": n,
        "num_shards": n_shards,
        "shards": [{k: records[shard_name(i)][k] for k in ("file", "rows", "sha256")} for i in range(n_shards)],
        "vae": identity,
        "scaling_factor": float(model.config.scaling_factor),
        "shift_factor": float(shift) if shift is not None else 0.0,
        "latent_shape": latent_shape,
        "resolution": resolution,
        "crop": report.get("crop"),
        "classes": list(report.get("classes", [])),
        "text_encoder": params["text_encoder"],
        "prepared": {"path": str(prepared), "report_sha256": params["prepared_report_sha256"]},
        "params": params,
    }
    if heldout > 0:
        manifest["heldout"] = {**params["heldout"], "rows": _count_heldout(out, manifest["shards"])}
    # A rank-private temp name: two ranks finishing together may both write the (identical) manifest.
    tmp = out / f".{MANIFEST}.{rank}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST)
    for name in _partials(out):
        (out / name).unlink(missing_ok=True)
    return {**manifest, "complete": True, "run": run}


def _count_heldout(out: Path, shards: list[dict]) -> int:
    from safetensors import safe_open

    total = 0
    for s in shards:
        with safe_open(str(out / s["file"]), "pt") as f:
            total += int(f.get_tensor("heldout").sum())
    return total


def _rank_world(args) -> tuple[int, int]:
    """--rank/--world-size, else torchrun's RANK/WORLD_SIZE, else a single process."""
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    return rank, world


def run(args) -> None:
    text = None if args.text_encoder in (None, "none", "null") else args.text_encoder
    rank, world = _rank_world(args)
    if not 0 <= rank < world:  # a launch mistake: one line and exit code 2, raised before any work is set up
        print(f"ldm encode: error: rank {rank} not in [0, world size {world})", file=sys.stderr)
        raise SystemExit(2)
    device = args.device
    if device is None and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local rank
        device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
    result = encode_latents(Path(args.prepared), args.vae, Path(args.out), text_encoder=text,
                            batch_size=args.batch_size, shard_size=args.shard_size, device=device,
                            rank=rank, world_size=world, heldout=args.heldout, split_seed=args.split_seed)
    done = result["run"]
    who = f"rank {rank}/{world}: " if world > 1 else ""
    print(f"{who}encoded {len(done['encoded'])} shards, reused {len(done['reused'])}")
    for name in done["corrupt"]:
        print(f"{Path(args.out) / name}: sha256 did not match its record (corrupt); re-encoded")
    if result["complete"]:
        print(f"encoded {result['count']} samples into {args.out}")
    else:
        print(f"{args.out}: {len(result['missing'])} of {result['num_shards']} shards still missing "
              "(other ranks); the last rank to finish writes manifest.json")
