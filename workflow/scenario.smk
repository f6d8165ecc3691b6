# One scenario (one dataset, one grid of recipes x stages): data -> latents -> training -> samples ->
# metrics -> report. Included by the root Snakefile for a single scenario, or loaded once per scenario as a
# Snakemake module for a study of several (config with `scenarios:`), with its rules prefixed by its name.
# Every path comes from `ldm.layout` (the same methods the stages write to), every hash from `ldm.spec`.
import json
import sys
from pathlib import Path

from ldm.config import ConfigError, job_resources, launcher, validate
from ldm.provenance import digest
from ldm.layout import data_key, parse_data_key
from ldm.spec import Scenario

try:
    SCENARIO = Scenario(validate(config, source=config.get("name", "config")))
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None

CFG = SCENARIO.config
L = SCENARIO.layout
RUNS = SCENARIO.runs
LDM = f"{sys.executable} -m ldm.cli"

# Every job reads the validated config from one JSON file; it is rewritten only when its content changes,
# and each rule's `params` carry a hash of exactly the config slice it depends on, so editing one
# recipe reruns that recipe's jobs and nothing else.
# Keys keep the YAML's order (no sort_keys): run lists, tables and plots follow the order the config gives,
# whether a job reads this file or `ldm report --config` (DVC's report stage) reads the YAML.
CONFIG_JSON = L.config_json
_text = json.dumps(CFG, indent=2)
if not CONFIG_JSON.exists() or CONFIG_JSON.read_text() != _text:
    CONFIG_JSON.parent.mkdir(parents=True, exist_ok=True)
    CONFIG_JSON.write_text(_text)


def slurm_resources(rule, run=None):
    """Snakemake resources of a job from the config (`resources.default` < `resources.<rule>` < stage);
    the SLURM executor maps them to sbatch options, a local `--cores` run only uses them for scheduling."""
    res = job_resources(CFG, rule, RUNS[run].stage if run is not None else None)
    out = {"runtime": res["runtime"], "mem_mb": res["mem_mb"], "cpus_per_task": res["cpus"],
           "nodes": res["nodes"], "gpu": res["gpus"]}
    out.update({k: res[k] for k in ("gpu_model", "slurm_partition", "slurm_extra") if k in res})
    return out


def rule_resources(rule):
    """`resources:` keywords for a rule whose jobs all share one setting."""
    return slurm_resources(rule)


def run_resources(key):
    """One resource of a training run, as a per-job callable (stages differ)."""
    return lambda wildcards: slurm_resources("train", wildcards.run)[key]


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
