"""Experiment configs: load, fill defaults, validate against the JSON schema and cross-field rules.

This module is imported by the Snakefile at DAG-build time, so it must stay light (no torch).
A config is one YAML per scenario; defaults are applied here and nowhere else, and `load_scenario` hands
stages the validated config as an `ldm.spec.Scenario` (the grid expanded once into typed runs).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path

import jsonschema
import yaml

from .errors import ConfigError
from .published_recipes import PUBLISHED_RECIPES, own_recipe_defaults
from .spec import SAMPLERS, Scenario, expand_runs, sampler_for

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"

#: Values a config may leave out. Documented in config/default.yaml; "assumed" where the paper is silent.
DEFAULTS: dict = {
    "threads": 1,
    # live training curves beside log.jsonl (ldm.tracking): dvclive, tensorboard; [] for none
    "tracking": ["dvclive"],
    # what `ldm artifacts export` shares through DVC besides weights, evaluator and reference statistics:
    # sample sets and latent caches are large (per image: the PNG; 2 x 4 x (px/8)^2 float32 + text states)
    "artifacts": {"samples": False, "latents": False},
    # Cluster resources per rule; a laptop run ignores them (assumed values for the paper scale live in
    # config/paper.yaml). runtime in minutes.
    "resources": {"default": {"gpus": 0, "nodes": 1, "cpus": 1, "mem_mb": 4000, "runtime": 60}},
    # 5% of the images are never trained on (`ldm.data.split`): what `val_loss` is measured on
    "dataset": {"heldout": 0.05, "random_crops": 4, "synthetic": {"num_images": 1000, "corrupt": 0}},
    "autoencoder": {"pretrained": None, "steps": 600, "batch_size": 32, "lr": 1e-3},
    "text_encoder": "minilm",
    "evaluator": {"steps": 600, "batch_size": 64, "input_size": 64, "feature_dim": 64},
    "training": {
        "batch_size": 32, "lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.0, "warmup": 1000,
        "grad_clip": 1.0, "ema": 0.9999, "snapshots": 4, "precision": "fp32",
        "lr_schedule": "constant", "min_lr_ratio": 0.0, "grad_accum": 1, "checkpoint_every": None,
        "keep_last": 2, "distributed": "ddp", "max_nonfinite_skips": 0,
        # DataLoader workers gathering each rank's rows (`ldm.data.loader`); outside run hashes (`spec.LOADER_KEYS`)
        "loader_workers": 0,
    },
    "sampling": {
        "sampler": "ddim", "steps": 50, "guidance": 1.5, "guidance_control": 1.0,
        "num_samples": 256, "seeds": [0, 1, 2], "original_size": 256, "batch_size": 64,
        "guidance_sweep": [], "guidance_sweep_joint": False, "guidance_interval": None, "size_conditions": [],
        # mDT's power-cosine ramp (`ldm.sampling.guidance_scale`); guided latent channels (None: all)
        "guidance_schedule": "constant", "guidance_power": None, "guidance_channels": None,
        "labels": "balanced",  # class labels of the samples: balanced (i mod K) or random (DiT's sample_ddp.py)
        "aux_samples": None,  # images of intermediate snapshots, sweeps and size conditions (None: num_samples)
    },
    "evaluation": {"metrics": ["fd_evaluator", "cond_accuracy"], "clip_model": None, "reference_stats": None,
                   "protocol": None,  # a named preset (`apply_protocol`)
                   # Inception FIDs (fid_clean, fid_legacy_tf): real images cached (None: all), final snapshot only,
                   # every sampling seed (None); rule hashes leave them out without an Inception metric
                   "inception_max_images": None, "inception_snapshots": "final", "inception_seeds": None,
                   # the MLPerf text-to-image validation: t = (i + 0.5) / timesteps, i < timesteps
                   "val_loss": {"timesteps": 8, "max_images": 1024, "batch_size": 64}},
}
RECIPE_DEFAULTS = {
    "objective": "ddpm", "conditioning": "class", "semantic": None, "control": "additive",
    "control_exponents": {}, "control_offsets": {}, "control_flip": True,
    "text_padding": "noisy_replicate", "text_pad_sigma": 0.1,
    "class_dropout": 0.1, "control_dropout": 0.1, "qk_norm": False, "gradient_checkpointing": False, "options": {},
}
STAGE_DEFAULTS = {"crop": "center", "pos_embed": "interpolate", "schedule_shift": "none"}


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def typed_overrides(overrides: dict) -> dict:
    """`snakemake --config training='{"lr": 0.01}'`: Snakemake reads a nested value with YAML's BaseLoader, so
    every scalar inside it is a string ('0.01'); read those again as a config file's YAML would be read.
    Top-level values are left as Snakemake typed them."""
    def retype(value):
        if isinstance(value, dict):
            return {k: retype(v) for k, v in value.items()}
        if isinstance(value, list):
            return [retype(v) for v in value]
        return yaml.safe_load(value) if isinstance(value, str) and value else value

    return {k: retype(v) if isinstance(v, (dict, list)) else v for k, v in overrides.items()}


def _schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _describe(error: jsonschema.ValidationError) -> str:
    path = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        known = set(error.instance) - set(allowed) if isinstance(error.instance, dict) else set()
        field = ".".join(filter(None, [path, ",".join(sorted(known))]))
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{field}: unknown key{hint}"
    if error.validator == "required":
        return f"{path or '<top level>'}: {error.message}"
    return f"{path or '<top level>'}: {error.message}"


def validate(config: dict, source: str = "config") -> dict:
    """Check `config` against the schema and cross-field rules; return it with defaults filled in."""
    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(f"{source}: {_describe(errors[0])}")
    full = merge(DEFAULTS, config)
    apply_protocol(full, config, source)
    for name, recipe in full["recipes"].items():
        if recipe.get("own_recipe"):  # the architecture's published recipe, under what the config sets itself
            recipe = merge(own_recipe_defaults(recipe["arch"]), recipe)
        full["recipes"][name] = merge(RECIPE_DEFAULTS, recipe)
        sampling = {**full["sampling"], **full["recipes"][name].get("sampling", {})}
        if sampling["guidance_schedule"] == "power_cosine" and sampling["guidance_power"] is None:
            raise ConfigError(f"{source}: recipes.{name}: guidance_schedule 'power_cosine' needs a guidance_power "
                              "(mDT-v2: 4)")
    for name, stage in full["stages"].items():
        full["stages"][name] = merge(STAGE_DEFAULTS, stage)
        init = stage.get("init")
        if init is not None and init not in full["stages"]:
            raise ConfigError(f"{source}: stages.{name}.init: unknown stage {init!r}")
        if init == name:
            raise ConfigError(f"{source}: stages.{name}.init: a stage cannot initialise from itself")
        if init is not None and stage.get("init_checkpoint"):
            raise ConfigError(f"{source}: stages.{name}.init_checkpoint: give either init (a stage) or "
                              "init_checkpoint (a file), not both")
    for name, recipe in full["recipes"].items():
        unknown = [s for s in recipe.get("stages", []) if s not in full["stages"]]
        if unknown:
            raise ConfigError(f"{source}: recipes.{name}.stages: unknown stage(s) {unknown}; "
                              f"defined: {', '.join(full['stages'])}")
        family = SAMPLERS[recipe["objective"]]
        sampler = sampler_for(full, name)
        if sampler not in family:
            where = f"recipes.{name}.sampler" if "sampler" in recipe else "sampling.sampler"
            raise ConfigError(f"{source}: {where}: {sampler!r} cannot sample recipe {name!r} "
                              f"({recipe['objective']}); use one of {', '.join(family)}")
        if recipe["conditioning"] == "text" and full["text_encoder"] in (None, "none"):
            raise ConfigError(f"{source}: recipes.{name}.conditioning: 'text' needs a text_encoder (it is null)")
    _check_study_refs(full, source)
    res = full["resolutions"]
    if res["low"] > res["high"]:
        raise ConfigError(f"{source}: resolutions.low: {res['low']} is above resolutions.high {res['high']}")
    _check_batch_split(full, source)
    errors = sorted(validator.iter_errors(full), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(f"{source}: {_describe(errors[0])}")
    return full


def apply_protocol(full: dict, given: dict, source: str) -> None:
    """`evaluation.protocol`, a named FID protocol. `adm`: DiT's and ADM's (TF Inception with its own resize,
    `fid_legacy_tf`; an ADM reference batch allowed; labels drawn at random as `sample_ddp.py`; DiT and mDT
    guided on 3 latent channels), filled in where the config says nothing and refused where it contradicts;
    `clean`: clean-fid's (`fid_clean`; no ADM batch, which is TF-Inception statistics). Sample count and steps
    stay the config's (50k samples and 250 steps are the paper-scale values: config/paper.yaml, `ldm recipes`)."""
    protocol = full["evaluation"]["protocol"]
    if protocol is None:
        return
    own, other = ("fid_legacy_tf", "fid_clean") if protocol == "adm" else ("fid_clean", "fid_legacy_tf")
    metrics = full["evaluation"]["metrics"]
    if other in metrics:
        raise ConfigError(f"{source}: evaluation.metrics: {other} is not the {protocol} protocol's FID ({own})")
    if other in (full["evaluation"]["reference_stats"] or {}):
        raise ConfigError(f"{source}: evaluation.reference_stats.{other}: not the {protocol} protocol's FID ({own})")
    if own not in metrics:
        full["evaluation"]["metrics"] = [*metrics, own]
    if protocol == "adm":
        if "labels" not in given.get("sampling", {}):
            full["sampling"]["labels"] = "random"
        for recipe in full["recipes"].values():  # the channels each architecture's released sampler guides
            channels = PUBLISHED_RECIPES[recipe["arch"]]["sampling.guidance_channels"].value
            if channels is not None:
                recipe.setdefault("sampling", {}).setdefault("guidance_channels", channels)


