"""`ldm train`: one run of the grid (a recipe at one stage), on accelerate, resumable.

The loop keeps everything that decides the next step in explicit state (model, EMA, optimizer, step,
the data order generator and the noise generator), snapshots it to safetensors + JSON atomically, and
picks up from the latest snapshot when restarted, so a killed or preempted job loses at most the steps
since its last snapshot. The learning rate is a pure function of the step, so no scheduler state exists
to get out of sync on resume.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .config import digest, get_run, run_section, schedule_shift
from .diffusion import build_objective
from .latents import LatentDataset, sample_latents
from .models import build_model, model_from_config
from .models.conditioning import drop_conditions
from .provenance import atomic_replace_dir, atomic_write_json
from .transfer import transfer_state

#: Exit code after a clean stop on SIGTERM/SIGUSR1 (preemption): EX_TEMPFAIL, "try again later".
PREEMPTED_EXIT_CODE = 75


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good snapshot is kept."""


def run_dir(config: dict, run_id: str) -> Path:
    return Path(config["workdir"]) / "runs" / run_id


def latents_dir(config: dict, resolution: int) -> Path:
    return Path(config["workdir"]) / "latents" / config["dataset"]["name"] / f"r{resolution}"


def snapshot_steps(total: int, count: int, with_zero: bool) -> list[int]:
    steps = sorted({max(1, round(total * (k + 1) / count)) for k in range(count)})
    return ([0] if with_zero else []) + steps


def lr_at(step: int, base_lr: float, warmup: int) -> float:
    return base_lr * min(1.0, (step + 1) / warmup) if warmup > 0 else base_lr


def ema_decay_at(step: int, target: float) -> float:
    """EMA warm-up: a short run averages over its own length instead of its random initialisation."""
    return min(target, (1 + step) / (10 + step))


def build_run_model(config: dict, run_id: str, latent_shape, num_classes: int):
    """The run's architecture at its latent size; a transfer run gets its pos-emb base from the init."""
    run = get_run(config, run_id)
    recipe = config["recipes"][run.recipe]
    control = None if recipe["control"] == "none" else recipe["control"]
    # learn_sigma off: the objectives here train the mean (eps/velocity) only, a sigma head would stay untrained.
    return build_model(recipe["arch"], recipe["size"], latent_size=latent_shape[-1], in_channels=latent_shape[0],
                       num_classes=num_classes, control_mode=control, learn_sigma=False,
                       class_dropout_prob=recipe["class_dropout"], control_dropout_prob=recipe["control_dropout"])


def build_run_objective(config: dict, run_id: str):
    """The recipe's objective with the stage's resolution-dependent schedule shift."""
    run = get_run(config, run_id)
    name = config["recipes"][run.recipe]["objective"]
    shift = schedule_shift(config, run)
    return build_objective(name, **({"shift": shift} if name == "rectified_flow" else {"resolution_shift": shift}))


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
    state: dict = {}
    for name, value in list(tensors.items()) + list(extra["scalars"].items()):
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": extra["param_groups"]}


