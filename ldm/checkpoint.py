"""Snapshots of a training run: save, list, load, prune; the resume key; the final EMA export.

Two kinds, one format (safetensors + a JSON state): evaluated snapshots (`RunPaths.checkpoints`, at
`snapshot_steps`, sampled and scored downstream, never pruned) and resume checkpoints (`RunPaths.resume`,
every `checkpoint_every` steps and on preemption, only the last `keep_last` kept). A restart resumes from
the latest of either. Everything is written into a temporary directory and renamed, so a killed job
never leaves a half-written snapshot; nothing is pickled.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .provenance import atomic_replace_dir, atomic_write_json, digest


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
                  tmp: Path | None = None) -> Path:
    """Write one snapshot atomically (into `tmp`, then renamed). `tmp` may already hold per-rank files."""
    final = directory / f"step-{step:07d}"
    if tmp is None:
        tmp = snapshot_tmp(directory, step)
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    meta = {"model_config": json.dumps(model_config), "step": str(step)}
    save_file({k: v.detach().cpu().contiguous() for k, v in model_state.items()}, str(tmp / "model.safetensors"), meta)
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"), meta)
    opt_tensors, opt_extra = _flatten_optimizer(optimizer_state)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({f"rng.{k}": g.get_state() for k, g in generators.items()}, str(tmp / "rng.safetensors"))
    atomic_write_json(tmp / "state.json", {"step": step, "data": data_state, "optimizer": opt_extra,
                                          "model_config": model_config, "resume_key": resume_key, **(extra or {})})
    atomic_replace_dir(tmp, final)
    return final


def snapshot_step(path: Path) -> int:
    """The step of a snapshot directory (`step-0000120` -> 120)."""
    return int(path.name.split("-")[1])


def list_snapshots(directory: Path) -> list[Path]:
    return sorted((p for p in directory.glob("step-*") if (p / "state.json").exists()), key=snapshot_step)


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


def resume_key(run_section: dict, init_path: Path | None) -> str:
    """Snapshots are resumed only if they were made by this run definition and init weights; the step
    budget is left out so that raising `steps` continues a finished run instead of restarting it."""
    section = dict(run_section)
    section["stage"] = {k: v for k, v in section["stage"].items() if k != "steps"}
    return digest([section, weights_digest(init_path) if init_path else None])


def snapshot_key(path: Path) -> str | None:
    """The resume key a snapshot was written with."""
    return json.loads((path / "state.json").read_text()).get("resume_key")


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
    save_file(ema, str(tmp), {"model_config": json.dumps(model_config), "run_id": run_id, "step": str(steps),
                              "run_hash": run_hash})
    tmp.replace(final)
