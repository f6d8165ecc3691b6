"""Parallel `ldm prepare`: worker processes on one node and ranks across SLURM tasks, same bytes as one process.

Why two phases: output shard k holds kept rows [k*S, (k+1)*S), and which images are kept is only known
after decoding them, so no worker knows where its rows land before the images ahead of it are done.
Phase 1 cuts the source's samples, in their order, into parts of `part_size` samples (part j to rank
j % world_size, and within a rank to its worker processes); a part's rows (built by
`ldm.data.preparing.image_rows`, as in the single-process path) go to `.parts-<params>/part-J.parquet`, its
kept and skipped counts to `part-J.json`. Phase 2, once every part exists, is run by the rank that finds
them all (the last to finish; ranks may run together or one after another, and two finishing together
both assembling is harmless: same bytes, rank-private temp names): shard k is rows [k*S, (k+1)*S) of the
parts in order, written by `write_shard` (the single-process writer), shards spread over the workers;
then report.json, then the parts are removed. Parts are resumable like `ldm encode`'s shards: a rerun
with the same arguments keeps every part whose record matches its samples (keys, labels, captions) and
whose file matches its recorded sha256, so a preempted rank redoes only its unfinished parts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import shutil
import sys
from collections import Counter
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from ldm.data.prepared import REPORT
from ldm.data.preparing import finish, image_rows, shard_file, write_shard
from ldm.data.sources import RawSample, open_source
from ldm.data.transforms import SkipImage
from ldm.errors import EmptyDatasetError
from ldm.progress import progress
from ldm.provenance import atomic_write_json, file_sha256

log = logging.getLogger(__name__)

#: raw samples per part (the unit of work, of rank assignment and of resume): small enough that a few
#: workers share a few thousand images evenly, large enough that ImageNet's 1.28M are ~5000 files
DEFAULT_PART_SIZE = 256
FORMAT = "ldm-prepare-parts/1"


def parts_dir(out: Path, source: str, settings: dict, part_size: int) -> Path:
    """The parts of one set of arguments (a rerun with other arguments never reuses them)."""
    params = {"format": FORMAT, "source": str(source), **settings, "part_size": int(part_size)}
    return out / f".parts-{hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]}"


def _part(parts: Path, j: int, ext: str) -> Path:
    return parts / f"part-{j:06d}.{ext}"


def _digest(samples: list[RawSample]) -> str:
    """What a part was made from (keys, labels, captions, attributes): a changed source is not reused."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.key, s.label, s.caption, s.attributes], sort_keys=True).encode() + b"\n")
    return h.hexdigest()


def _prepare_part(parts: Path, j: int, samples: list[RawSample], settings: dict, digest: str) -> dict:
    """Phase 1, in a worker: one part's rows to its parquet file, then its record (written last)."""
    rows: list[dict] = []
    kept, skipped = 0, Counter()
    for sample in samples:
        try:
            rows.extend(image_rows(sample, **settings))
        except SkipImage as e:
            skipped[e.reason] += 1
            continue
        kept += 1
    rec = {"part": j, "samples": len(samples), "digest": digest, "rows": len(rows), "kept": kept,
           "skipped": dict(skipped), "sha256": None}
    if rows:
        write_shard(_part(parts, j, "parquet"), rows)
        rec["sha256"] = file_sha256(_part(parts, j, "parquet"))
    atomic_write_json(_part(parts, j, "json"), rec)
    return rec


def _record(parts: Path, j: int, digest: str, n: int, verify: bool) -> dict | None:
    """Part j's record if it is done for these samples (`verify`: its file's sha256 checked, else its presence)."""
    try:
        rec = json.loads(_part(parts, j, "json").read_text())
    except (OSError, ValueError):  # absent, or removed by a rank that just finished
        return None
    if rec.get("digest") != digest or rec.get("samples") != n:
        return None
    if rec["rows"]:
        path = _part(parts, j, "parquet")
        if not path.is_file() or (verify and file_sha256(path) != rec["sha256"]):
            return None
    return rec


def _assemble_shard(out: Path, k: int, slices: list[tuple[Path, int, int]], tmp_suffix: str) -> dict:
    """Phase 2, in a worker: output shard k from row ranges of parts, through the single-process writer."""
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for path, a, b in slices:
        rows.extend(pq.read_table(path).slice(a, b - a).to_pylist())
    path = out / shard_file(k)
    write_shard(path, rows, tmp_suffix)
    return {"k": k, "file": path.name, "rows": len(rows), "sha256": file_sha256(path)}


def _warm() -> None:
    """Load what every worker needs once, before forking, instead of once per worker (~1 s each): pyarrow, the
    pandas it imports on its first array, PIL's plugins."""
    import pyarrow as pa
    import pyarrow.parquet  # noqa: F401
    from PIL import Image

    pa.array([0], type=pa.int32())
    Image.init()


