"""`ldm artifacts export|restore`: the weights of a study shared through DVC, and put back where the DAG wants them.

Why a copy and not the workdir itself: DVC tracks the files and directories dvc.yaml names, and the workdir also
holds resume checkpoints, logs, prepared crops and latent caches nobody should push. `export` gathers what a study
shares into `<results>/artifacts/` (one DVC-cached, persisted output of the `artifacts` stage): every run's final EMA
weights and its evaluated snapshots' EMA weights (what resampling draws from), the tiny VAE, the offline evaluator and the reference statistics; the sample sets and latent caches too
when `artifacts.samples` / `artifacts.latents` ask (they are large). Beside it, `<results>/dvc.yaml` registers each
final weight file under DVC's `artifacts:` (type model, labels recipe / stage / resolution / training seed, a
description with the run id and the hash of everything the weights depend on), so `dvc artifacts get` finds them.

`restore`, after a `dvc pull` into a fresh clone, puts every file back at its workdir path (a hard link when it
can) and records them, with the config they were made with, in `<workdir>/restored.json`. Two things then keep
Snakemake from redoing the study. (1) Snakemake rebuilds a missing file whenever a job in the DAG consumes it, and
the pull brings no prepared data or latents: the workflow's input functions (`Restored.inputs`) drop the inputs
of a job whose output was restored while the job's rule hash is still the one it was made with, so those jobs
need nothing upstream. (2) A fresh clone has no Snakemake records and arbitrary mtimes: `snakemake --touch` marks
the DAG up to date (Snakemake's own records of params and code, mtimes in DAG order). Editing the config afterwards
changes the hash of exactly the jobs the edit concerns (a metric added: evaluation), which get their inputs back and
rerun. It refuses when the config no longer matches the exported one: touching would bless outputs the config did
not produce.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ..config import ConfigError, load_scenario, read_yaml
from ..checkpoint import list_snapshots
from ..layout import CACHE_MANIFEST
from ..provenance import atomic_write_bytes, atomic_write_json, code_version, digest, file_sha256
from ..restored import Restored
from ..spec import Scenario

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
#: What sampling reads of a snapshot (`checkpoint.list_snapshots` wants state.json); not the optimiser or RNG state
SNAPSHOT_FILES = ("ema.safetensors", "state.json")
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-/]*[a-z0-9])?$")  # what DVC accepts as an artifact name


def artifact_name(run_id: str) -> str:
    """DVC artifact names allow lower-case letters, digits, dashes and slashes; a run id becomes letters, digits
    and dashes: `dit.synthetic.pretrain.32.s0` -> `dit-synthetic-pretrain-32-s0`."""
    name = re.sub(r"[^a-z0-9]+", "-", run_id.lower()).strip("-")
    if not _NAME.fullmatch(name):
        raise ConfigError(f"run {run_id!r}: no valid DVC artifact name can be made of it")
    return name


def shared_files(scenario: Scenario) -> list[tuple[str, Path]]:
    """(kind, workdir path) of every file a study shares, in DAG order (upstream first)."""
    layout, config = scenario.layout, scenario.config
    wanted = config["artifacts"]
    files: list[tuple[str, Path]] = []

    def tree(kind: str, root: Path, last: str | None = None) -> None:
        """Every file under `root`; `last` (the file whose presence marks the folder complete) at the end."""
        found = sorted(p for p in root.rglob("*") if p.is_file() and p.name != last and not p.name.endswith(".tmp"))
        files.extend((kind, p) for p in found + ([root / last] if last else []))

    if not config["autoencoder"]["pretrained"]:
        tree("vae", layout.trained_vae, layout.trained_vae_config.name)
    tree("evaluator", layout.evaluator, layout.evaluator_config.name)
    for res in sorted({run.resolution for run in scenario.runs.values()}):
        files.extend(("reference", p) for p in sorted(layout.reference(res).parent.glob(f"{layout.reference(res).stem}*.npz")))
    for key in sorted({run.data_key for run in scenario.runs.values()}):
        if wanted["latents"]:
            tree("latents", layout.latents(key), CACHE_MANIFEST)
        else:  # the manifest alone (classes, latent shape, scaling): what sampling a class-conditional run reads
            files.append(("latents_manifest", layout.latents_manifest(key)))
    for run_id in scenario.runs:
        # the evaluated snapshots' EMA weights and state: what `ldm sample` draws from (the curve's points)
        for snapshot in list_snapshots(layout.run(run_id).checkpoints):
            files.extend(("snapshot", snapshot / name) for name in SNAPSHOT_FILES)
        files.append(("model", layout.run(run_id).final))
        if wanted["samples"]:
            samples = layout.run(run_id).samples
            files.extend(("samples", p) for p in sorted(samples.glob("*")) if p.is_file() and p != layout.run(run_id).samples_index)
            files.append(("samples", layout.run(run_id).samples_index))
    return files


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link when both sides share a file system (no second copy of the weights), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def config_identity(config_path: str) -> str:
    """The hash of the config as written (not as validated: a code update that adds a default must not make a
    pulled study look as if another config had made it)."""
    return digest(read_yaml(config_path))


def export(scenario: Scenario, config_path: str) -> dict:
    """Gather the shared files into `<results>/artifacts/` with their manifest, and write the registry."""
    layout = scenario.layout
    out = layout.artifacts
    shared = shared_files(scenario)
    missing = [str(path) for _, path in shared if not path.is_file()]
    if missing:
        raise ConfigError(f"{missing[0]}: not there to export ({len(missing)} missing); run the pipeline first")
    entries = []
    for kind, path in shared:
        relative = path.relative_to(layout.workdir)
        _link_or_copy(path, out / relative)
        entries.append({"kind": kind, "path": str(relative), "bytes": path.stat().st_size,
                        "sha256": file_sha256(path)})
    kept = {str(out / e["path"]) for e in entries} | {str(out / MANIFEST)}
    for stale in [p for p in out.rglob("*") if p.is_file() and str(p) not in kept]:
        stale.unlink()  # a run no longer in the grid, an opt-in turned off
    for folder in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    manifest = {"scenario": scenario.config["name"], "config": config_identity(config_path),
                "code_version": code_version(), "files": entries,
                "models": [_model_entry(scenario, run_id) for run_id in scenario.runs]}
    atomic_write_json(out / MANIFEST, manifest)
    atomic_write_bytes(layout.artifacts_registry, _registry(scenario, manifest).encode())
    return manifest


def _model_entry(scenario: Scenario, run_id: str) -> dict:
    run = scenario.runs[run_id]
    return {"name": artifact_name(run_id), "run": run_id, "recipe": run.recipe, "stage": run.stage,
            "resolution": run.resolution, "train_seed": run.train_seed,
            "path": str(scenario.layout.run(run_id).final.relative_to(scenario.layout.workdir)),
            "weights_hash": digest(scenario.run_section(run))}


def _registry(scenario: Scenario, manifest: dict) -> str:
    """DVC's model registry for this scenario: `<results>/dvc.yaml` holding only `artifacts:`."""
    artifacts_dir = scenario.layout.artifacts.relative_to(scenario.layout.results)
    registry = {}
    for model in manifest["models"]:
        labels = [f"recipe={model['recipe']}", f"stage={model['stage']}", f"resolution={model['resolution']}"]
        if model["train_seed"] is not None:
            labels.append(f"train_seed={model['train_seed']}")
        registry[model["name"]] = {
            "path": f"{artifacts_dir}/{model['path']}", "type": "model", "labels": labels,
            "desc": f"final EMA weights of run {model['run']} (scenario {manifest['scenario']}, "
                    f"weights hash {model['weights_hash']}, config hash {manifest['config']})"}
    header = ("# Written by `ldm artifacts export` (the `artifacts` stage of the root dvc.yaml): DVC's model registry "
              "of this scenario.\n# `dvc artifacts get <repo> <this folder>:<name>` downloads one run's final EMA weights.\n")
    return header + yaml.safe_dump({"artifacts": registry}, sort_keys=False)


