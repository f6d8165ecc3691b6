"""Where everything of a scenario lives on disk: one place for every path, read by stages and Snakemake rules.

`workdir` holds the large, regenerable artifacts (prepared data, latent caches, weights, samples);
`results` the small git/DVC-tracked outputs. Rules build their inputs and outputs from the same methods
the stages write to (with wildcard names such as "{run}" passed through), so a path is spelled once.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: A prepared directory's report (its presence means the directory is complete).
PREPARED_REPORT = "report.json"
#: A latent cache's manifest (written last: its presence means the cache is complete).
CACHE_MANIFEST = "manifest.json"
#: A run's samples index (written last by `ldm sample`).
SAMPLES_INDEX = "index.json"


def data_key(resolution: int | str, crop: str = "center") -> str:
    """Folder name of prepared data and latent caches: `r64` (center crop), `r64-random`."""
    return f"r{resolution}" if crop == "center" else f"r{resolution}-{crop}"


def parse_data_key(key: str) -> tuple[int, str]:
    """Inverse of `data_key`: `r64` -> (64, "center"), `r64-random` -> (64, "random")."""
    px, _, crop = key[1:].partition("-")
    return int(px), crop or "center"


@dataclass(frozen=True)
class RunPaths:
    """The files of one training run: snapshots, resume checkpoints, final EMA weights, samples, log."""

    dir: Path

    @property
    def checkpoints(self) -> Path:
        """Evaluated snapshots (sampled and scored downstream, never pruned)."""
        return self.dir / "checkpoints"

    @property
    def resume(self) -> Path:
        """Resume checkpoints (every `checkpoint_every` steps and on preemption, pruned to `keep_last`)."""
        return self.dir / "resume"

    @property
    def final(self) -> Path:
        return self.dir / "final.safetensors"

    @property
    def log(self) -> Path:
        return self.dir / "log.jsonl"

    @property
    def samples(self) -> Path:
        return self.dir / "samples"

    @property
    def samples_index(self) -> Path:
        return self.samples / SAMPLES_INDEX


@dataclass(frozen=True)
class Layout:
    workdir: Path
    results: Path
    dataset: str
    pretrained_vae: str | None = None

    @classmethod
    def of(cls, config: dict) -> "Layout":
        return cls(Path(config["workdir"]), Path(config["results"]), config["dataset"]["name"],
                   config["autoencoder"]["pretrained"])

    # --- work: data, models, runs ---------------------------------------------------------------------
    @property
    def synthetic(self) -> Path:
        """The synthetic source's folder (`dataset.json`, `folders/` class tree, caption shards)."""
        return self.workdir / "raw" / "synthetic"

    def source(self, source: str) -> str:
        """Where `prepare` reads a dataset source from (the synthetic one is written into the workdir)."""
        return str(self.synthetic / "folders") if source == "synthetic" else source

    def prepared(self, data_key: str) -> Path:
        """Prepared crops of one resolution and crop policy (`r64`, `r64-random`; see `Run.data_key`)."""
        return self.workdir / "prepared" / self.dataset / data_key

    def prepared_report(self, data_key: str) -> Path:
        return self.prepared(data_key) / PREPARED_REPORT

    def latents(self, data_key: str) -> Path:
        return self.workdir / "latents" / self.dataset / data_key

    def latents_manifest(self, data_key: str) -> Path:
        return self.latents(data_key) / CACHE_MANIFEST

    @property
    def vae(self) -> str:
        """The autoencoder: a pretrained path or hub id, else the tiny VAE this scenario trains."""
        return self.pretrained_vae or str(self.trained_vae)

    @property
    def trained_vae(self) -> Path:
        """The tiny VAE trained on this scenario's dataset (keyed by it: datasets sharing a workdir keep theirs)."""
        return self.workdir / "vae" / self.dataset

    @property
    def trained_vae_config(self) -> Path:
        """Written last by `train-vae`: the tiny VAE is complete."""
        return self.trained_vae / "config.json"

    @property
    def evaluator(self) -> Path:
        """The offline evaluator trained on this scenario's dataset (keyed by it, like the VAE)."""
        return self.workdir / "evaluator" / self.dataset

    @property
    def evaluator_config(self) -> Path:
        """Written last by `train-evaluator`: the evaluator is complete."""
        return self.evaluator / "config.json"

    def reference(self, resolution: int | str) -> Path:
        """Evaluator-feature statistics of the prepared real images at one resolution."""
        return self.workdir / "reference" / self.dataset / f"{data_key(resolution)}.npz"

    def inception_reference(self, resolution: int | str, mode: str) -> Path:
        """Inception statistics (protocol `mode`: clean, legacy_tensorflow) of the same real images, written by
        `reference-stats --inception` next to `reference`: `r64.npz` -> `r64.inception-clean.npz`. The name
        `ldm.metrics.inception.inception_reference_path` gives (spelled here too: rules must not import torch)."""
        path = self.reference(resolution)
        return path.with_name(f"{path.stem}.inception-{mode}.npz")

    @property
    def restored_record(self) -> Path:
        """What `ldm artifacts restore` put back after a `dvc pull`, with the config it was made with."""
        return self.workdir / "restored.json"

    def run(self, run_id: str) -> RunPaths:
        return RunPaths(self.workdir / "runs" / run_id)

    def log(self, name: str) -> Path:
        """A job's log file (`train/<run>.log`, `prepare.<key>.log`, ...)."""
        return self.workdir / "logs" / name

    # --- results: small, tracked outputs ----------------------------------------------------------------
    def metrics(self, run_id: str) -> Path:
        return self.results / "metrics" / f"{run_id}.json"

    def sample_grid(self, run_id: str) -> Path:
        """One folder of grids per scenario: DVC shows a folder of images as image plots (dvc.yaml)."""
        return self.results / "plots" / "samples" / f"{run_id}.png"

    @property
    def summary(self) -> Path:
        return self.results / "summary.json"

    def table(self, stem: str) -> Path:
        """A table's path without suffix (written as .md and .csv)."""
        return self.results / "tables" / stem

    def plot(self, name: str) -> Path:
        return self.results / "plots" / name

    @property
    def report(self) -> Path:
        return self.results / "REPORT.md"

    @property
    def artifacts(self) -> Path:
        """What the study shares through DVC (`ldm artifacts export`): one DVC-cached, persisted folder."""
        return self.results / "artifacts"

    @property
    def artifacts_registry(self) -> Path:
        """DVC's model registry of the scenario (a dvc.yaml holding only `artifacts:`)."""
        return self.results / "dvc.yaml"