def save_snapshot(directory: Path, step: int, model, ema, optimizer, generators: dict, data_state: dict,
                  model_config: dict, resume_key: str) -> Path:
    final = directory / f"step-{step:07d}"
    tmp = directory / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"model_config": json.dumps(model_config), "step": str(step)}
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"), meta)
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"), meta)
    opt_tensors, opt_extra = _flatten_optimizer(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file({f"rng.{k}": g.get_state() for k, g in generators.items()}, str(tmp / "rng.safetensors"))
    atomic_write_json(tmp / "state.json", {"step": step, "data": data_state, "optimizer": opt_extra,
                                          "model_config": model_config, "resume_key": resume_key})
    atomic_replace_dir(tmp, final)
    return final


def latest_snapshot(directory: Path) -> Path | None:
    complete = [p for p in directory.glob("step-*") if (p / "state.json").exists()]
    return max(complete, key=lambda p: int(p.name.split("-")[1])) if complete else None


def list_snapshots(directory: Path) -> list[Path]:
    return sorted((p for p in directory.glob("step-*") if (p / "state.json").exists()),
                  key=lambda p: int(p.name.split("-")[1]))


# --- the loop --------------------------------------------------------------------------------------

class _StopFlag:
    """Set by SIGTERM/SIGUSR1 (SLURM preemption or time limit): finish the step, snapshot, exit."""

    def __init__(self):
        self.raised = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        self.raised = signal.Signals(signum).name


def train_run(config: dict, run_id: str, log=print) -> Path:
    run = get_run(config, run_id)
    recipe, stage, tcfg = config["recipes"][run.recipe], config["stages"][run.stage], config["training"]
    out = run_dir(config, run_id)
    snapshots_dir = out / "checkpoints"
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              mixed_precision="bf16" if tcfg["precision"] == "bf16" else "no")

    dataset = LatentDataset(latents_dir(config, run.resolution))
    count = len(dataset)
    # per-sample tensors only (the cache also carries its scalar scale/shift factors)
    data = {k: v for k, v in dataset.tensors().items() if v.dim() > 0 and v.shape[0] == count}
    latent_shape = tuple(data["mean"].shape[1:])
    num_classes = len(dataset.classes)
    objective = build_run_objective(config, run_id)
    base_lr = stage.get("lr", tcfg["lr"])
    seed = int(digest([config["seed"], run_id]), 16) % (2**63)
    data_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed + 1)
    generators = {"data": data_gen, "noise": noise_gen}
    data_state = {"epoch": 0, "position": 0}

    init_path = run_dir(config, run.init_run) / "final.safetensors" if run.init_run else None
    if init_path is not None and not init_path.exists():
        raise FileNotFoundError(f"run {run_id}: init checkpoint {init_path} is missing (train {run.init_run} first)")
    # Snapshots are resumed only if they were made by this run definition and init weights; the step
    # budget is left out so that raising `steps` continues a finished run instead of restarting it.
    section = run_section(config, run_id)
    section["stage"] = {k: v for k, v in section["stage"].items() if k != "steps"}
    resume_key = digest([section, weights_digest(init_path) if init_path else None])
    resume = latest_snapshot(snapshots_dir)
    if resume is not None and json.loads((resume / "state.json").read_text()).get("resume_key") != resume_key:
        log(f"{run_id}: snapshots in {snapshots_dir} come from another config or init; starting over")
        shutil.rmtree(snapshots_dir)
        resume = None

    start = 0
    if resume is not None:
        state = json.loads((resume / "state.json").read_text())
        model = model_from_config(state["model_config"])  # as saved: includes a transfer's pos-emb base
        model.load_state_dict(load_file(str(resume / "model.safetensors")))
        ema = load_file(str(resume / "ema.safetensors"))
        optimizer = _adamw(model, base_lr, tcfg)
        optimizer.load_state_dict(_unflatten_optimizer(load_file(str(resume / "optimizer.safetensors")),
                                                       state["optimizer"]))
        rng = load_file(str(resume / "rng.safetensors"))
        for name, gen in generators.items():
            gen.set_state(rng[f"rng.{name}"])
        data_state = state["data"]
        start = state["step"]
        log(f"resuming {run_id} from {resume} (step {start})")
    else:
        torch.manual_seed(seed)  # weight init draws from the global generator: make it the run's own
        model = build_run_model(config, run_id, latent_shape, num_classes)
        if init_path is not None:
            low_state, low_config, _ = load_final(init_path)
            model = transfer_state(low_state, low_config, model, stage["pos_embed"])
            log(f"initialised {run_id} from {init_path} (pos_embed={stage['pos_embed']})")
        ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        optimizer = _adamw(model, base_lr, tcfg)
    model_config = dict(model.config)  # after transfer: sampling must rebuild the same pos-emb

    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    targets = snapshot_steps(stage["steps"], tcfg["snapshots"], with_zero=run.init_run is not None)
    stop = _StopFlag()
    log_path = out / "log.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    # The epoch's permutation is saved with each snapshot; a fresh run draws the first one here.
    order = torch.tensor(data_state.pop("order")) if "order" in data_state else torch.randperm(count, generator=data_gen)

    def snapshot(step):
        save_snapshot(snapshots_dir, step, raw_model, ema, optimizer, generators,
                      {**data_state, "order": order.tolist()}, model_config, resume_key)

    if start == 0 and 0 in targets:
        snapshot(0)

    batch_size = tcfg["batch_size"]
    progress = tqdm(range(start, stage["steps"]), initial=start, total=stage["steps"], desc=run_id,
                    file=sys.stderr, mininterval=5)
    window_loss, window_t0 = [], time.perf_counter()
    model.train()
    for step in progress:
        idx, order = _next_batch(order, data_state, batch_size, count, data_gen)
        batch = {k: v[idx] for k, v in data.items()}
        x0, flipped = sample_latents(batch, generator=noise_gen, scaling_factor=dataset.scaling_factor,
                                     shift_factor=dataset.shift_factor)
        control = _flip_control(batch["control"].float(), flipped)
        labels, control_keep = drop_conditions(batch["label"].long(), num_classes=num_classes,
                                               class_dropout_prob=recipe["class_dropout"],
                                               control_dropout_prob=recipe["control_dropout"], generator=noise_gen)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, base_lr, tcfg["warmup"])
        with accelerator.autocast():
            loss = objective.loss(model, x0, {"class_labels": labels, "control": control,
                                              "control_keep": control_keep}, noise_gen).mean()
        if not torch.isfinite(loss):
            last = latest_snapshot(snapshots_dir)
            raise NonFiniteLossError(f"run {run_id}: loss is {loss.item()} at step {step}; "
                                     f"last good snapshot kept at {last}")
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
        optimizer.step()
        decay = ema_decay_at(step, tcfg["ema"])
        with torch.no_grad():
            for name, value in raw_model.state_dict().items():
                if value.dtype.is_floating_point:
                    ema[name].mul_(decay).add_(value.float(), alpha=1 - decay)
                else:
                    ema[name].copy_(value)
        window_loss.append(loss.item())
        done = step + 1
        if done % 25 == 0 or done == stage["steps"]:
            elapsed = time.perf_counter() - window_t0
            record = {"step": done, "loss": sum(window_loss) / len(window_loss), "grad_norm": float(grad_norm),
                      "lr": optimizer.param_groups[0]["lr"], "images_per_s": len(window_loss) * batch_size / elapsed}
            with open(log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            window_loss, window_t0 = [], time.perf_counter()
        if done in targets or stop.raised:
            snapshot(done)
        if stop.raised and done < stage["steps"]:
            log(f"{stop.raised}: snapshot at step {done} saved; exiting with {PREEMPTED_EXIT_CODE} to be requeued")
            sys.exit(PREEMPTED_EXIT_CODE)
    final = out / "final.safetensors"
    last = latest_snapshot(snapshots_dir)
    ema_final = load_file(str(last / "ema.safetensors"))
    tmp = final.with_name(final.name + ".tmp")
    save_file(ema_final, str(tmp), {"model_config": json.dumps(model_config), "run_id": run_id,
                                    "step": str(stage["steps"]), "run_hash": digest(run_section(config, run_id))})
    tmp.replace(final)
    return final


def _adamw(model, lr: float, tcfg: dict) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(tcfg["betas"]), weight_decay=tcfg["weight_decay"])


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
