"""The experiment grid as typed, frozen objects: a scenario's recipes, stages and runs, expanded once.

A validated config (`ldm.config.validate`: defaults are applied there and nowhere else) becomes a
`Scenario`: its `Recipe`s and `Stage`s (frozen, every key the schema defines, absent optional keys None),
its `Run`s in training order, and the hash sections that decide when a job reruns. Stages receive a
`Scenario` and a `Run` instead of a `(config, run_id)` pair, so nobody re-expands the grid or restates a
default. Light on purpose (no torch): the Snakefile builds the DAG from it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .layout import Layout, data_key
from .provenance import digest

#: Samplers a config may choose, per objective (the schema's enums are checked against this table).
#: `ldm.sampling` also takes "ddim" for flow, as a synonym of Euler; configs name it "euler".
SAMPLERS: dict[str, tuple[str, ...]] = {"ddpm": ("ddim", "dpm", "ddpm"), "rectified_flow": ("euler",)}
#: `training` keys that decide how the input is read, never which rows a step gets (`ldm.data.loader`): left out of
#: run hashes and the config fingerprint, so setting them reruns nothing and adding their default kept every hash.
LOADER_KEYS = ("loader_workers",)


def from_section(cls, name: str, section: dict):
    """A frozen spec from a validated config section: every field the section has, None for the absent."""
    names = {f.name for f in dataclasses.fields(cls)} - {"name"}
    return cls(name=name, **{key: section.get(key) for key in names})


@dataclass(frozen=True)
class Recipe:
    """One recipe of the grid (`recipes.<name>`): architecture, objective and conditioning mechanisms."""

    name: str
    arch: str
    size: str
    objective: str
    beta_schedule: str | None
    conditioning: str
    semantic: str | None
    control: str
    control_exponents: dict
    control_offsets: dict
    control_flip: bool | None
    text_padding: str
    text_pad_sigma: float
    class_dropout: float
    control_dropout: float
    qk_norm: bool
    gradient_checkpointing: bool
    sampler: str | None
    options: dict
    stages: list | None
    train_seeds: list | None
    own_recipe: bool | None  # filled in by `ldm.config.validate` from `ldm.published_recipes`
    training: dict | None  # this recipe's own training settings (override `training`)
    sampling: dict | None  # this recipe's own sampling settings (override `sampling`)
    resources: dict | None  # this recipe's own train resources (override its stage's)
    schedule_shift: Any  # overrides the stage's (e.g. "none": a baseline that never shifts its schedule)

    @property
    def text_conditional(self) -> bool:
        return self.conditioning == "text"

    @property
    def uses_control(self) -> bool:
        return self.control != "none"


@dataclass(frozen=True)
class Stage:
    """One stage of the grid (`stages.<name>`): resolution, step budget, initialisation and transfer."""

    name: str
    resolution: str
    steps: int
    init: str | None
    init_checkpoint: str | None
    semantic_transfer: str | None
    pos_embed: str
    crop: str
    lr: float | None
    resources: dict | None
    schedule_shift: Any
    sampling: dict | None  # this stage's own sample sets (over the recipe's and `sampling`)


@dataclass(frozen=True)
class Run:
    """One training run of the grid: a recipe trained at one stage (resolution, step budget, init)."""

    run_id: str
    recipe: str
    stage: str
    resolution: int
    init_run: str | None
    init_checkpoint: str | None = None  # a checkpoint from outside this grid (dataset transfer)
    crop: str = "center"
    train_seed: int | None = None  # None: the config has no `train_seeds` (one run, id without a seed suffix)

    @property
    def group(self) -> str:
        """The run id without its training-seed suffix: what tables and verdicts aggregate over."""
        return run_group(self.run_id, self.train_seed)

    @property
    def data_key(self) -> str:
        """Directory of the run's prepared data and latent cache: one per resolution and crop policy
        (`r64`, `r64-random`), so stages at one resolution may crop differently."""
        return data_key(self.resolution, self.crop)


def seeded_id(base: str, train_seed: int | None) -> str:
    """`dit.synthetic.transfer.64` trained with seed 1 is `dit.synthetic.transfer.64.s1`."""
    return base if train_seed is None else f"{base}.s{train_seed}"


def run_group(run_id: str, train_seed: int | None) -> str:
    suffix = f".s{train_seed}"
    return run_id[: -len(suffix)] if train_seed is not None and run_id.endswith(suffix) else run_id


def train_seeds(config: dict, recipe: str) -> list[int | None]:
    """A recipe's training seeds (`recipes.<r>.train_seeds` over the top-level `train_seeds`); [None] when
    neither is set, which keeps the single run of older configs under its old id and seed."""
    seeds = config["recipes"][recipe].get("train_seeds") or config.get("train_seeds")
    return list(seeds) if seeds else [None]


def expand_runs(config: dict) -> list[Run]:
    """All runs of the grid, init stages before the stages they initialise. With training seeds, each run
    is repeated per seed and a seeded stage starts from the init stage's run of the same seed."""
    dataset = config["dataset"]["name"]
    runs = []
    order = _stage_order(config["stages"])
    for recipe, section in config["recipes"].items():
        wanted = _with_inits(config["stages"], section.get("stages") or order)
        for seed in train_seeds(config, recipe):
            for stage in (s for s in order if s in wanted):
                spec = config["stages"][stage]
                px = config["resolutions"][spec["resolution"]]
                init = spec.get("init")
                init_run = None
                if init is not None:
                    init_px = config["resolutions"][config["stages"][init]["resolution"]]
                    init_run = seeded_id(f"{recipe}.{dataset}.{init}.{init_px}", seed)
                checkpoint = spec.get("init_checkpoint")
                if checkpoint and seed is not None:  # another scenario's run of the same seed
                    checkpoint = checkpoint.replace("{train_seed}", str(seed))
                runs.append(Run(seeded_id(f"{recipe}.{dataset}.{stage}.{px}", seed), recipe, stage, px, init_run,
                                checkpoint, spec["crop"], seed))
    return runs


