"""`ldm train`: one run of the grid (a recipe at one stage), on accelerate, resumable.

The loop keeps everything that decides the next step in explicit state (model, EMA, optimizer, step,
the data order generator and the noise generator), snapshots it to safetensors + JSON atomically, and
picks up from the latest snapshot when restarted, so a killed or preempted job loses at most the steps
since its last snapshot. The learning rate is a pure function of the step, so no scheduler state exists
to get out of sync on resume.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .config import ConfigError, digest, get_run, run_section, schedule_shift
from .diffusion import build_objective
from .latents import LatentDataset, sample_latents
from .models import build_model, model_from_config
from .models.conditioning import drop_conditions
from .provenance import atomic_replace_dir, atomic_write_json
from .text import pad_tokens
from .transfer import transfer_state

#: Exit code after a clean stop on SIGTERM/SIGUSR1 (preemption): EX_TEMPFAIL, "try again later".
PREEMPTED_EXIT_CODE = 75


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good snapshot is kept."""


def run_dir(config: dict, run_id: str) -> Path:
    return Path(config["workdir"]) / "runs" / run_id


def latents_dir(config: dict, run_id: str) -> Path:
    """The latent cache a run trains on (its resolution and its stage's crop policy)."""
    return Path(config["workdir"]) / "latents" / config["dataset"]["name"] / get_run(config, run_id).data_key


def snapshot_steps(total: int, count: int, with_zero: bool) -> list[int]:
    steps = sorted({max(1, round(total * (k + 1) / count)) for k in range(count)})
    return ([0] if with_zero else []) + steps


def lr_at(step: int, base_lr: float, warmup: int, schedule: str = "constant", total_steps: int | None = None,
          min_lr_ratio: float = 0.0) -> float:
    """LR of optimizer step `step` (0-based), a pure function of the step so resume needs no scheduler state.

    Linear warmup base * (step + 1) / warmup for step < warmup; then `constant` (base) or `cosine`:
    base * (r + (1 - r) * (1 + cos(pi * p)) / 2) with p = (step - warmup) / (total_steps - warmup) clamped to
    [0, 1] and r = min_lr_ratio. The cosine depends on the step budget: raising `steps` later reshapes it.
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr_schedule {schedule!r}; valid: constant, cosine")
    if total_steps is None:
        raise ValueError("the cosine schedule needs total_steps")
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total_steps - warmup)))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def ema_decay_at(step: int, target: float) -> float:
    """EMA warm-up: a short run averages over its own length instead of its random initialisation."""
    return min(target, (1 + step) / (10 + step))


def build_run_model(config: dict, run_id: str, latent_shape, num_classes: int, text_dim: int | None = None):
    """The run's architecture at its latent size (MODEL CONTRACT in `ldm.models`).

    Recipe keys reach the model only when they differ from the contract's defaults, so configs and
    checkpoints made before those keys existed build the same model. `text_dim` (the cache's text state
    width) is required for text conditioning. learn_sigma stays off unless `options` turns it on (then the
    ddpm objective trains the sigma head through its VLB term).
    """
    run = get_run(config, run_id)
    recipe = config["recipes"][run.recipe]
    control = None if recipe["control"] == "none" else recipe["control"]
    kwargs = {"control_mode": control, "learn_sigma": False, "class_dropout_prob": recipe["class_dropout"],
              "control_dropout_prob": recipe["control_dropout"]}
    if recipe.get("semantic") is not None:
        kwargs["semantic"] = recipe["semantic"]
    for key in ("qk_norm", "gradient_checkpointing"):
        if recipe.get(key):
            kwargs[key] = True
    for key in ("control_exponents", "control_offsets"):
        if recipe.get(key):
            kwargs[key] = dict(recipe[key])
    if recipe.get("conditioning", "class") == "text":
        if text_dim is None:
            raise ConfigError(f"run {run_id}: recipe {run.recipe!r} is text-conditional but the latent cache "
                              "has no text states (encode it with a text_encoder)")
        kwargs["text_dim"] = int(text_dim)
    kwargs.update(recipe.get("options") or {})
    return build_model(recipe["arch"], recipe["size"], latent_size=latent_shape[-1], in_channels=latent_shape[0],
                       num_classes=num_classes, **kwargs)


def build_run_objective(config: dict, run_id: str):
    """The recipe's objective with the stage's resolution-dependent schedule shift."""
    run = get_run(config, run_id)
    recipe = config["recipes"][run.recipe]
    name = recipe["objective"]
    shift = schedule_shift(config, run)
    if name == "rectified_flow":
        return build_objective(name, shift=shift)
    # `beta_schedule` is read if the recipe has it (the config schema does not define it yet)
    return build_objective(name, resolution_shift=shift, beta_schedule=recipe.get("beta_schedule", "linear"))


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
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    return load_file(str(path)), json.loads(meta["model_config"]), meta


# --- snapshots -------------------------------------------------------------------------------------
#
# Two kinds, same format: evaluated snapshots (`checkpoints/`, at `snapshot_steps`, sampled and scored
# downstream, never pruned) and resume checkpoints (`resume/`, every `checkpoint_every` steps and on
# preemption, only the last `keep_last` kept). A restart resumes from the latest of either.

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


def _global_rng_state() -> dict:
    """This rank's global torch / numpy / python RNG states as JSON (nothing pickled)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state().tolist(),
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}