def _check_batch_split(config: dict, source: str) -> None:
    """Each stage's global batch (a recipe's own or `training`'s) must split evenly over its processes (GPUs x
    nodes) and micro-batches."""
    accum = config["training"]["grad_accum"]
    for name in config["stages"]:
        for recipe, section in config["recipes"].items():
            own = "batch_size" in (section.get("training") or {})
            field = f"recipes.{recipe}.training.batch_size" if own else "training.batch_size"
            batch = section["training"]["batch_size"] if own else config["training"]["batch_size"]
            res = job_resources(config, "train", name, recipe)
            world = max(int(res.get("gpus", 0)), 1) * int(res.get("nodes", 1))
            if batch % (world * accum):
                whose = f" (recipe {recipe}'s resources)" if section.get("resources") else ""
                raise ConfigError(f"{source}: {field}: {batch} is not divisible by stage {name}'s {world} "
                                  f"process(es){whose} x training.grad_accum {accum}")


def _study_refs(study: dict):
    """(field, recipe/stage) pairs named anywhere in the `study` section."""
    for name, abl in study.get("ablations", {}).items():
        for i, ref in enumerate([abl["baseline"], *abl["variants"]]):
            yield f"study.ablations.{name}", ref
    for ref in study.get("efficiency", {}).get("runs", []):
        yield "study.efficiency.runs", ref
    for claim, items in study.get("claims", {}).items():
        for item in items:
            yield f"study.claims.{claim}", item["baseline"]
            yield f"study.claims.{claim}", item["variant"]


