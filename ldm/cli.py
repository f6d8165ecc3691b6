"""`ldm`: one command per pipeline stage. Snakemake rules call these; so can a person, by hand.

Errors a user can cause (bad config, missing file, corrupt data, missing weights, NaN loss) end the
command with one line naming the culprit and exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")


#: what OpenMP and the BLAS under numpy and scipy (OpenBLAS, MKL) size their thread pools by, read once as each loads
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _threads(n: int) -> None:
    """`--threads n` bounds every pool a stage computes in: torch's and the BLAS's. The float64 linear algebra of
    the FIDs changes in its last bits with the BLAS thread count, so a stage run by hand must use the count
    Snakemake gives its jobs (it sets these variables to the job's threads). Set before torch, numpy or scipy is
    imported: each library reads them when it loads."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(n)
    import torch

    torch.set_num_threads(n)


def _stage(name: str):
    """A parser default that runs `ldm.stages.<name>.run(args)`, importing the stage only when chosen, so
    `ldm --help` and the light commands stay fast."""

    def call(args) -> None:
        import importlib

        if getattr(args, "threads", None) is not None:
            _threads(args.threads)
        importlib.import_module(f"ldm.stages.{name}").run(args)

    return call


class _CurrentStderr(logging.StreamHandler):
    """A handler writing to whatever `sys.stderr` is when a record is emitted (test runners and callers that
    redirect it keep receiving the lines), not to the stream of the moment it was made."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; the current stderr is used instead
        pass


def _version() -> str:
    """The installed package version and the hash of its source files (what metrics records call code_version)."""
    from importlib.metadata import PackageNotFoundError, version

    from .provenance import code_version

    try:
        installed = version("ldm-recipes")
    except PackageNotFoundError:
        installed = "not installed"
    return f"ldm {installed} (code {code_version()})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=_version())
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="the package's debug lines too")
    loudness.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only (no progress lines)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, help_text, config=False, threads=False):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=_stage(name.replace("-", "_")))
        if config:
            p.add_argument("--config", required=True, help="scenario YAML (config/*.yaml) or the workflow's config.json")
        if threads:
            p.add_argument("--threads", type=int, default=1, help="torch threads")
        return p

    p = add("validate-config", "check a config against the schema and list its runs")
    p.add_argument("config")
    p = add("synthesize", "write the synthetic shapes dataset (class folders + caption shards)")
    p.add_argument("--out", required=True)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--corrupt", type=int, default=0, help="corrupt files to mix in (prepare must skip them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--world", default="simple", choices=["simple", "rich"],
                   help="simple: independent attributes; rich: class-dependent sizes, chiral shapes, varied captions "
                        "(docs/synthetic-world.md)")
    p.add_argument("--layout", default="default", choices=["default", "imagenet", "cc12m"],
                   help="default: the pipeline's class folders + caption shards; imagenet: an ILSVRC-style train/val "
                        "tree; cc12m: img2dataset webdataset tars without classes (both from the rich world)")
    p.add_argument("--classes", type=int, default=1000, help="imagenet layout: synsets")
    p.add_argument("--val-per-class", type=int, default=1, help="imagenet layout: validation images per synset")
    p = add("prepare", "decode, validate, resize and crop images; record control metadata")
    p.add_argument("source", help="class-folder tree, parquet file/dir/glob, or webdataset tar glob")
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--crop", default="center", choices=["center", "random", "random-flip"])
    p.add_argument("--crops", type=int, default=1, help="random crops per image, each its own row (random policies)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes on this node (the same files as one; the prepare rule passes its cpus)")
    p.add_argument("--rank", type=int, default=None, help="this task's rank (default: env RANK or 0)")
    p.add_argument("--world-size", type=int, default=None,
                   help="tasks sharing the work, part j to rank j %% W (default: env WORLD_SIZE or 1)")
    p = add("check-data", "what the study needs of prepared data (classes, captions, duplicates); one line if not")
    p.add_argument("prepared", help="a prepared directory (the output of `ldm prepare`)")
    p.add_argument("--min-classes", type=int, default=2, help="fewer classes leave nothing to condition on")
    p.add_argument("--captions", action="store_true", help="a text-conditional recipe trains on it: captions needed")
    p.add_argument("--out", required=True, help="the check's record (JSON), written only when every check holds")
    p = add("init-config", "write a scenario config for your own dataset (its own name, workdir and results)")
    p.add_argument("--source", required=True, help="class-folder tree, parquet file/dir/glob, or webdataset tar glob")
    p.add_argument("--name", required=True, help="scenario name (letters, digits, _): names workdir and results")
    p.add_argument("--template", default="config/default.yaml", help="the config whose recipes and stages to copy")
    p.add_argument("--out", default=None, help="where to write it (default: config/<name>.yaml)")
    p = add("train-vae", "train the tiny default AutoencoderKL on the prepared images", True, True)
    p.add_argument("--out", required=True)
    p = add("encode", "write the latent cache (posterior mean/std of crop and flip, text states)",
            threads=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--vae", required=True, help="AutoencoderKL directory or hub id")
    p.add_argument("--out", required=True)
    p.add_argument("--text-encoder", default="minilm", help="minilm | CLIP/T5 path | none")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1000, help="rows per cache shard (the unit of resume)")
    p.add_argument("--rank", type=int, default=None, help="this process's rank (default: env RANK or 0)")
    p.add_argument("--world-size", type=int, default=None,
                   help="processes sharing the work, shard k to rank k %% W (default: env WORLD_SIZE or 1)")
    p.add_argument("--device", default=None, help="torch device (default: cuda:LOCAL_RANK / cuda / cpu)")
    p.add_argument("--heldout", type=float, default=0.0,
                   help="fraction of images held out of training (by a hash of seed and image key; dataset.heldout)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split (the config's seed)")
    p = add("train-evaluator", "train the offline evaluator on the real prepared images",
            True, True)
    p.add_argument("--out", required=True)
    p = add("reference-stats", "evaluator feature statistics of a prepared dataset (and, with --inception, its "
            "Inception statistics next to them)", threads=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--evaluator", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--inception", action="append", choices=["clean", "legacy_tensorflow"],
                   help="also write the Inception statistics of this clean-fid mode (fid_clean: clean, fid_legacy_tf: "
                        "legacy_tensorflow) to <out stem>.inception-<mode>.npz (repeatable)")
    p.add_argument("--inception-max-images", type=int, default=None,
                   help="at most this many real images in the Inception statistics, evenly spaced (default: all)")
    p.add_argument("--device", default=None, help="torch device of the Inception (default: cuda if available, else cpu)")
    p = add("train", "train one run of the grid (resumes from its latest snapshot; on SIGTERM/SIGUSR1 "
            "it snapshots and exits 75; under torchrun each process trains its share of the global batch)", True, True)
    p.add_argument("--run", required=True)
    p = add("sample", "sample every snapshot of a run", True, True)
    p.add_argument("--run", required=True)
    p = add("evaluate", "metrics of a run's samples, mean ± std over seeds", True, True)
    p.add_argument("--run", required=True)
    add("report", "tables and plots from the metrics JSONs", True)
    p = add("artifacts", "export: gather final weights, VAE, evaluator and reference statistics into <results>/artifacts "
            "for DVC (and register the weights); restore: after `dvc pull`, put them back and mark the DAG up to date", True)
    p.add_argument("action", choices=["export", "restore"])
    p.add_argument("--snakefile", default="Snakefile", help="restore: the workflow whose DAG to mark up to date")
    p.add_argument("--cores", type=int, default=1, help="restore: cores for `snakemake --touch`")
    p = add("models", "architectures and sizes: parameters and forward GFLOPs at 256/512 px (meta device)")
    p.add_argument("--json", action="store_true", help="one JSON list, one object per architecture and size")
    p.add_argument("--arch", action="append", help="only this architecture (repeatable)")
    p.add_argument("--size", action="append", help="only this size name (repeatable)")
    p = add("plan", "what a scenario or study costs before it runs: FLOPs and accelerator-hours per rule, the "
            "costliest jobs, and jobs that cannot finish within their runtime")
    p.add_argument("config")
    p.add_argument("--mfu", type=float, default=None, help="model FLOP utilisation (default: the DiT-XL/2 step's "
                   "in benchmarks/results/gpu.json when a GPU run wrote it, else 0.35, assumed)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="peak TFLOP/s of one accelerator (H100 bf16: 989)")
    p.add_argument("--images", action="append", help="dataset size for encode: N, or SCENARIO=N (repeatable)")
    p.add_argument("--attempts", type=int, default=None, help="allocations a resumable job (train, sample) may take "
                   "(default: 1 + the `retries` of the slurm/ profile)")
    p = add("recipes", "each architecture's own published recipe (training, sampling, guidance), every value with "
            "its source or why it is assumed")
    p.add_argument("--arch", action="append", help="only this architecture (repeatable)")
    p.add_argument("--assumed", action="store_true", help="only the values no source states")
    p.add_argument("--json", action="store_true", help="one JSON list, one object per value")
    return parser


def main(argv: list[str] | None = None) -> int:
    # the package's own log lines (progress of encode, training, evaluation) go to stderr, where Snakemake's
    # per-job log files collect them; other libraries keep their own levels
    package = logging.getLogger("ldm")
    if not package.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        package.addHandler(handler)
    args = build_parser().parse_args(argv)
    package.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO)
    try:
        args.func(args)
    except (UserError, FileNotFoundError) as exc:  # bad input, not a bug: one line naming the culprit
        print(f"ldm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