def restore(scenario: Scenario, config_path: str, snakefile: Path, cores: int) -> int:
    """Put pulled files back at their workdir paths, then `snakemake --touch` the DAG; returns files placed."""
    layout = scenario.layout
    manifest_path = layout.artifacts / MANIFEST
    if not manifest_path.is_file():
        raise ConfigError(f"{manifest_path}: no exported artifacts here; `dvc pull` them first")
    manifest = json.loads(manifest_path.read_text())
    if manifest["config"] != config_identity(config_path):
        raise ConfigError(f"{config_path}: differs from the config the artifacts in {layout.artifacts} were exported "
                          f"with (hash {manifest['config']}, now {config_identity(config_path)}); restore with that "
                          "config, then edit it: Snakemake reruns what the edit concerns")
    if manifest["code_version"] != code_version():
        log.warning("the artifacts were exported by code %s, this is %s: a rule whose hash the code changed is "
                    "touched as up to date; `snakemake -n --forceall` lists the jobs to rerun by hand",
                    manifest["code_version"], code_version())
    for entry in manifest["files"]:
        source = layout.artifacts / entry["path"]
        if not source.is_file() or source.stat().st_size != entry["bytes"]:
            raise ConfigError(f"{source}: missing or of another size than exported; run `dvc pull` again")
        _link_or_copy(source, layout.workdir / entry["path"])
    # the metrics records the clone holds in git are outputs made with this config too (the evaluate jobs')
    results = [str(layout.metrics(r)) for r in scenario.runs if layout.metrics(r).is_file()]
    Restored.write(layout, read_yaml(config_path), results + [str(layout.workdir / e["path"]) for e in manifest["files"]])
    # this interpreter's Snakemake: its path reaches the rules' commands, which Snakemake compares (`ldm` and
    # `snakemake` as console scripts share one; `python -m ldm.cli` pairs with `python -m snakemake`)
    command = [sys.executable, "-m", "snakemake", "--snakefile", str(snakefile), "--configfile", config_path,
               "--cores", str(cores), "--touch", "--forceall", "--quiet", "all"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ConfigError(f"snakemake --touch failed after restoring the files: {tail[0]}")
    return len(manifest["files"])


def run(args) -> None:
    scenario = load_scenario(args.config)
    if args.action == "export":
        manifest = export(scenario, args.config)
        size = sum(e["bytes"] for e in manifest["files"])
        print(f"exported {len(manifest['files'])} files ({size / 2**20:.1f} MiB, {len(manifest['models'])} models) "
              f"to {scenario.layout.artifacts}; registry {scenario.layout.artifacts_registry}")
    else:
        placed = restore(scenario, args.config, Path(args.snakefile), args.cores)
        print(f"restored {placed} files into {scenario.layout.workdir}; Snakemake's DAG marked up to date")