def _check_study_refs(config: dict, source: str) -> None:
    study = config.get("study") or {}
    runs = {(r.recipe, r.stage) for r in expand_runs(config)}
    for field, ref in _study_refs(study):
        recipe, stage = ref.split("/")
        if (recipe, stage) not in runs:
            raise ConfigError(f"{source}: {field}: {ref!r} is not a run of this grid (recipe/stage)")
    arch = study.get("architectures")
    if arch:
        for recipe in arch["recipes"]:
            if recipe not in config["recipes"]:
                raise ConfigError(f"{source}: study.architectures.recipes: unknown recipe {recipe!r}")
        for stage in arch["stages"]:
            if stage not in config["stages"]:
                raise ConfigError(f"{source}: study.architectures.stages: unknown stage {stage!r}")
    draws = [set(d) for d in study.get("draws", [])]
    if sum(map(len, draws)) != len(set().union(*draws)):
        raise ConfigError(f"{source}: study.draws: the draws share a training seed; they must be disjoint")


def job_resources(config: dict, rule: str, stage: str | None = None, recipe: str | None = None) -> dict:
    """A job's resources: `resources.default`, then `resources.<rule>`, then (train) the run's stage's own, then its
    recipe's (a baseline whose own recipe is many times dearer, e.g. PixArt's batch of 11264, gets more nodes)."""
    res = config["resources"]
    out = merge(res.get("default", {}), res.get(rule, {}))
    if rule == "train":
        for section, name in (("stages", stage), ("recipes", recipe)):
            if name is not None:
                out = merge(out, config[section][name].get("resources", {}))
    return out


