"""Latent cache: writer (`encode_latents`), reader (`LatentDataset`) and load-time sampling.

Format (docs/formats.md): `shard-NNNNN.safetensors` with the VAE posterior of each crop and of its
horizontal mirror (mean/std, fp16), label, control (orig/crop box), text token states (fp16) and
lengths, plus `manifest.json` (counts, per-shard sha256, VAE identity, scaling/shift factors, latent
shape, crop policy, text encoder, classes).

Why posterior moments and not latents: a sample z = mean + std * eps and the flip are drawn at training
time (`sample_latents`), so each epoch sees fresh VAE noise and both orientations, as when encoding
on the fly, at cache cost of 4 tensors instead of one.

Resumability: output shard k always holds prepared rows [k*shard_size, (k+1)*shard_size) and is
encoded in fixed batches within that shard, so re-encoding one shard reproduces its bytes exactly.
Each shard is written atomically and recorded (with its sha256) in `.manifest.partial.R.json` (R the
rank; 0 for a single process); a rerun with the same inputs/parameters keeps every shard whose file
still matches its recorded checksum and re-encodes the others. Ranks (`rank`, `world_size`) split the
shards k % world_size. `manifest.json` is written last, once every shard exists, so its presence means
the cache is complete.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch

from ldm.autoencoder import downsample_factor, load_vae, vae_identity
from ldm.provenance import atomic_write_json, file_sha256

log = logging.getLogger(__name__)

FORMAT = "ldm-latent-cache/1"
MANIFEST = "manifest.json"
CONTROL_COLUMNS = ("orig_h", "orig_w", "crop_top", "crop_left", "crop_h", "crop_w")
MOMENTS = ("mean", "std", "mean_flip", "std_flip")


class CorruptShardError(RuntimeError):
    """A cache shard is missing or its sha256 differs from the manifest."""


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


class _PreparedRows:
    """Row-range reader over the prepared parquet shards (one decoded file kept at a time)."""

    COLUMNS = ["image", "label", "caption", *CONTROL_COLUMNS]

    def __init__(self, prepared: Path, report: dict):
        import pyarrow.parquet as pq

        self.files, self.offsets = [], [0]
        for s in report["shards"]:
            f = prepared / s["file"]
            if not f.is_file():
                raise FileNotFoundError(f"prepared shard missing: {f}")
            n = pq.ParquetFile(f).metadata.num_rows
            if n != int(s.get("rows", n)):
                raise ValueError(f"prepared shard {f} has {n} rows, report.json says {s['rows']}")
            self.files.append(f)
            self.offsets.append(self.offsets[-1] + n)
        self._cached: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return self.offsets[-1]

    def _file(self, i: int) -> dict:
        if self._cached is None or self._cached[0] != i:
            import pyarrow.parquet as pq

            self._cached = (i, pq.read_table(self.files[i], columns=self.COLUMNS).to_pydict())
        return self._cached[1]

    def rows(self, a: int, b: int) -> dict[str, list]:
        out: dict[str, list] = {c: [] for c in self.COLUMNS}
        i = bisect.bisect_right(self.offsets, a) - 1
        while a < b:
            lo, hi = self.offsets[i], self.offsets[i + 1]
            take = min(b, hi)
            cols = self._file(i)
            for c in self.COLUMNS:
                out[c] += cols[c][a - lo:take - lo]
            a, i = take, i + 1
        return out


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
def _encode_shard(rows: dict, vae, te, resolution: int, batch_size: int, device) -> dict[str, torch.Tensor]:
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
    out["control"] = torch.tensor([[rows[c][i] for c in CONTROL_COLUMNS] for i in range(n)],
                                  dtype=torch.float32).reshape(n, len(CONTROL_COLUMNS))
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
    report_path = prepared / "report.json"
    if not report_path.is_file():
        raise FileNotFoundError(f"not a prepared directory (no report.json): {prepared}")
    report_bytes = report_path.read_bytes()
    report = json.loads(report_bytes)
    resolution = int(report["resolution"])
    source = _PreparedRows(prepared, report)
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

    out.mkdir(parents=True, exist_ok=True)
    previous = _read_records(out, params, [MANIFEST, *_partials(out)])
    n = len(source)
    n_shards = max(1, math.ceil(n / shard_size)) if n else 0
    expected = {_shard_name(k) for k in range(n_shards)}
    mine = [k for k in range(n_shards) if k % world_size == rank]
    for stale in out.glob("shard-*.safetensors"):
        if stale.name not in expected:  # from a run with another shard count
            stale.unlink()
    own = {_shard_name(k) for k in mine}
    for tmp in out.glob("shard-*.safetensors.tmp"):  # writes cut short by a crash; other ranks' may be in flight
        if tmp.name[:-len(".tmp")] not in expected or tmp.name[:-len(".tmp")] in own:
            tmp.unlink(missing_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the cache is "in progress"

    shards, encoded, reused, corrupt = [], [], [], []
    for k in tqdm(mine, desc=f"encode {out.name}" + (f" rank {rank}/{world_size}" if world_size > 1 else ""),
                  unit="shard", disable=None):
        a, b = k * shard_size, min(n, (k + 1) * shard_size)
        name = _shard_name(k)
        path = out / name
        rec = previous.get(name)
        if rec and rec.get("rows") == b - a and path.is_file():
            if file_sha256(path) == rec["sha256"]:
                shards.append({"file": name, "rows": b - a, "sha256": rec["sha256"]})
                reused.append(name)
                continue
            log.warning("%s: sha256 differs from its record (corrupt or modified); re-encoding it", path)
            corrupt.append(name)
        tensors = _encode_shard(source.rows(a, b), model, te, resolution, batch_size, device)
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
        rec = records.get(_shard_name(k))
        if not (rec and rec.get("rows") == min(n, (k + 1) * shard_size) - k * shard_size
                and (out / rec["file"]).is_file()):
            missing.append(_shard_name(k))
    if missing:
        log.info("rank %d/%d done; waiting for %d shards of other ranks", rank, world_size, len(missing))
        return {"count": n, "num_shards": n_shards, "complete": False, "missing": missing, "run": run}

    shift = model.config.get("shift_factor")
    manifest = {
        "format": FORMAT,
        "count": n,
        "num_shards": n_shards,
        "shards": [{k: records[_shard_name(i)][k] for k in ("file", "rows", "sha256")} for i in range(n_shards)],
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
    # A rank-private temp name: two ranks finishing together may both write the (identical) manifest.
    tmp = out / f".{MANIFEST}.{rank}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / MANIFEST)
    for name in _partials(out):
        (out / name).unlink(missing_ok=True)
    return {**manifest, "complete": True, "run": run}


class LatentDataset(torch.utils.data.Dataset):
    """Reader of a latent cache. With `verify`, every shard's sha256 is checked against the manifest
    up front (CorruptShardError names the file), so a truncated or bit-flipped cache fails before
    training rather than midway. Item access keeps one shard loaded: fine for in-order reads; training and
    sampling draw random batches through `rows()` (memory-mapped shards), and a DataLoader streaming shuffled
    epochs can use `ShardShuffledLatents`. Items are dicts of the shard tensors at one row, plus the 0-d
    `scaling_factor`/`shift_factor` so that `sample_latents` works on a collated batch."""

    def __init__(self, dir: Path, verify: bool = True):
        self.dir = Path(dir)
        mpath = self.dir / MANIFEST
        if not mpath.is_file():
            raise FileNotFoundError(f"no {MANIFEST} in {self.dir} (cache missing or encoding not finished)")
        self.manifest = json.loads(mpath.read_text())
        self.shards = self.manifest["shards"]
        if verify:
            for s in self.shards:
                p = self.dir / s["file"]
                if not p.is_file():
                    raise CorruptShardError(f"{p}: shard listed in manifest is missing")
                got = file_sha256(p)
                if got != s["sha256"]:
                    raise CorruptShardError(f"{p}: sha256 {got[:12]}... != manifest {s['sha256'][:12]}...")
        self._offsets = np.cumsum([0] + [int(s["rows"]) for s in self.shards]).tolist()
        self._cache: tuple[int, dict] | None = None

    @property
    def scaling_factor(self) -> float:
        return float(self.manifest["scaling_factor"])

    @property
    def shift_factor(self) -> float:
        return float(self.manifest["shift_factor"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes", []))

    def __len__(self) -> int:
        return self._offsets[-1]

    def _load(self, k: int) -> dict[str, torch.Tensor]:
        if self._cache is None or self._cache[0] != k:
            from safetensors.torch import load_file

            self._cache = (k, load_file(str(self.dir / self.shards[k]["file"])))
        return self._cache[1]

    def _factors(self) -> dict[str, torch.Tensor]:
        return {"scaling_factor": torch.tensor(self.scaling_factor), "shift_factor": torch.tensor(self.shift_factor)}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = bisect.bisect_right(self._offsets, i) - 1
        row = {name: t[i - self._offsets[k]] for name, t in self._load(k).items()}
        return {**row, **self._factors()}

    def rows(self) -> MappedRows:
        """The per-sample tensors, memory-mapped (`MappedRows`): for training and sampling at any cache size."""
        return MappedRows(self)

    def tensors(self) -> dict[str, torch.Tensor]:
        """All shards concatenated (for small caches trained fully in memory)."""
        from safetensors.torch import load_file

        parts = [load_file(str(self.dir / s["file"])) for s in self.shards]
        out = {name: torch.cat([p[name] for p in parts]) for name in parts[0]} if parts else {}
        return {**out, **self._factors()}


# safetensors dtype names -> torch dtypes, for memory-mapping shards (`map_safetensors`)
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as read-only views of one private memory map of the file.

    Why by hand: safetensors' loaders (`load_file`, `safe_open(...).get_tensor`) copy each tensor into
    memory, and a cache of CC12M's caption states does not fit there. The format is an 8-byte
    little-endian header length, a JSON header (dtype, shape, byte offsets per tensor) and the raw data,
    each tensor aligned to its element size, so every tensor is a zero-copy view of `torch.from_file`'s
    map: pages are read when a row is indexed and shared through the page cache by all ranks of a node.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    size = path.stat().st_size
    data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)[8 + header_len:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CorruptShardError(f"{path}: tensor {name!r} has dtype {info['dtype']}, not one a cache holds")
        begin, end = info["data_offsets"]
        out[name] = data[begin:end].view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


class MappedRows:
    """The per-sample tensors of a latent cache, memory-mapped from its shards and gathered by global row.

    Why: training draws random rows from the whole cache every step. Loading the cache (`tensors()`) costs
    its full size in memory per process: about 42 GB of posteriors for ImageNet-1k at 256 px, and more for
    CC12M's caption states, times the ranks of a node. Mapped, only the rows a batch touches are read, once
    per node. `gather(idx)` returns exactly what indexing the concatenated tensors would.
    """

    def __init__(self, dataset: "LatentDataset"):
        self.dataset = dataset
        self._maps: dict[int, dict[str, torch.Tensor]] = {}
        first = self._shard(0) if dataset.shards else {}
        rows0 = int(dataset.shards[0]["rows"]) if dataset.shards else 0
        # per-sample tensors only: one row per sample (a shard could also carry scalars)
        self.names = [n for n, t in first.items() if t.dim() > 0 and t.shape[0] == rows0]
        self.shapes = {n: tuple(first[n].shape[1:]) for n in self.names}
        self.dtypes = {n: first[n].dtype for n in self.names}
        self._offsets = torch.tensor(dataset._offsets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.dataset)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def _shard(self, k: int) -> dict[str, torch.Tensor]:
        if k not in self._maps:
            self._maps[k] = map_safetensors(self.dataset.dir / self.dataset.shards[k]["file"])
        return self._maps[k]

    def gather(self, idx: torch.Tensor, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Rows `idx` (global, any order, repeats allowed) of each tensor in `names` (default: all)."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)}) in {self.dataset.dir}")
        names = self.names if names is None else names
        shard = torch.searchsorted(self._offsets, idx, right=True) - 1
        out = {n: torch.empty((len(idx), *self.shapes[n]), dtype=self.dtypes[n]) for n in names}
        for k in torch.unique(shard).tolist():
            where = torch.nonzero(shard == k).flatten()
            rows = idx[where] - self._offsets[k]
            tensors = self._shard(k)
            for n in names:
                out[n][where] = tensors[n][rows]
        return out

    def column(self, name: str) -> torch.Tensor:
        """One tensor over the whole cache (for small per-sample columns such as labels)."""
        return self.gather(torch.arange(len(self)), [name])[name]


def _seed(*parts) -> int:
    """A 63-bit generator seed from any tuple of ints/strings (independent streams per tuple)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class ShardShuffledLatents(torch.utils.data.IterableDataset):
    """Shuffled one-pass-per-epoch reader of a latent cache that touches each shard once per epoch.

    Why: `LatentDataset` under a fully random sampler jumps between shards on almost every item, and
    loading a shard costs far more than reading a row, so random access over a cache larger than memory
    thrashes. Here each epoch (1) permutes the shard order with a generator seeded by (seed, epoch),
    (2) deals the permuted shards round-robin to the `world_size` ranks and each rank's share
    round-robin to its DataLoader workers (each worker reads only its own shards; no row is read twice
    in an epoch), and (3) walks its shards in consecutive windows of `window` shards, loading a window
    at once and yielding its rows in a random permutation. So rows are shuffled globally at the shard level and locally within a window:
    two rows meet in the same stretch of the stream only if their shards share a window. Memory held is
    about `window` shards per worker; `window` >= shards per worker gives a full shuffle of each
    worker's rows. Items are the same dicts as `LatentDataset[i]`.

    Epochs: `set_epoch(e)` picks epoch e for the next iteration; without it each new iteration of the
    same object advances the epoch by one. DataLoader workers hold copies, so with
    `persistent_workers=True` the copies advance on their own (0, 1, 2, ... as with set_epoch called
    in order), and without persistent workers call `set_epoch` before each epoch.
    """

    def __init__(self, dir: Path, window: int = 4, seed: int = 0, rank: int = 0, world_size: int = 1,
                 verify: bool = True):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        self.base = LatentDataset(dir, verify=verify)
        self.window, self.seed, self.rank, self.world_size = int(window), int(seed), int(rank), int(world_size)
        self.epoch, self._iters = 0, 0
        self._factors = self.base._factors()

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._iters = int(epoch), 0

    def shard_order(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Shards read by (this rank, `worker`) in `epoch`, in reading order: the epoch's permutation
        dealt round-robin to ranks, then this rank's share dealt round-robin to its workers."""
        g = torch.Generator().manual_seed(_seed("shards", self.seed, epoch))
        order = torch.randperm(len(self.base.shards), generator=g).tolist()
        return order[self.rank::self.world_size][worker::num_workers]

    def __iter__(self):
        from safetensors.torch import load_file

        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch + self._iters
        self._iters += 1
        shards = self.shard_order(epoch, worker, num_workers)
        g = torch.Generator().manual_seed(_seed("rows", self.seed, epoch, self.rank, worker))
        for a in range(0, len(shards), self.window):
            parts = [load_file(str(self.base.dir / self.base.shards[k]["file"])) for k in shards[a:a + self.window]]
            data = {name: torch.cat([p[name] for p in parts]) if len(parts) > 1 else parts[0][name]
                    for name in parts[0]}
            del parts
            for i in torch.randperm(len(data["label"]), generator=g).tolist():
                yield {**{name: t[i] for name, t in data.items()}, **self._factors}


def sample_latents(batch: dict, generator: torch.Generator, flip_prob: float = 0.5,
                   scaling_factor: float | None = None, shift_factor: float | None = None):
    """Draw training latents from cached posteriors: per row, choose the mirrored posterior with
    probability `flip_prob`, then z = (mean + std * eps - shift) * scale in float32.
    Draw order (flips, then eps) is fixed so a generator state reproduces a batch. Factors default to
    the batch's `scaling_factor`/`shift_factor` entries (as produced by LatentDataset).
    Returns (z, flips: bool B)."""
    mean = batch["mean"]
    if scaling_factor is None:
        scaling_factor = float(torch.as_tensor(batch["scaling_factor"]).flatten()[0])
    if shift_factor is None:
        shift_factor = float(torch.as_tensor(batch["shift_factor"]).flatten()[0])
    gdev = generator.device
    flips = (torch.rand(mean.shape[0], generator=generator, device=gdev) < flip_prob).to(mean.device)
    eps = torch.randn(mean.shape, generator=generator, device=gdev, dtype=torch.float32).to(mean.device)
    sel = flips.view(-1, *([1] * (mean.dim() - 1)))
    m = torch.where(sel, batch["mean_flip"], mean).float()
    s = torch.where(sel, batch["std_flip"], batch["std"]).float()
    return (m + s * eps - shift_factor) * scaling_factor, flips
