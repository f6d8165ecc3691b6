# ldm-recipes: dataset -> latents -> low-res pre-training -> high-res transfer -> samples -> metrics -> report.
# `snakemake --cores 2` runs the embedded default (config/default.yaml); `--configfile` picks another scenario.
# A config with `scenarios:` (config/paper.yaml) is a study of several scenarios (e.g. ImageNet and CC12M):
# each one runs as a Snakemake module with its rules prefixed `<scenario>_`, and a stage may start from
# another scenario's checkpoint (dataset transfer), which links their DAGs through that file.
# Every config is validated (ldm/config.py + workflow/schemas/) before any job is scheduled.
# Priorities: train_vae > encode > train > sample > evaluate, the rest 0, so with few cores the chain that
# ends the pipeline (VAE, latents, pre-training, transfer, its samples and metrics) is never queued behind
# side jobs (evaluator training, reference statistics) that can run beside it (measured on the default:
# the pre-training used to wait 3 min behind them).
import os
import re

import yaml

from ldm.config import ConfigError, merge, study_scenarios, typed_overrides, validate
from ldm.layout import Layout
from ldm.spec import expand_runs

# No `configfile:` directive: Snakemake would deep-merge it under a --configfile, leaking the default's
# recipes into every other scenario. Without --configfile the embedded default is used (plus --config).
if "name" not in config and "scenarios" not in config:
    _overrides = dict(config)
    config.clear()
    config.update(merge(yaml.safe_load(open(workflow.source_path("config/default.yaml"))), _overrides))

config.update(merge(config, typed_overrides(dict(workflow.config_settings.config or {}))))  # --config only

# The SLURM profile (slurm/config.yaml) takes sbatch's account and partition from the environment; a variable
# left unset would reach sbatch as a literal "$NAME" and fail per job, long after the DAG was planned.
_unset = sorted({m for name in ("slurm_account", "slurm_partition")
                 for raw in [getattr((workflow.resource_settings.default_resources or {}).get(name), "raw", None)]
                 if isinstance(raw, str) for m in re.findall(r"\$\{?(\w+)", raw) if m not in os.environ})
if _unset:
    raise WorkflowError(f"the slurm profile needs {' and '.join(_unset)} (sbatch account / partition): export "
                        f"{' '.join(v + '=...' for v in _unset)} and run again")

SOURCE = ", ".join(map(str, getattr(workflow, "overwrite_configfiles", None) or [])) or "config/default.yaml"
try:
    SCENARIOS = study_scenarios(config, SOURCE)
except ConfigError as exc:
    raise WorkflowError(str(exc)) from None


def _targets(cfg, kind):
    """Files that make a scenario complete: its report (`all`) or its metrics (`metrics`), plus checkpoints."""
    runs = [r.run_id for r in expand_runs(cfg)]
    layout = Layout.of(cfg)
    done = [layout.summary] if kind == "all" else [layout.metrics(r) for r in runs]
    return [str(p) for p in done + [layout.run(r).final for r in runs]]


onstart:
    # What only the model code can check (sizes, options, patch grid: ldm.preflight), once per run, before
    # the first job; too slow for every DAG build (it imports the models), which validates the config alone.
    from ldm.preflight import check_models
    from ldm.spec import Scenario

    for _cfg in (SCENARIOS or {"": config}).values():
        try:
            check_models(Scenario(_cfg if SCENARIOS else validate(_cfg, SOURCE)))
        except ConfigError as exc:
            raise WorkflowError(f"{SOURCE}: {exc}") from None


if SCENARIOS is None:
    # `include:` never sets the default target; the scenario's `all` must be it
    workflow.include("workflow/scenario.smk", overwrite_default_target=True)
else:

    rule all:
        """Every scenario of the study trained, evaluated and reported."""
        input:
            [f for cfg in SCENARIOS.values() for f in _targets(cfg, "all")],

    rule metrics:
        """Every scenario's metrics JSONs (the DVC `pipeline` stage)."""
        input:
            [f for cfg in SCENARIOS.values() for f in _targets(cfg, "metrics")],

    for scenario, scenario_config in SCENARIOS.items():
        rule_prefix = f"{scenario}_"

        module:
            name: scenario
            snakefile: "workflow/scenario.smk"
            config: scenario_config

        use rule * from scenario as rule_prefix*
