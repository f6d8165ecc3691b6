"""Latent cache reader: manifest and shard checks, item and memory-mapped row access, shuffled streaming,
and the load-time draw of latents from cached posteriors.

Format (docs/formats.md): `shard-NNNNN.safetensors` with the VAE posterior of each crop and of its
horizontal mirror (mean/std, fp16), label, control (`ldm.control` fields), text token states (fp16) and
lengths, plus `manifest.json` (counts, per-shard sha256, VAE identity, scaling/shift factors, latent
shape, crop policy, text encoder, classes). Written by the `encode` stage (`ldm.stages.encode`).

Why posterior moments and not latents: a sample z = mean + std * eps and the flip are drawn at training
time (`sample_latents`), so each epoch sees fresh VAE noise and both orientations, as when encoding
on the fly, at cache cost of 4 tensors instead of one.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..control import CONTROL_FIELDS
from ..errors import CorruptShardError
from ..layout import CACHE_MANIFEST
from ..provenance import file_sha256

# /2: the control tensor gained the flip flag (`ldm.control.CONTROL_FIELDS`); a /1 cache is refused by name
FORMAT = "ldm-latent-cache/2"
MANIFEST = CACHE_MANIFEST
MOMENTS = ("mean", "std", "mean_flip", "std_flip")


# The recovery hint follows `ldm.stages.encode`: it reuses a shard only through a record (manifest.json, or a partial one
# of an unfinished run) whose sha256 the file still matches, and Snakemake deletes a job's output (the
# manifest) before rerunning it, so only a hand-run encode keeps the intact shards.
_RECOVER = ("to recover, rerun `ldm encode --out {dir}` with the arguments that wrote it (its prepared dir, VAE, "
            "text encoder, shard and batch size: see `params` in manifest.json); it keeps every shard that still "
            "matches manifest.json and re-encodes the missing ones (deleting manifest.json so that Snakemake reruns "
            "encode works too, but re-encodes every shard)")


def missing_shard_error(dir: Path) -> str | None:
    """One line naming the first shard that a finished cache's manifest lists but the disk lacks, else None.
    Only `stat`s (no hashing), so the Snakefile runs it on every DAG build: Snakemake tracks the manifest,
    not the shards, and a deleted shard would otherwise surface as a failed training job, retried in vain."""
    mpath = Path(dir) / MANIFEST
    if not mpath.is_file():
        return None
    for s in json.loads(mpath.read_text())["shards"]:
        if not (Path(dir) / s["file"]).is_file():
            return f"{Path(dir) / s['file']}: shard listed in manifest is missing; " + _RECOVER.format(dir=dir)
    return None


def vae_sha256(dir: Path) -> str | None:
    """The autoencoder weights a cache's latents were encoded with (None: no cache there, or one that does
    not say): what a metrics record names so that runs of different autoencoders are never compared."""
    path = Path(dir) / MANIFEST
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    return (manifest.get("vae") or {}).get("weights_sha256")


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


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
        if self.manifest.get("format") != FORMAT:
            raise CorruptShardError(f"{mpath}: cache format {self.manifest.get('format')!r} is not this version's "
                                    f"{FORMAT!r} (control fields {', '.join(CONTROL_FIELDS)}); re-encode it: "
                                    "`snakemake --forcerun encode` or `ldm encode` into an empty folder")
        self.shards = self.manifest["shards"]
        if verify:
            for s in self.shards:
                p = self.dir / s["file"]
                if not p.is_file():
                    raise CorruptShardError(missing_shard_error(self.dir))
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

    def split_rows(self, heldout: bool) -> torch.Tensor:
        """Global row indices of the training rows (`heldout=False`) or of the held-out ones (`ldm.data.split`).
        A cache without the split (encoded with `heldout: 0`, or before it existed) is all training rows."""
        data = self.rows()
        if "heldout" not in data:
            return torch.arange(0 if heldout else len(self))
        return torch.nonzero(data.column("heldout").bool() == heldout).flatten()

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
        self.row_bytes = {n: math.prod(self.shapes[n]) * self.dtypes[n].itemsize for n in self.names}
        self.bytes_read = 0  # by `gather`, for the input-pipeline benchmark

    def __len__(self) -> int:
        return len(self.dataset)

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def _shard(self, k: int) -> dict[str, torch.Tensor]:
        if k not in self._maps:
            self._maps[k] = map_safetensors(self.dataset.dir / self.dataset.shards[k]["file"])
        return self._maps[k]

    def gather(self, idx: torch.Tensor, names: list[str] | None = None, keep: slice | None = None
               ) -> dict[str, torch.Tensor]:
        """Rows `idx` (global, any order, repeats allowed) of each tensor in `names` (default: all). With `keep`
        only the positions `idx[keep]` are read; the others are zeros of the same shape (a rank's share of a
        global batch: its random draws are made for the whole batch, which only needs the shapes)."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self)):
            raise IndexError(f"row index out of range [0, {len(self)}) in {self.dataset.dir}")
        names = self.names if names is None else names
        read = torch.arange(len(idx))[keep] if keep is not None else torch.arange(len(idx))
        shard = torch.searchsorted(self._offsets, idx[read], right=True) - 1
        out = {n: (torch.zeros if keep is not None else torch.empty)((len(idx), *self.shapes[n]), dtype=self.dtypes[n])
               for n in names}
        for k in torch.unique(shard).tolist():
            where = read[shard == k]
            rows = idx[where] - self._offsets[k]
            tensors = self._shard(k)
            for n in names:
                out[n][where] = tensors[n][rows]
        self.bytes_read += len(read) * sum(self.row_bytes[n] for n in names)
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