def launcher(resources: dict, python: str) -> str:
    """How a job (train, sample, evaluate) starts its processes: one process, torchrun on one node, or srun + torchrun.

    Multi-node: srun starts one torchrun per node; the rendezvous host is the job's first node (expanded
    in the job's shell before srun runs). torchrun is started as `ldm.torchrun`, which does not take the job's
    `--run` for an abbreviation of its own `--run-path`."""
    gpus, nodes = int(resources.get("gpus", 0)), int(resources.get("nodes", 1))
    if nodes > 1:
        # the node list from the job id: the SLURM executor runs the job's command with SLURM_* variables removed
        # (SLURM_JOB_ID kept), so $SLURM_JOB_NODELIST is empty there
        head = "$(scontrol show hostnames \"$(squeue -h -j \"$SLURM_JOB_ID\" -o %N)\" | head -n 1)"
        # --kill-on-bad-exit: a node whose torchrun fails takes the others down (not left waiting at a barrier)
        return (f"srun --nodes {nodes} --ntasks-per-node 1 --kill-on-bad-exit=1 {python} -m ldm.torchrun --nnodes {nodes}"
                f" --nproc_per_node {max(gpus, 1)} --rdzv_backend c10d --rdzv_endpoint {head}:29500")
    if gpus > 1:
        return f"{python} -m ldm.torchrun --standalone --nproc_per_node {gpus}"
    return python


def study_scenarios(config: dict, source: str = "config") -> dict[str, dict] | None:
    """A study config (`scenarios:` name -> inline config or YAML path) -> validated scenario configs;
    a plain scenario config is validated and gives None. Scenarios must not share work or results dirs."""
    if "scenarios" not in config:
        validate(config, source=source)
        return None
    extra = sorted(set(config) - {"name", "description", "scenarios"})
    if extra:
        raise ConfigError(f"{source}: {', '.join(extra)}: unknown key in a study config "
                          "(allowed: name, description, scenarios)")
    if not isinstance(config["scenarios"], dict) or not config["scenarios"]:
        raise ConfigError(f"{source}: scenarios: must map scenario names to configs")
    out: dict[str, dict] = {}
    for name, spec in config["scenarios"].items():
        where = f"{source}: scenarios.{name}"
        if isinstance(spec, str):
            out[name] = load_config(spec)
        elif isinstance(spec, dict):
            out[name] = validate(spec, source=where)
        else:
            raise ConfigError(f"{where}: must be a config mapping or a path to one")
    for key in ("name", "workdir", "results"):  # a name keys the environment variable of its stored config
        seen: dict[str, str] = {}
        for name, cfg in out.items():
            if cfg[key] in seen:
                raise ConfigError(f"{source}: scenarios.{name}.{key}: {cfg[key]!r} is also used by {seen[cfg[key]]!r}")
            seen[cfg[key]] = name
    return out


def load_config(path: str | Path) -> dict:
    """Read and validate a YAML/JSON config file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    return validate(read_yaml(path), source=str(path))


def read_yaml(path: str | Path) -> dict:
    """A config file's mapping; a syntax error is one line naming the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return raw


#: Where a Snakemake run keeps the validated configs its jobs read: inside Snakemake's own state folder (a dry
#: run writes nothing elsewhere), one file per content, written once and never rewritten, so a second
#: `snakemake` on the same workdir (a dry run, another config) cannot change what running jobs read.
RESOLVED_CONFIGS = Path(".snakemake") / "ldm-configs"


def store_resolved(config: dict, root: Path = RESOLVED_CONFIGS) -> Path:
    """Write the validated `config` as `<root>/<sha256 of its JSON>.json` unless that file exists; its path.
    Keys keep the YAML's order: run lists, tables and plots follow the order the config gives."""
    text = json.dumps(config, indent=2)
    path = Path(root) / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return path


def resolved_config_variable(workdir: str) -> str:
    """The environment variable through which the jobs of the scenario working in `workdir` find its stored config.
    Jobs get the path from the environment, not from their command text or params: Snakemake reruns a job when
    either changes, and each rule already carries a hash of exactly the config slice it depends on. Named by the
    workdir, which the scenarios of one study never share, and not by the scenario's name: two configs sharing a
    workdir (small.yaml, small_reseed.yaml) then write the same command for the jobs they share, which Snakemake
    would otherwise redo ("code changed") each time the other config runs. The hash keeps names unique."""
    readable = re.sub(r"[^A-Za-z0-9]", "_", str(workdir))[-40:]
    return f"LDM_CONFIG_{readable}_{hashlib.sha256(str(workdir).encode()).hexdigest()[:6]}"


def load_scenario(path: str | Path) -> Scenario:
    """The scenario a stage runs: a config YAML, or the workflow's validated `config.json`."""
    path = Path(path)
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        return Scenario(validate(json.loads(path.read_text()), source=str(path)))
    return Scenario(load_config(path))