def _with_inits(stages: dict, names) -> set[str]:
    """The named stages plus every stage they initialise from (a transfer needs its pre-training)."""
    out: set[str] = set()
    for name in names:
        while name and name not in out:
            out.add(name)
            name = stages[name].get("init")
    return out


def _stage_order(stages: dict) -> list[str]:
    order: list[str] = []

    def visit(name: str, seen: tuple = ()) -> None:
        if name in order:
            return
        if name in seen:
            raise ConfigError(f"stages.{name}.init: cycle through {' -> '.join(seen + (name,))}")
        init = stages[name].get("init")
        if init:
            visit(init, seen + (name,))
        order.append(name)

    for name in stages:
        visit(name)
    return order


def sampler_for(config: dict, recipe: str) -> str:
    """The sampler of one recipe: its own `sampler`, else `sampling.sampler` (a name, or one per objective)."""
    section = config["recipes"][recipe]
    if "sampler" in section:
        return section["sampler"]
    sampler = config["sampling"]["sampler"]
    if isinstance(sampler, dict):
        return sampler.get(section["objective"], SAMPLERS[section["objective"]][0])
    return sampler


def dvc_source_version(source: str) -> str | None:
    """Content hash DVC recorded for a raw data source (`<source>.dvc`, or `<dir>.dvc` of a glob's folder).

    Rules never take raw files as inputs (a `dvc pull`/`dvc checkout` rewrites them with new mtimes and would
    rerun everything); instead this hash enters the data hash, so only a real content change reruns."""
    if not source or source == "synthetic":
        return None
    path = Path(source)
    candidates = [Path(str(path).rstrip("/") + ".dvc")]
    if any(ch in source for ch in "*?["):
        candidates.append(Path(str(path.parent).rstrip("/") + ".dvc"))
    for pointer in candidates:
        if pointer.is_file():
            outs = (yaml.safe_load(pointer.read_text()) or {}).get("outs") or [{}]
            return str(outs[0].get("md5") or outs[0].get("hash") or "")
    return None