class _Runner:
    """Calls run inline (one worker) or in a process pool with at most two per worker in flight, so a source
    that holds image bytes (tar, parquet) never has more than a few parts of them in memory."""

    def __init__(self, workers: int):
        self.pool = None
        if workers > 1:
            # Linux: fork, so that workers start at once instead of each importing torch (through
            # ldm.control) for seconds; they are forked here, before this call starts any thread (tqdm's
            # monitor, the pool's manager), and never run torch. Elsewhere spawn, fork's safe alternative.
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            if method == "fork":
                _warm()
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method))
            self.pool.submit(int).result()  # the first submit starts every worker
        self.limit, self.pending, self.results = 2 * workers, set(), []

    def submit(self, fn, *args) -> None:
        if self.pool is None:
            self.results.append(fn(*args))
            return
        while len(self.pending) >= self.limit:
            self._collect(FIRST_COMPLETED)
        self.pending.add(self.pool.submit(fn, *args))

    def _collect(self, how) -> None:
        done, self.pending = wait(self.pending, return_when=how)
        self.results.extend(f.result() for f in done)

    def drain(self) -> list:
        if self.pending:
            self._collect(ALL_COMPLETED)
        results, self.results = self.results, []
        return results

    def __enter__(self) -> "_Runner":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _parts_of(samples, part_size: int):
    batch: list[RawSample] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == part_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _plan(records: list[dict], parts: Path, shard_size: int) -> list[list[tuple[Path, int, int]]]:
    """Per output shard, the (part file, first row, end row) ranges it is made of, in order."""
    shards: list[list[tuple[Path, int, int]]] = []
    pos = 0  # rows before the current part
    for rec in records:
        a = 0
        while a < rec["rows"]:
            k = (pos + a) // shard_size
            take = min(rec["rows"] - a, (k + 1) * shard_size - (pos + a))
            if k == len(shards):
                shards.append([])
            shards[k].append((_part(parts, rec["part"], "parquet"), a, a + take))
            a += take
        pos += rec["rows"]
    return shards


def prepare_parallel(source: str, out: Path, settings: dict, shard_size: int, workers: int, rank: int,
                     world_size: int, part_size: int) -> dict:
    """`ldm.stages.prepare.prepare` with `workers` processes, as rank `rank` of `world_size`: the report once
    every part exists (identical to one process's), else {"complete": False, parts, missing, parts_done}."""
    src = open_source(source)
    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT).unlink(missing_ok=True)  # a run that dies midway must not look finished
    parts = parts_dir(out, source, settings, part_size)
    for old in out.glob(".parts-*"):  # parts of other arguments: never reusable
        if old != parts:
            shutil.rmtree(old, ignore_errors=True)
    parts.mkdir(exist_ok=True)

    digests: list[tuple[str, int]] = []
    records: dict[int, dict] = {}
    who = f" rank {rank}/{world_size}" if world_size > 1 else ""
    with _Runner(workers) as runner:
        samples = progress(src, f"prepare {settings['resolution']}px{who}", unit="img")
        for j, batch in enumerate(_parts_of(samples, part_size)):
            digests.append((_digest(batch), len(batch)))
            if j % world_size != rank:
                continue
            rec = _record(parts, j, *digests[j], verify=True)
            if rec is not None:
                records[j] = rec
                continue
            runner.submit(_prepare_part, parts, j, batch, settings, digests[j][0])
        records.update({rec["part"]: rec for rec in runner.drain()})
        mine = len(records)

        for j, (digest, n) in enumerate(digests):  # other ranks' parts: their records and presence
            if j not in records and (rec := _record(parts, j, digest, n, verify=False)) is not None:
                records[j] = rec
        missing = len(digests) - len(records)
        if missing and (out / REPORT).is_file():  # another rank just assembled (and removed the parts)
            return json.loads((out / REPORT).read_text())
        if missing:
            log.info("rank %d/%d done; waiting for %d parts of other ranks", rank, world_size, missing)
            return {"complete": False, "parts": len(digests), "missing": missing, "parts_done": mine}

        ordered = [records[j] for j in range(len(digests))]
        skipped: Counter = Counter()
        for rec in ordered:
            skipped.update(rec["skipped"])
        skipped.update(src.skipped)
        kept = sum(rec["kept"] for rec in ordered)
        try:
            for k, slices in enumerate(_plan(ordered, parts, shard_size)):
                runner.submit(_assemble_shard, out, k, slices, f".tmp{rank}")
            shards = [{c: s[c] for c in ("file", "rows", "sha256")}
                      for s in sorted(runner.drain(), key=lambda s: s["k"])]
        except FileNotFoundError:  # another rank assembled at the same time and removed the parts
            if (out / REPORT).is_file():
                return json.loads((out / REPORT).read_text())
            raise
    try:
        report = finish(out, source, shards, kept, skipped, settings["resolution"], settings["crop"],
                        src.classes, settings["crops"], tmp_name=f"report.json.tmp{rank}")
    except EmptyDatasetError:
        shutil.rmtree(parts, ignore_errors=True)
        raise
    shutil.rmtree(parts, ignore_errors=True)
    return report
