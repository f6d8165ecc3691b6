"""Snapshots of a training run: save, list, load, prune; the resume key; the final EMA export.

Two kinds, one format (safetensors + a JSON state): evaluated snapshots (`RunPaths.checkpoints`, at
`snapshot_steps`, sampled and scored downstream, never pruned) and resume checkpoints (`RunPaths.resume`,
every `checkpoint_every` steps and on preemption, only the last `keep_last` kept). A restart resumes from
the latest good snapshot of either. Everything is written into a temporary directory and renamed, so a killed
job never leaves a half-written snapshot; nothing is pickled. Nothing is deleted on resume either: a corrupt
snapshot is quarantined, snapshots of another trajectory are moved to `superseded/`.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .provenance import atomic_replace_dir, atomic_write_bytes, atomic_write_json, digest, file_sha256, save_tensors

#: `training` keys that decide when snapshots are written and kept and how many non-finite steps are
#: tolerated, never which weights come out: outside the resume key, so changing them resumes the run.
OPERATIONAL_TRAINING = ("max_nonfinite_skips", "checkpoint_every", "keep_last", "snapshots")
#: The tensor files of every snapshot (loaded to verify snapshots that predate recorded checksums).
SNAPSHOT_TENSORS = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors")


def snapshot_steps(total: int, count: int, with_zero: bool) -> list[int]:
    """Steps at which evaluated snapshots are taken: `count` evenly spaced, plus 0 for a transfer (its
    starting point is a point of its curve)."""
    steps = sorted({max(1, round(total * (k + 1) / count)) for k in range(count)})
    return ([0] if with_zero else []) + steps


def weights_digest(path: Path) -> str:
    """Hash of a safetensors file's tensors (names, dtypes, shapes, bytes), not of the file: safetensors
    writes its metadata in a per-process order, so identical weights can differ byte for byte."""
    digest_ = hashlib.sha256()
    tensors = load_file(str(path))
    for name in sorted(tensors):
        value = tensors[name].contiguous()
        digest_.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        digest_.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest_.hexdigest()


def load_final(path: Path):
    """Weights + config of a finished run (EMA weights, config in the safetensors metadata)."""
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    return load_file(str(path)), json.loads(meta["model_config"]), meta


def _flatten_optimizer(state: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for index, slots in state["state"].items():
        for key, value in slots.items():
            name = f"{index}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().cpu().contiguous()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, extra: dict) -> dict:
    """Inverse of `_flatten_optimizer`; keys are param indices, or parameter names (FSDP full state)."""
    state: dict = {}
    for name, value in list(tensors.items()) + list(extra["scalars"].items()):
        index, key = name.rsplit(".", 1)
        state.setdefault(int(index) if index.isdigit() else index, {})[key] = value
    return {"state": state, "param_groups": extra["param_groups"]}


def global_rng_state() -> dict:
    """This rank's global torch / numpy / python RNG states as JSON (nothing pickled)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state().tolist(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def snapshot_tmp(directory: Path, step: int) -> Path:
    """Where a snapshot is assembled before its atomic rename (ranks may write their RNG files into it)."""
    return directory / f".tmp-step-{step:07d}"


def _rank_rng_file(snapshot: Path, rank: int) -> Path:
    return snapshot / f"rng-rank{rank}.json"


def write_rank_rng(tmp: Path, rank: int) -> None:
    """This rank's global RNG states into a snapshot being assembled (every rank calls it)."""
    atomic_write_json(_rank_rng_file(tmp, rank), global_rng_state())