class Scenario:
    """A validated scenario config with its grid expanded once: recipes, stages, runs and hash sections.

    `config` stays the validated dict: the hash sections are digests of its slices, and keeping them on
    the dict keeps every rule hash (and so every finished job) valid across refactors of these objects."""

    def __init__(self, config: dict):
        self.config = config
        self.name: str = config["name"]
        self.recipes = {n: from_section(Recipe, n, s) for n, s in config["recipes"].items()}
        self.stages = {n: from_section(Stage, n, s) for n, s in config["stages"].items()}
        self.runs: dict[str, Run] = {r.run_id: r for r in expand_runs(config)}

    def run(self, run_id: str) -> Run:
        if run_id not in self.runs:
            raise ConfigError(f"unknown run {run_id!r}; the config defines: {', '.join(self.runs)}")
        return self.runs[run_id]

    def recipe(self, run: Run) -> Recipe:
        return self.recipes[run.recipe]

    def stage(self, run: Run) -> Stage:
        return self.stages[run.stage]

    @cached_property
    def layout(self) -> Layout:
        return Layout.of(self.config)

    def sampler(self, run: Run) -> str:
        return sampler_for(self.config, run.recipe)

    def training(self, run: Run) -> dict:
        """`training` with the recipe's own settings over it (a baseline's published optimiser, batch, EMA)."""
        return {**self.config["training"], **(self.recipe(run).training or {})}

    def sampling(self, run: Run) -> dict:
        """`sampling` with the recipe's own settings over it (steps, guidance and its schedule and channels), and
        the stage's over both (which side sets an ablation stage needs: the claims read some only at one stage)."""
        return {**self.config["sampling"], **(self.recipe(run).sampling or {}), **(self.stage(run).sampling or {})}

    def schedule_shift(self, run: Run) -> float:
        """The noise-schedule shift factor (the recipe's `schedule_shift`, else the stage's); `auto` = resolution
        / low resolution (PAPER.md: SD3's t' = a t / (1 + (a - 1) t) for flow with a = sqrt(N'/N) tokens,
        log-SNR - 2 log a for DDPM)."""
        own = self.recipe(run).schedule_shift
        shift = own if own is not None else self.stage(run).schedule_shift
        if shift == "none":
            return 1.0
        if shift == "auto":
            return run.resolution / self.config["resolutions"]["low"]
        return float(shift)

    def base_lr(self, run: Run) -> float:
        """The stage's lr (fine-tuning), else the recipe's own, else `training.lr`."""
        lr = self.stage(run).lr
        return lr if lr is not None else self.training(run)["lr"]

    def data_section(self) -> dict:
        config = self.config
        section = {k: config[k] for k in ("seed", "dataset", "resolutions", "autoencoder", "text_encoder")}
        version = dvc_source_version(config["dataset"]["source"])
        if version is not None:  # only when DVC tracks the source, so other configs keep their hashes
            section["source_dvc_md5"] = version
        return section

    def run_section(self, run: Run) -> dict:
        """Everything that determines a run's weights, including its init chain."""
        config = self.config
        section = {
            "data": self.data_section(),
            # the seed list is not a run's (its own seed is in its id): adding a seed reruns nothing; sampling
            # settings are not its weights' either (they enter the sample and evaluate hashes via `sampling(run)`)
            "recipe": {k: v for k, v in config["recipes"][run.recipe].items()
                       if k not in ("train_seeds", "sampling", "resources")},
            # resources (the stage's, the recipe's) change where a run executes, not its weights
            "stage": {k: v for k, v in config["stages"][run.stage].items() if k not in ("resources", "sampling")},
            "training": {k: v for k, v in config["training"].items() if k not in LOADER_KEYS},
            "run_id": run.run_id,
        }
        if run.init_run:
            section["init"] = self.run_section(self.run(run.init_run))
        return section

    def eval_section(self, run: Run) -> dict:
        config = self.config
        return {"run": self.run_section(run), "sampling": self.sampling(run),
                "evaluation": config["evaluation"], "evaluator": config["evaluator"]}

    def run_seed(self, run: Run) -> int:
        """The run's own 63-bit seed (weight init, data order, noise). Without training seeds: from the scenario
        seed and the run id. With them: from the scenario seed and the training seed alone, so every run of one
        seed draws the same data order and noise (common random numbers: a difference between two recipes
        at one seed is not also a difference between two data orders, which is what makes pairing by seed pay)."""
        if run.train_seed is None:
            return int(digest([self.config["seed"], run.run_id]), 16) % (2**63)
        return int(digest([self.config["seed"], "train_seed", run.train_seed]), 16) % (2**63)

    def fingerprint(self) -> str:
        training = {k: v for k, v in self.config["training"].items() if k not in LOADER_KEYS}
        return digest({**self.config, "training": training})
