# One scenario (one dataset, one grid of recipes x stages): data -> latents -> training -> samples ->
# metrics -> report. Included by the root Snakefile for a single scenario, or loaded once per scenario as a
# Snakemake module for a study of several (config with `scenarios:`), with its rules prefixed by its name.
# Every path comes from `ldm.layout` (the same methods the stages write to), every hash from `ldm.spec`.
import os
import re
import shlex
import sys
from pathlib import Path

from ldm.config import ConfigError, job_resources, launcher, resolved_config_variable, store_resolved, validate
from ldm.data.latent_cache import missing_shard_error
from ldm.provenance import digest
from ldm.layout import data_key, parse_data_key
from ldm.spec import Scenario
from ldm.restored import Restored

try:
    SCENARIO = Scenario(validate(config, source=config.get("name", "config")))
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

CFG = SCENARIO.config
L = SCENARIO.layout
RUNS = SCENARIO.runs
# Paths go into shell commands quoted when they need it (a workdir with a space or `$(...)` is a path, not
# code); a shell-safe path, and so the command text Snakemake compares to decide reruns, stays as it was.
# `{...}` are Snakemake's placeholders, formatted before the shell sees the command.
_SHELL_SAFE = re.compile(r"[\w@%+=:,./{}-]+")


def q(path):
    text = str(path)
    return text if _SHELL_SAFE.fullmatch(text) else shlex.quote(text)


_SAFE_DIRS = all(_SHELL_SAFE.fullmatch(str(p)) for p in (L.workdir, L.results))
LOG = "{log}" if _SAFE_DIRS else "{log:q}"
OUTPUT = "{output}" if _SAFE_DIRS else "{output:q}"
LDM = f"{q(sys.executable)} -m ldm.cli"

# Every job reads the validated config from a file named by its content (`ldm.config.store_resolved`, under
# .snakemake/): never rewritten, so two configs on one workdir can never mix, and a dry run writes nothing
# outside .snakemake/. Jobs find it through an environment variable (inherited by local jobs; a SLURM job
# re-parses this file on its node and sets it there), so the rule text and params stay the same across
# config edits: each rule's `params` carry a hash of exactly the config slice it depends on, and editing
# one recipe reruns that recipe's jobs and nothing else.
CONFIG_VARIABLE = resolved_config_variable(CFG["workdir"])
os.environ[CONFIG_VARIABLE] = str(store_resolved(CFG).resolve())
CONFIG_ARG = f'"${CONFIG_VARIABLE}"'  # in a rule's shell command: the path, expanded by the job's shell


def slurm_resources(rule, run=None):
    """Snakemake resources of a job from the config (`resources.default` < `resources.<rule>` < stage < recipe);
    the SLURM executor maps them to sbatch options, a local `--cores` run only uses them for scheduling."""
    res = job_resources(CFG, rule, *((RUNS[run].stage, RUNS[run].recipe) if run is not None else ()))
    out = {"runtime": res["runtime"], "mem_mb": res["mem_mb"], "cpus_per_task": res["cpus"],
           "nodes": res["nodes"], "gpu": res["gpus"],
           # a multi-node job's command starts its own tasks (`launcher`: srun + torchrun, one per node); `mpi` tells
           # the SLURM executor not to wrap the job in `srun -n1` as well, whose step would hold the CPUs the inner
           # srun needs on the first node; it then wants the task count (`tasks`: sbatch --ntasks, one per node).
           # Snakemake drops a None resource.
           **({"mpi": "srun", "tasks": int(res["nodes"])} if int(res["nodes"]) > 1 else {"mpi": None, "tasks": None})}
    out.update({k: res[k] for k in ("gpu_model", "slurm_partition", "slurm_extra") if k in res})
    return out


def rule_resources(rule):
    """`resources:` keywords for a rule whose jobs all share one setting."""
    return slurm_resources(rule)


def run_resources(key):
    """One resource of a training run, as a per-job callable (stages differ)."""
    return lambda wildcards: slurm_resources("train", wildcards.run)[key]


# After `dvc pull` and `ldm artifacts restore` (ldm/stages/artifacts.py): a job whose output was restored and whose
# rule hash is still the one it was made with needs none of its inputs that are not on disk (prepared data, latents:
# never pulled), so Snakemake does not rebuild them; a config edit that changes its hash gives them back.
try:
    RESTORED = Restored.of(L)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None


def unless_restored(output, rule_hash, inputs, complete=lambda wildcards: True):
    """An input function: `inputs` (a value or a function of the wildcards), trimmed as RESTORED says.
    `output(w)` is the job's output path, `rule_hash(scenario, w)` the hash in its params; `complete(w)`: whether
    what the output stands for came back whole (a latent cache's manifest may come back without its shards)."""

    def function(wildcards):
        wanted = inputs(wildcards) if callable(inputs) else inputs
        if RESTORED is None:
            return wanted
        try:
            unchanged = rule_hash(RESTORED.scenario, wildcards) == rule_hash(SCENARIO, wildcards)
        except KeyError:  # a run or resolution the restored config did not have
            unchanged = False
        return RESTORED.inputs(str(output(wildcards)), unchanged and complete(wildcards), wanted)

    return function


wildcard_constraints:
    run="|".join(r.replace(".", r"\.") for r in RUNS),
    res=r"\d+",
    data=r"r\d+(-random|-random-flip)?",


# Each run's final checkpoint is a target too, not only an intermediate: Snakemake does not rebuild a
# deleted intermediate whose consumers are up to date, and a deleted checkpoint must be retrained (from its
# last snapshot) with everything downstream of it.
CHECKPOINTS = [str(L.run(r).final) for r in RUNS]


rule all:
    """The default target: every run trained, evaluated and reported."""
    input:
        str(L.summary),
        CHECKPOINTS,


rule metrics:
    """Every run's metrics JSON: the DVC `pipeline` stage stops here; `report` is DVC's second stage."""
    input:
        [str(L.metrics(r)) for r in RUNS],
        CHECKPOINTS,


include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/report.smk"