def _set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_snapshot(directory: Path, step: int, model_state: dict, ema, optimizer_state: dict, generators: dict,
                  data_state: dict, model_config: dict, resume_key: str, extra: dict | None = None,
                  tmp: Path | None = None) -> Path:
    """Write one snapshot atomically (into `tmp`, then renamed). `tmp` may already hold per-rank files."""
    final = directory / f"step-{step:07d}"
    if tmp is None:
        tmp = directory / f".tmp-step-{step:07d}"
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


def list_snapshots(directory: Path) -> list[Path]:
    return sorted((p for p in directory.glob("step-*") if (p / "state.json").exists()),
                  key=lambda p: int(p.name.split("-")[1]))


def latest_snapshot(*directories: Path) -> Path | None:
    """The complete snapshot with the highest step over `directories` (an evaluated one wins a tie)."""
    complete = [p for d in directories for p in list_snapshots(d)]
    return max(complete, key=lambda p: int(p.name.split("-")[1])) if complete else None


def prune_snapshots(directory: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` complete snapshots in `directory` (only call on `resume/`)."""
    doomed = list_snapshots(directory)[:-keep_last] if keep_last > 0 else list_snapshots(directory)
    for path in doomed:
        shutil.rmtree(path)
    return doomed


# --- the loop --------------------------------------------------------------------------------------

class _StopFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM preemption or time limit): finish the step, snapshot, exit."""

    def __init__(self):
        self.raised = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.raised = signal.Signals(signum).name


def make_accelerator(tcfg: dict) -> Accelerator:
    """Accelerator for `training.precision` and `training.distributed`.

    FSDP goes through accelerate's plugin (FSDP2, full state dicts for snapshots). accelerate applies it
    only to multi-accelerator launches (MULTI_GPU and kin): on CPU, with one process or several (gloo), it
    keeps the plugin out and trains plainly or as DDP, so the FSDP code path is untested here.
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # one process may train several runs with different settings
    kwargs = {}
    if tcfg.get("distributed", "ddp") == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(
            fsdp_version=2, state_dict_type="FULL_STATE_DICT", reshard_after_forward=True,
            auto_wrap_policy="size_based_wrap", min_num_params=1_000_000)
    return Accelerator(cpu=not torch.cuda.is_available(),
                       mixed_precision="bf16" if tcfg["precision"] == "bf16" else "no", **kwargs)


def _micro_batches(batch_size: int, world: int, rank: int, grad_accum: int) -> list[slice]:
    """Slices of the global batch for this rank's micro-batches: rank r takes the r-th contiguous share,
    split into `grad_accum` equal parts, so every sample is used exactly once per optimizer step."""
    if batch_size % (world * grad_accum):
        raise ConfigError(f"training.batch_size: {batch_size} is not divisible by {world} process(es) x "
                          f"grad_accum {grad_accum}")
    micro = batch_size // (world * grad_accum)
    first = rank * micro * grad_accum
    return [slice(first + k * micro, first + (k + 1) * micro) for k in range(grad_accum)]


def _mask_generator(seed: int, step: int, offset: int) -> torch.Generator:
    """MDT's token-mask draws for the micro-batch starting at global offset `offset` of step `step`: a pure
    function of the position, so resume, micro-batching and world size do not change which mask a sample gets."""
    return torch.Generator().manual_seed(int(digest([seed, "mask", step, offset]), 16) % (2**63))


def train_run(config: dict, run_id: str, log=print) -> Path:
    run = get_run(config, run_id)
    recipe, stage, tcfg = config["recipes"][run.recipe], config["stages"][run.stage], config["training"]
    out = run_dir(config, run_id)
    snapshots_dir, resume_dir = out / "checkpoints", out / "resume"
    accelerator = make_accelerator(tcfg)
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    fsdp = accelerator.distributed_type.name == "FSDP"
    if tcfg.get("distributed", "ddp") == "fsdp" and not fsdp:
        log(f"{run_id}: training.distributed=fsdp, but accelerate shards only on GPUs/accelerators; this "
            f"run trains as {accelerator.distributed_type.name} on {world} process(es)")
    grad_accum = int(tcfg.get("grad_accum", 1))
    batch_size = tcfg["batch_size"]
    micro_slices = _micro_batches(batch_size, world, rank, grad_accum)

    dataset = LatentDataset(latents_dir(config, run_id))
    count = len(dataset)
    data = dataset.rows()  # memory-mapped: a batch reads its own rows, whatever the cache's size
    latent_shape = data.shapes["mean"]
    num_classes = len(dataset.classes)
    text_conditional = recipe.get("conditioning", "class") == "text"
    text_info = dataset.manifest.get("text_encoder") or {}
    if text_conditional and "text_emb" not in data:
        raise ConfigError(f"run {run_id}: text conditioning needs text states in the latent cache "
                          f"{latents_dir(config, run_id)} (it was encoded without a text encoder)")
    objective = build_run_objective(config, run_id)
    base_lr = stage.get("lr", tcfg["lr"])
    seed = int(digest([config["seed"], run_id]), 16) % (2**63)
    data_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1)
    generators = {"data": data_gen, "noise": noise_gen}
    data_state = {"epoch": 0, "position": 0}
    nonfinite_skips = 0

    init_path = (run_dir(config, run.init_run) / "final.safetensors" if run.init_run
                 else Path(run.init_checkpoint) if run.init_checkpoint else None)
    if init_path is not None and not init_path.exists():
        raise FileNotFoundError(f"run {run_id}: init checkpoint {init_path} is missing "
                                f"(train {run.init_run or 'the run that writes it'} first)")
    # Snapshots are resumed only if they were made by this run definition and init weights; the step
    # budget is left out so that raising `steps` continues a finished run instead of restarting it.
    section = run_section(config, run_id)
    section["stage"] = {k: v for k, v in section["stage"].items() if k != "steps"}
    resume_key = digest([section, weights_digest(init_path) if init_path else None])
    resume = latest_snapshot(snapshots_dir, resume_dir)
    if resume is not None and json.loads((resume / "state.json").read_text()).get("resume_key") != resume_key:
        log(f"{run_id}: snapshots in {out} come from another config or init; starting over")
        accelerator.wait_for_everyone()
        if main:
            shutil.rmtree(snapshots_dir, ignore_errors=True)
            shutil.rmtree(resume_dir, ignore_errors=True)
        accelerator.wait_for_everyone()
        resume = None

    start, optimizer_state = 0, None
    if resume is not None:
        state = json.loads((resume / "state.json").read_text())
        model = model_from_config(state["model_config"])  # as saved: includes a transfer's pos-emb base
        model.load_state_dict(load_file(str(resume / "model.safetensors")))
        ema = load_file(str(resume / "ema.safetensors"))
        optimizer_state = _unflatten_optimizer(load_file(str(resume / "optimizer.safetensors")), state["optimizer"])
        rng = load_file(str(resume / "rng.safetensors"))
        for name, gen in generators.items():
            gen.set_state(rng[f"rng.{name}"])
        if (resume / f"rng-rank{rank}.json").exists():
            _set_global_rng_state(json.loads((resume / f"rng-rank{rank}.json").read_text()))
        data_state = state["data"]
        nonfinite_skips = int(state.get("nonfinite_skips", 0))
        start = state["step"]
        log(f"resuming {run_id} from {resume} (step {start})")
    else:
        torch.manual_seed(seed)  # weight init draws from the global generator: make it the run's own
        model = build_run_model(config, run_id, latent_shape, num_classes, text_dim=text_info.get("dim"))
        if init_path is not None:
            low_state, low_config, _ = load_final(init_path)
            model = transfer_state(low_state, low_config, model, stage["pos_embed"],
                                   semantic=stage.get("semantic_transfer", "keep"), log=log)
            log(f"initialised {run_id} from {init_path} (pos_embed={stage['pos_embed']})")
        ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    model_config = dict(model.config)  # after transfer: sampling must rebuild the same pos-emb
    if objective.kind == "flow" and model_config.get("learn_sigma"):
        raise ConfigError(f"run {run_id}: learn_sigma needs the ddpm objective (rectified flow has no sigma loss)")

    optimizer = _adamw(model, base_lr, tcfg, fsdp)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if optimizer_state is not None:
        _load_optimizer_state(model, optimizer, optimizer_state, fsdp)
    masked = float(model_config.get("mask_ratio", 0) or 0) > 0
    targets = snapshot_steps(stage["steps"], tcfg["snapshots"], with_zero=init_path is not None)
    every = tcfg.get("checkpoint_every")
    stop = _StopFlag()
    log_path = out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    # The epoch's permutation is saved with each snapshot; a fresh run draws the first one here.
    order = torch.tensor(data_state.pop("order")) if "order" in data_state else torch.randperm(count, generator=data_gen)

    def full_state() -> dict:
        """Full (unsharded) model weights; a collective under FSDP (every rank must call it)."""
        if fsdp:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return raw_model.state_dict()

    def snapshot(step: int, evaluated: bool) -> None:
        """Every rank calls this: rank-local RNG files first, then the main process writes and renames."""
        directory = snapshots_dir if evaluated else resume_dir
        model_state, opt_state = full_state(), _optimizer_state(model, optimizer, fsdp)
        tmp = directory / f".tmp-step-{step:07d}"
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        atomic_write_json(tmp / f"rng-rank{rank}.json", _global_rng_state())
        accelerator.wait_for_everyone()
        if main:
            save_snapshot(directory, step, model_state, ema, opt_state, generators,
                          {**data_state, "order": order.tolist()}, model_config, resume_key,
                          extra={"nonfinite_skips": nonfinite_skips, "world_size": world}, tmp=tmp)
            if not evaluated:
                prune_snapshots(resume_dir, tcfg.get("keep_last", 2))
        accelerator.wait_for_everyone()

    if start == 0 and 0 in targets:
        snapshot(0, evaluated=True)

    # The state dict's tensors share storage with the parameters, which the optimizer updates in place:
    # taken once, it stays current (FSDP gathers full weights per step instead).
    weights = None if fsdp else raw_model.state_dict()
    progress = tqdm(range(start, stage["steps"]), initial=start, total=stage["steps"], desc=run_id,
                    file=sys.stderr, mininterval=5, disable=not main)
    window_loss, window_steps, window_t0 = [], 0, time.perf_counter()
    model.train()
    for step in progress:
        # Every rank assembles the whole global batch and makes all of its random draws, in a fixed order
        # (flips + posterior noise, condition dropout, text padding, timesteps + noise), then takes its
        # share: the draws per sample do not depend on world size or grad_accum.
        idx, order = _next_batch(order, data_state, batch_size, count, data_gen)
        batch = data.gather(idx)
        x0, flipped = sample_latents(batch, generator=noise_gen, scaling_factor=dataset.scaling_factor,
                                     shift_factor=dataset.shift_factor)
        control = _flip_control(batch["control"].float(), flipped)
        labels, control_keep = drop_conditions(batch["label"].long(), num_classes=num_classes,
                                               class_dropout_prob=recipe["class_dropout"],
                                               control_dropout_prob=recipe["control_dropout"], generator=noise_gen)
        # the draws above happen either way, so a recipe's batches do not depend on its control setting
        kwargs = {"control": control, "control_keep": control_keep} if model_config.get("control_mode") else {}
        if text_conditional:
            mode = recipe.get("text_padding", "noisy_replicate")
            text, text_mask = pad_tokens(batch["text_emb"].float(), batch["text_len"], mode=mode,
                                         sigma=recipe.get("text_pad_sigma", 0.1), generator=noise_gen)
            kwargs.update(text=text, text_keep=(labels != num_classes).float())  # the class dropout draw
            if mode == "zero_mask":
                kwargs["text_mask"] = text_mask
        else:
            kwargs["class_labels"] = labels
        t_all, noise_all = objective.draw(tuple(x0.shape), noise_gen)
        device = accelerator.device
        lr = lr_at(step, base_lr, tcfg["warmup"], tcfg.get("lr_schedule", "constant"), stage["steps"],
                   tcfg.get("min_lr_ratio", 0.0))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for k, part in enumerate(micro_slices):
            sync = k == grad_accum - 1
            gen = _mask_generator(seed, step, part.start) if masked else None
            with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                with accelerator.autocast():
                    loss = objective.loss(model, x0[part].to(device), {k_: v[part].to(device) for k_, v in kwargs.items()},
                                          gen, draws=(t_all[part], noise_all[part])).mean()
                accelerator.backward(loss / grad_accum if grad_accum > 1 else loss)
            loss_sum = loss_sum + loss.detach().float()
        step_loss = loss_sum / grad_accum
        if world > 1:  # every rank must agree on the mean loss (and so on skipping) and on stopping
            step_loss = accelerator.reduce(step_loss, reduction="mean")
            flag = accelerator.reduce(torch.tensor(float(stop.raised is not None), device=device), reduction="sum")
            if flag.item() > 0 and stop.raised is None:
                stop.raised = "SIGTERM (another rank)"
        done = step + 1
        window_steps += 1
        skipped = not torch.isfinite(step_loss)
        if skipped:
            if nonfinite_skips >= tcfg.get("max_nonfinite_skips", 0):
                last = latest_snapshot(snapshots_dir, resume_dir)
                raise NonFiniteLossError(f"run {run_id}: loss is {step_loss.item()} at step {step}"
                                         f" after {nonfinite_skips} skipped non-finite step(s) (max_nonfinite_skips="
                                         f"{tcfg.get('max_nonfinite_skips', 0)}); last good snapshot kept at {last}")
            nonfinite_skips += 1
            optimizer.zero_grad(set_to_none=True)
            log(f"{run_id}: non-finite loss at step {step}; update skipped ({nonfinite_skips}/"
                f"{tcfg.get('max_nonfinite_skips', 0)})")
        else:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
            optimizer.step()
            decay = ema_decay_at(step, tcfg["ema"])
            current = full_state() if fsdp else None
            if main:  # only the main process writes snapshots, so only it keeps the EMA current
                update_ema(ema, current if fsdp else weights, decay)
            window_loss.append(step_loss.item())
        if (done % 25 == 0 or done == stage["steps"]) and main:
            elapsed = time.perf_counter() - window_t0
            record = {"step": done, "loss": sum(window_loss) / len(window_loss) if window_loss else float("nan"),
                      "grad_norm": float(grad_norm) if not skipped else float("nan"), "lr": lr,
                      "images_per_s": window_steps * batch_size / elapsed,
                      "world_size": world, "grad_accum": grad_accum, "nonfinite_skips": nonfinite_skips}
            with open(log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            window_loss, window_steps, window_t0 = [], 0, time.perf_counter()
        if done in targets:
            snapshot(done, evaluated=True)
        elif stop.raised or (every and done % every == 0):
            snapshot(done, evaluated=False)
        if stop.raised and done < stage["steps"]:
            log(f"{stop.raised}: snapshot at step {done} saved; exiting with {PREEMPTED_EXIT_CODE} to be requeued")
            sys.exit(PREEMPTED_EXIT_CODE)
    final = out / "final.safetensors"
    if main:
        last = latest_snapshot(snapshots_dir, resume_dir)
        ema_final = load_file(str(last / "ema.safetensors"))
        tmp = final.with_name(final.name + ".tmp")
        save_file(ema_final, str(tmp), {"model_config": json.dumps(model_config), "run_id": run_id,
                                        "step": str(stage["steps"]), "run_hash": digest(run_section(config, run_id))})
        tmp.replace(final)
    accelerator.wait_for_everyone()
    return final


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], state: dict[str, torch.Tensor], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights (float32), integer buffers copied. One foreach call per
    operation instead of a Python loop over the tensors (the same arithmetic, so the same bits)."""
    floats = [name for name, value in state.items() if value.dtype.is_floating_point]
    targets = [ema[name] for name in floats]
    torch._foreach_mul_(targets, decay)
    torch._foreach_add_(targets, [state[name].float() for name in floats], alpha=1 - decay)
    for name, value in state.items():
        if not value.dtype.is_floating_point:
            ema[name].copy_(value)


def _adamw(model, lr: float, tcfg: dict, fsdp: bool = False) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (one kernel per parameter instead of about ten element-wise ops:
    4x faster on the tiny default's CPU step; on CUDA the fastest variant too). FSDP's sharded (DTensor)
    parameters keep torch's default implementation."""
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(tcfg["betas"]), weight_decay=tcfg["weight_decay"],
                             fused=None if fsdp else True)


def _optimizer_state(model, optimizer, fsdp: bool) -> dict:
    """Full optimizer state; under FSDP gathered by name (a collective), else the plain indexed state."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def _load_optimizer_state(model, optimizer, state: dict, fsdp: bool) -> None:
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)
def _next_batch(order, data_state, batch_size, count, gen):
    """Next `batch_size` indices, walking epochs of random permutations (drop nothing, wrap epochs)."""
    picked, have = [], 0
    while have < batch_size:
        pos = data_state["position"]
        take = min(batch_size - have, count - pos)
        have += take
        picked.append(order[pos:pos + take])
        data_state["position"] = pos + take
        if data_state["position"] >= count:
            order = torch.randperm(count, generator=gen)
            data_state["epoch"] += 1
            data_state["position"] = 0
    return torch.cat(picked), order


def _flip_control(control: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """Mirroring the crop mirrors its box: crop_left' = orig_w - crop_left - crop_w."""
    control = control.clone()
    mirrored_left = control[:, 1] - control[:, 3] - control[:, 5]
    control[:, 3] = torch.where(flipped.bool(), mirrored_left, control[:, 3])
    return control