def save_snapshot(directory: Path, step: int, model_state: dict, ema, optimizer_state: dict, generators: dict,
                  data_state: dict, model_config: dict, resume_key: str, extra: dict | None = None,
                  tmp: Path | None = None, resume_section: dict | None = None) -> Path:
    """Write one snapshot atomically (into `tmp`, then renamed). `tmp` may already hold per-rank files.
    state.json records the sha256 of every other file (checked before resuming) and the key's section
    (so a changed key can be explained)."""
    final = directory / f"step-{step:07d}"
    if tmp is None:
        tmp = snapshot_tmp(directory, step)
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    meta = {"model_config": json.dumps(model_config), "step": str(step)}
    save_tensors({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"),
                 meta)
    save_tensors({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"), meta)
    opt_tensors, opt_extra = _flatten_optimizer(optimizer_state)
    save_tensors(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_tensors({f"rng.{k}": g.get_state() for k, g in generators.items()}, str(tmp / "rng.safetensors"))
    files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != "state.json"}
    atomic_write_json(tmp / "state.json", {"step": step, "data": data_state, "optimizer": opt_extra,
                                          "model_config": model_config, "resume_key": resume_key,
                                          "resume_section": resume_section, "files": files, **(extra or {})})
    atomic_replace_dir(tmp, final)
    return final


def snapshot_step(path: Path) -> int:
    """The step of a snapshot directory (`step-0000120` -> 120)."""
    return int(path.name.split("-")[1])


def list_snapshots(directory: Path) -> list[Path]:
    """Complete snapshots (state.json present; not parsed here) of `directory`, oldest first."""
    return sorted((p for p in directory.glob("step-*") if p.name[5:].isdigit() and (p / "state.json").exists()),
                  key=snapshot_step)


def latest_snapshot(*directories: Path) -> Path | None:
    """The complete snapshot with the highest step over `directories` (an evaluated one wins a tie)."""
    complete = [p for d in directories for p in list_snapshots(d)]
    return max(complete, key=snapshot_step) if complete else None


def prune_snapshots(directory: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete snapshots in `directory` (only call on `resume/`)."""
    doomed = list_snapshots(directory)[:-keep_last] if keep_last > 0 else list_snapshots(directory)
    for path in doomed:
        shutil.rmtree(path)
    return doomed


def _trajectory(section: dict, top: bool = True) -> dict:
    """A run section less what cannot change its weights: the operational `training` keys (down the init
    chain too, as `training` is shared by all stages) and, for this run only, `stage.steps` (raising it
    continues a finished run). `grad_accum` stays, although it is designed to give the same draws."""
    out = {**section, "training": {k: v for k, v in section["training"].items() if k not in OPERATIONAL_TRAINING}}
    if top:
        out["stage"] = {k: v for k, v in section["stage"].items() if k != "steps"}
    if "init" in section:
        out["init"] = _trajectory(section["init"], top=False)
    return out


def resume_section(run_section: dict, init_digest: str | None) -> dict:
    """What the resume key hashes (stored in each snapshot): the run's trajectory settings, init weights."""
    return json.loads(json.dumps({**_trajectory(run_section), "init_weights": init_digest}, default=str))


def resume_key(run_section: dict, init_path: Path | None) -> str:
    """Snapshots are resumed only if they were made on this weight trajectory: same settings, same init."""
    return resume_keys(run_section, init_path)[1]


def legacy_resume_key(run_section: dict, init_digest: str | None) -> str:
    """The key of snapshots written before operational keys were left out (still resumed when equal)."""
    section = {**run_section, "stage": {k: v for k, v in run_section["stage"].items() if k != "steps"}}
    return digest([section, init_digest])


def resume_keys(run_section: dict, init_path: Path | None) -> tuple[dict, str, str]:
    """(resume section, resume key, legacy key) of a run, hashing the init weights once."""
    init_digest = weights_digest(init_path) if init_path else None
    section = resume_section(run_section, init_digest)
    return section, digest(section), legacy_resume_key(run_section, init_digest)


def _read_state(path: Path) -> dict | None:
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def verify_snapshot(path: Path) -> str | None:
    """What is wrong with a snapshot, or None: state.json must parse and every file it records must match
    its sha256; snapshots without recorded checksums must at least have loadable tensor files."""
    state = _read_state(path)
    if state is None:
        return "state.json is empty or unreadable"
    if state.get("files") is None:
        for name in SNAPSHOT_TENSORS:
            try:
                load_file(str(path / name))
            except (OSError, SafetensorError) as err:
                return f"{name} does not load ({err})"
        return None
    for name, sha in state["files"].items():
        if not (path / name).is_file():
            return f"{name} is missing"
        if file_sha256(path / name) != sha:
            return f"{name} does not match its recorded sha256"
    return None


def _aside(path: Path) -> Path:
    """`path` itself if free, else `path` with the first free numeric suffix (nothing is overwritten)."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


_ABSENT = object()


def _flat(obj, prefix: str = "") -> dict:
    if isinstance(obj, dict) and obj:
        return {k: v for key, value in obj.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: obj}


def section_changes(old: dict, new: dict, limit: int = 8) -> str:
    """The dotted keys that differ between two resume sections, `key: old -> new`."""
    a, b = _flat(old), _flat(new)
    show = lambda d, k: json.dumps(d[k], default=str) if k in d else "(absent)"  # noqa: E731
    changes = [f"{k}: {show(a, k)} -> {show(b, k)}" for k in sorted(a.keys() | b.keys())
               if a.get(k, _ABSENT) != b.get(k, _ABSENT)]
    more = f", and {len(changes) - limit} more" if len(changes) > limit else ""
    return ", ".join(changes[:limit]) + more


def choose_snapshot(paths, section: dict, legacy_key: str, log) -> Path | None:
    """The snapshot to resume `paths` (a `RunPaths`) from; only the main process calls this, then a barrier.

    The newest snapshot is verified: a bad one is renamed `.corrupt-step-NNNNNNN` and the next older one
    tried. A good one made on another trajectory (its key is neither this key nor the legacy key) sends
    checkpoints/, resume/, the log and the final weights to `superseded/<UTC time>-<old key>/`. Afterwards
    `latest_snapshot` returns the choice on every rank, and the log ends at its step."""
    chosen = _choose(paths, section, legacy_key, log)
    _trim_log(paths.log, snapshot_step(chosen) if chosen else 0)
    return chosen


def _trim_log(path: Path, step: int) -> None:
    """Drop `log.jsonl` records after `step` (the resumed run redoes them) and torn lines, atomically."""
    lines = path.read_text().splitlines() if path.exists() else []
    keep = [line for line in lines if _record_step(line) <= step]
    if keep != lines:
        atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


def _record_step(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line torn by a kill


def _choose(paths, section: dict, legacy_key: str, log) -> Path | None:
    key = digest(section)
    while (latest := latest_snapshot(paths.checkpoints, paths.resume)) is not None:
        problem = verify_snapshot(latest)
        if problem is None:
            break
        quarantine = _aside(latest.with_name(f".corrupt-{latest.name}"))
        latest.rename(quarantine)
        log(f"snapshot {latest} is corrupt ({problem}); quarantined as {quarantine.name}, trying the next older one")
    if latest is None:
        return None
    state = _read_state(latest)
    if state.get("resume_key") in (key, legacy_key):
        return latest
    old = state.get("resume_section")
    why = (section_changes(old, section) if old else "") or "snapshots from an older format or another init"
    dest = _aside(paths.dir / "superseded" / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-"
                                             f"{str(state.get('resume_key'))[:8]}")
    dest.mkdir(parents=True)
    for path in (paths.checkpoints, paths.resume, paths.log, paths.final):
        if path.exists():
            path.rename(dest / path.name)
    log(f"snapshots in {paths.dir} come from another trajectory ({why}); moved to {dest}; starting over")
    return None


def load_snapshot(path: Path, rank: int) -> dict:
    """Everything a resumed run needs from a snapshot: its JSON state, model/EMA/optimizer tensors, the
    named generators' states and this rank's global RNG state (None if the snapshot has none for it)."""
    state = json.loads((path / "state.json").read_text())
    rank_rng = _rank_rng_file(path, rank)
    return {
        "state": state,
        "model": load_file(str(path / "model.safetensors")),
        "ema": load_file(str(path / "ema.safetensors")),
        "optimizer": _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"]),
        "generators": {k.removeprefix("rng."): v for k, v in load_file(str(path / "rng.safetensors")).items()},
        "global_rng": json.loads(rank_rng.read_text()) if rank_rng.exists() else None,
    }


def export_final(snapshot: Path, final: Path, model_config: dict, run_id: str, steps: int, run_hash: str) -> None:
    """The run's deliverable: the EMA weights of `snapshot`, with the model config in the metadata."""
    ema = load_file(str(snapshot / "ema.safetensors"))
    tmp = final.with_name(final.name + ".tmp")
    save_tensors(ema, str(tmp), {"model_config": json.dumps(model_config), "run_id": run_id, "step": str(steps),
                              "run_hash": run_hash})
    tmp.replace(final)
