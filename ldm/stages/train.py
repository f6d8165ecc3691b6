"""`ldm train`: one run of the grid (a recipe at one stage), on accelerate, resumable.

The loop keeps everything that decides the next step in explicit state (model, EMA, optimizer, step,
the data order generator and the noise generator), snapshots it (`ldm.checkpoint`) atomically, and
picks up from the latest snapshot when restarted, so a killed or preempted job loses at most the steps
since its last snapshot. The learning rate is a pure function of the step (`ldm.optim`), so no scheduler
state exists to get out of sync on resume.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from ..checkpoint import (
    choose_snapshot,
    export_final,
    latest_snapshot,
    load_final,
    load_snapshot,
    prune_snapshots,
    resume_keys,
    save_snapshot,
    set_global_rng_state,
    snapshot_steps,
    snapshot_tmp,
    write_rank_rng,
)
from ..config import load_scenario
from ..errors import ConfigError, NonFiniteLossError
from ..data.latent_cache import LatentDataset
from ..data.loader import StepBatches
from ..data.loader import next_batch as _next_batch  # noqa: F401 - its tests import it from here
from ..models import model_from_config
from ..optim import adamw, ema_decay_at, load_optimizer_state, lr_at, optimizer_state, update_ema
from ..provenance import digest
from ..recipe import build_run_model, build_run_objective, training_inputs
from ..spec import Run, Scenario
from ..tracking import Trackers
from ..transfer import transfer_state

#: Exit code after a clean stop on SIGTERM/SIGUSR1 (preemption): EX_TEMPFAIL, "try again later".
PREEMPTED_EXIT_CODE = 75
#: Steps between two records of `log.jsonl` (loss, grad norm, lr, throughput).
LOG_EVERY = 25


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
    if tcfg["distributed"] == "fsdp":
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


class Trainer:
    """One run's training: set-up, initialisation or resume, the step, its log record, snapshots, export."""

    def __init__(self, scenario: Scenario, run: Run, log=print):
        self.scenario, self.run, self.log = scenario, run, log
        self.recipe, self.stage, self.tcfg = scenario.recipe(run), scenario.stage(run), scenario.training(run)
        self.paths = scenario.layout.run(run.run_id)
        self.accelerator = make_accelerator(self.tcfg)
        acc = self.accelerator
        self.main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        self.fsdp = acc.distributed_type.name == "FSDP"
        if self.tcfg["distributed"] == "fsdp" and not self.fsdp:
            log(f"{run.run_id}: training.distributed=fsdp, but accelerate shards only on GPUs/accelerators; this "
                f"run trains as {acc.distributed_type.name} on {self.world} process(es)")
        self.grad_accum = int(self.tcfg["grad_accum"])
        self.batch_size = self.tcfg["batch_size"]
        self.micro_slices = _micro_batches(self.batch_size, self.world, self.rank, self.grad_accum)
        self._open_data()
        self.objective = build_run_objective(scenario, run)
        self.base_lr = scenario.base_lr(run)
        self.seed = scenario.run_seed(run)
        self.generators = {"data": torch.Generator().manual_seed(self.seed),
                           "noise": torch.Generator().manual_seed(self.seed + 1)}
        self.data_state = {"epoch": 0, "position": 0}
        self.nonfinite_skips = 0
        self.init_path = self._init_path()
        self.key_section, self.resume_key, self.legacy_key = resume_keys(scenario.run_section(run), self.init_path)

    def _open_data(self) -> None:
        """The run's latent cache, memory-mapped: a batch reads its own rows, whatever the cache's size."""
        cache_dir = self.scenario.layout.latents(self.run.data_key)
        self.dataset = LatentDataset(cache_dir)
        # Training draws positions into the training rows only: held-out rows (val_loss) are never seen. A cache
        # without a split has every row here, and then positions are rows (batches as before the split existed).
        self.train_rows = self.dataset.split_rows(heldout=False)
        self.count = len(self.train_rows)
        if self.count == 0:
            raise ConfigError(f"run {self.run.run_id}: every row of {cache_dir} is held out (dataset.heldout)")
        self.data = self.dataset.rows()
        own = slice(self.micro_slices[0].start, self.micro_slices[-1].stop) if self.world > 1 else None  # rows read
        self.batches = StepBatches(cache_dir, self.train_rows, self.batch_size, own, self.tcfg.get("loader_workers", 0),
                                   pin_memory=self.accelerator.device.type == "cuda")
        self.latent_shape = self.data.shapes["mean"]
        self.num_classes = len(self.dataset.classes)
        self.text_dim = (self.dataset.manifest.get("text_encoder") or {}).get("dim")
        if self.recipe.text_conditional and "text_emb" not in self.data:
            raise ConfigError(f"run {self.run.run_id}: text conditioning needs text states in the latent cache "
                              f"{cache_dir} (it was encoded without a text encoder)")

    def _init_path(self) -> Path | None:
        run = self.run
        path = (self.scenario.layout.run(run.init_run).final if run.init_run
                else Path(run.init_checkpoint) if run.init_checkpoint else None)
        if path is not None and not path.exists():
            raise FileNotFoundError(f"run {run.run_id}: init checkpoint {path} is missing "
                                    f"(train {run.init_run or 'the run that writes it'} first)")
        return path

    # --- initialisation or resume --------------------------------------------------------------------
    def _resume_point(self) -> Path | None:
        """The latest good snapshot of this trajectory (`checkpoint.choose_snapshot`). Only the main process
        verifies, quarantines, moves aside and trims the log; after the barrier every rank sees the same
        latest snapshot."""
        if self.main:
            log = lambda message: self.log(f"{self.run.run_id}: {message}")  # noqa: E731
            choose_snapshot(self.paths, self.key_section, self.legacy_key, log)
        self.accelerator.wait_for_everyone()
        return latest_snapshot(self.paths.checkpoints, self.paths.resume)

    def _initial_state(self):
        """(model, EMA, optimizer state or None, first step): from the latest snapshot, else fresh."""
        resume = self._resume_point()
        if resume is not None:
            saved = load_snapshot(resume, self.rank)
            state = saved["state"]
            model = model_from_config(state["model_config"])  # as saved: includes a transfer's pos-emb base
            model.load_state_dict(saved["model"])
            for name, gen in self.generators.items():
                gen.set_state(saved["generators"][name])
            if saved["global_rng"] is not None:
                set_global_rng_state(saved["global_rng"])
            self.data_state = state["data"]
            self.nonfinite_skips = int(state.get("nonfinite_skips", 0))
            self.log(f"resuming {self.run.run_id} from {resume} (step {state['step']})")
            return model, saved["ema"], saved["optimizer"], state["step"]
        torch.manual_seed(self.seed)  # weight init draws from the global generator: make it the run's own
        model = build_run_model(self.scenario, self.run, self.latent_shape, self.num_classes, text_dim=self.text_dim)
        if self.init_path is not None:
            low_state, low_config, _ = load_final(self.init_path)
            model = transfer_state(low_state, low_config, model, self.stage.pos_embed,
                                   semantic=self.stage.semantic_transfer or "keep", log=self.log)
            self.log(f"initialised {self.run.run_id} from {self.init_path} (pos_embed={self.stage.pos_embed})")
        ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
        return model, ema, None, 0

    # --- snapshots -------------------------------------------------------------------------------------
    def full_state(self) -> dict:
        """Full (unsharded) model weights; a collective under FSDP (every rank must call it)."""
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.raw_model.state_dict()

    def snapshot(self, step: int, evaluated: bool) -> None:
        """Every rank calls this: rank-local RNG files first, then the main process writes and renames."""
        acc, paths = self.accelerator, self.paths
        directory = paths.checkpoints if evaluated else paths.resume
        model_state, opt_state = self.full_state(), optimizer_state(self.model, self.optimizer, self.fsdp)
        tmp = snapshot_tmp(directory, step)
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        write_rank_rng(tmp, self.rank)
        acc.wait_for_everyone()
        if self.main:
            save_snapshot(directory, step, model_state, self.ema, opt_state, self.generators,
                          {**self.data_state, "order": self.batches.order.tolist()}, self.model_config, self.resume_key,
                          extra={"nonfinite_skips": self.nonfinite_skips, "world_size": self.world}, tmp=tmp,
                          resume_section=self.key_section)
            if not evaluated:
                prune_snapshots(paths.resume, self.tcfg["keep_last"])
        acc.wait_for_everyone()

    # --- one optimizer step ----------------------------------------------------------------------------
    def step(self, step: int) -> tuple[torch.Tensor, float]:
        """Forward/backward over this rank's micro-batches of the global batch; returns (mean loss, lr).

        Every rank makes all the random draws of the whole global batch, in a fixed order (flips + posterior
        noise, condition dropout, text padding, timesteps + noise), but reads only its own share of the rows:
        the draws per sample do not depend on world size or grad_accum."""
        acc, tcfg, noise_gen = self.accelerator, self.tcfg, self.generators["noise"]
        x0, kwargs = training_inputs(self.recipe, self.batches.next(), noise_gen, self.num_classes,
                                     self.dataset.scaling_factor, self.dataset.shift_factor,
                                     uses_control=self.raw_model.takes_control)
        t_all, noise_all = self.objective.draw(tuple(x0.shape), noise_gen)
        device = acc.device
        lr = lr_at(step, self.base_lr, tcfg["warmup"], tcfg["lr_schedule"], self.stage.steps,
                   tcfg["min_lr_ratio"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for k, part in enumerate(self.micro_slices):
            sync = k == self.grad_accum - 1
            gen = _mask_generator(self.seed, step, part.start) if self.masked else None
            with acc.no_sync(self.model) if not sync else contextlib.nullcontext():
                with acc.autocast():
                    loss = self.objective.loss(self.model, x0[part].to(device),
                                               {k_: v[part].to(device) for k_, v in kwargs.items()},
                                               gen, draws=(t_all[part], noise_all[part])).mean()
                acc.backward(loss / self.grad_accum if self.grad_accum > 1 else loss)
            loss_sum = loss_sum + loss.detach().float()
        step_loss = loss_sum / self.grad_accum
        if self.world > 1:  # every rank must agree on the mean loss (and so on skipping) and on stopping
            step_loss = acc.reduce(step_loss, reduction="mean")
            flag = acc.reduce(torch.tensor(float(self.stop.raised is not None), device=device), reduction="sum")
            if flag.item() > 0 and self.stop.raised is None:
                self.stop.raised = "SIGTERM (another rank)"
        return step_loss, lr

    def apply_update(self, step: int, step_loss: torch.Tensor):
        """Clip, step and update the EMA; a non-finite loss skips the update (up to max_nonfinite_skips).
        Returns the gradient norm, or None when the update was skipped."""
        tcfg, limit = self.tcfg, self.tcfg["max_nonfinite_skips"]
        if not torch.isfinite(step_loss):
            if self.nonfinite_skips >= limit:
                last = latest_snapshot(self.paths.checkpoints, self.paths.resume)
                raise NonFiniteLossError(f"run {self.run.run_id}: loss is {step_loss.item()} at step {step}"
                                         f" after {self.nonfinite_skips} skipped non-finite step(s) "
                                         f"(max_nonfinite_skips={limit}); last good snapshot kept at {last}")
            self.nonfinite_skips += 1
            self.optimizer.zero_grad(set_to_none=True)
            self.log(f"{self.run.run_id}: non-finite loss at step {step}; update skipped ({self.nonfinite_skips}/"
                     f"{limit})")
            return None
        # grad_clip null (a recipe published without clipping): the norm is still measured and logged
        clip = tcfg["grad_clip"] if tcfg["grad_clip"] is not None else float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        decay = ema_decay_at(step, tcfg["ema"])
        current = self.full_state() if self.fsdp else None
        if self.main:  # only the main process writes snapshots, so only it keeps the EMA current
            update_ema(self.ema, current if self.fsdp else self.weights, decay)
        return grad_norm

    # --- the loop --------------------------------------------------------------------------------------
    def fit(self) -> Path:
        model, self.ema, opt_state, start = self._initial_state()
        self.model_config = dict(model.config)  # after transfer: sampling must rebuild the same pos-emb
        if self.objective.kind == "flow" and model.learns_sigma:
            raise ConfigError(f"run {self.run.run_id}: learn_sigma needs the ddpm objective (rectified flow has no "
                              "sigma loss)")
        optimizer = adamw(model, self.base_lr, self.tcfg, self.fsdp)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.raw_model = self.accelerator.unwrap_model(self.model)
        if opt_state is not None:
            load_optimizer_state(self.model, self.optimizer, opt_state, self.fsdp)
        self.masked = self.raw_model.masks_tokens
        total = self.stage.steps
        targets = snapshot_steps(total, self.tcfg["snapshots"], with_zero=self.init_path is not None)
        every = self.tcfg["checkpoint_every"]
        self.stop = _StopFlag()
        self.paths.dir.mkdir(parents=True, exist_ok=True)
        # The epoch's permutation is saved with each snapshot; a fresh run draws the first one here.
        order = (torch.tensor(self.data_state.pop("order")) if "order" in self.data_state
                 else torch.randperm(self.count, generator=self.generators["data"]))
        self.batches.start(order, self.data_state, self.generators["data"], total - start)  # reads ahead from here
        if start == 0 and 0 in targets:
            self.snapshot(0, evaluated=True)
        # The state dict's tensors share storage with the parameters, which the optimizer updates in place:
        # taken once, it stays current (FSDP gathers full weights per step instead).
        self.weights = None if self.fsdp else self.raw_model.state_dict()
        progress = tqdm(range(start, total), initial=start, total=total, desc=self.run.run_id, file=sys.stderr,
                        mininterval=5, disable=not self.main)
        trackers = Trackers(self.scenario.config["tracking"], self.paths.dir, self.paths.log, start) \
            if self.main else None
        window = _LogWindow(self.paths.log, self.batch_size, self.world, self.grad_accum)
        self.model.train()
        for step in progress:
            step_loss, lr = self.step(step)
            grad_norm = self.apply_update(step, step_loss)
            done = step + 1
            window.add(None if grad_norm is None else step_loss.item())
            if (done % LOG_EVERY == 0 or done == total) and self.main:
                record = window.write(done, grad_norm, lr, self.nonfinite_skips)
                trackers.log(record)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
            if done in targets:
                self.snapshot(done, evaluated=True)
            elif self.stop.raised or (every and done % every == 0):
                self.snapshot(done, evaluated=False)
            if self.stop.raised and done < total:
                self.log(f"{self.stop.raised}: snapshot at step {done} saved; exiting with {PREEMPTED_EXIT_CODE} "
                         "to be requeued")
                sys.exit(PREEMPTED_EXIT_CODE)
        if self.main:
            trackers.close()
            export_final(latest_snapshot(self.paths.checkpoints, self.paths.resume), self.paths.final,
                         self.model_config, self.run.run_id, total, digest(self.scenario.run_section(self.run)))
        self.accelerator.wait_for_everyone()
        return self.paths.final


class _LogWindow:
    """Mean loss and throughput since the last `log.jsonl` record (skipped steps count for throughput)."""

    def __init__(self, path: Path, batch_size: int, world: int, grad_accum: int):
        self.path, self.batch_size, self.world, self.grad_accum = path, batch_size, world, grad_accum
        self._reset()

    def _reset(self) -> None:
        self.losses, self.steps, self.t0 = [], 0, time.perf_counter()

    def add(self, loss: float | None) -> None:
        self.steps += 1
        if loss is not None:
            self.losses.append(loss)

    def write(self, step: int, grad_norm, lr: float, nonfinite_skips: int) -> dict:
        elapsed = time.perf_counter() - self.t0
        record = {"step": step, "loss": sum(self.losses) / len(self.losses) if self.losses else float("nan"),
                  "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "lr": lr,
                  "images_per_s": self.steps * self.batch_size / elapsed,
                  "world_size": self.world, "grad_accum": self.grad_accum, "nonfinite_skips": nonfinite_skips}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._reset()
        return record


def train_run(scenario: Scenario, run: Run, log=print) -> Path:
    return Trainer(scenario, run, log).fit()


def run(args) -> None:
    scenario = load_scenario(args.config)
    path = train_run(scenario, scenario.run(args.run))
    if os.environ.get("RANK", "0") == "0":  # one line per job, not per torchrun process
        print(f"run {args.run} finished: {path}")
