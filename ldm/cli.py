"""`ldm`: one command per pipeline stage. Snakemake rules call these; so can a person, by hand.

Errors a user can cause (bad config, missing file, corrupt data, missing weights, NaN loss) end the
command with one line naming the culprit and exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def _config(path: str) -> dict:
    from .config import load_config, validate

    if path.endswith(".json"):
        return validate(json.loads(Path(path).read_text()), source=path)
    return load_config(path)


def cmd_validate_config(args) -> None:
    import yaml

    from .config import ConfigError, expand_runs, study_scenarios

    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = yaml.safe_load(path.read_text())
    is_study = isinstance(raw, dict) and "scenarios" in raw  # config/paper.yaml: several scenarios
    scenarios = study_scenarios(raw, source=str(path)) if is_study else {"": _config(args.config)}
    for name, config in scenarios.items():
        runs = [r.run_id for r in expand_runs(config)]
        label = f"{args.config}" + (f" scenario {name}" if name else "")
        print(f"{label}: ok ({len(runs)} runs: " + ", ".join(runs) + ")")


def cmd_synthesize(args) -> None:
    from .data.synthetic import write_synthetic

    info = write_synthetic(Path(args.out), num_images=args.num_images, seed=args.seed, corrupt=args.corrupt)
    print(f"wrote {args.num_images} synthetic images (+{args.corrupt} corrupt) to {args.out}: classes {info['classes']}")


def cmd_prepare(args) -> None:
    from .prepare import prepare

    report = prepare(args.source, Path(args.out), resolution=args.resolution, crop=args.crop, seed=args.seed,
                     shard_size=args.shard_size)
    print(f"prepared {report['kept']} images at {args.resolution}px into {args.out}; skipped: {report['skipped']}")


def _prepared_dir(config: dict, resolution: int) -> Path:
    return Path(config["workdir"]) / "prepared" / config["dataset"]["name"] / f"r{resolution}"


def cmd_train_vae(args) -> None:
    from .autoencoder import train_tiny_vae
    from .prepare import load_prepared

    _threads(args.threads)
    config = _config(args.config)
    images = [load_prepared(_prepared_dir(config, config["resolutions"][k]))[0] for k in ("low", "high")]
    vcfg = config["autoencoder"]
    result = train_tiny_vae(images, Path(args.out), steps=vcfg["steps"], batch_size=vcfg["batch_size"],
                            lr=vcfg["lr"], seed=config["seed"])
    print(f"tiny VAE written to {args.out}: {result}")


def _rank_world(args) -> tuple[int, int]:
    """--rank/--world-size, else torchrun's RANK/WORLD_SIZE, else a single process."""
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    return rank, world


def cmd_encode(args) -> None:
    from .latents import encode_latents

    _threads(args.threads)
    text = None if args.text_encoder in (None, "none", "null") else args.text_encoder
    rank, world = _rank_world(args)
    if not 0 <= rank < world:  # a launch mistake, not a bug: one line and exit code 2 like other user errors
        print(f"ldm encode: error: rank {rank} not in [0, world size {world})", file=sys.stderr)
        raise SystemExit(2)
    device = args.device
    if device is None and "LOCAL_RANK" in os.environ:  # torchrun: one GPU per local rank
        import torch

        device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
    result = encode_latents(Path(args.prepared), args.vae, Path(args.out), text_encoder=text,
                            batch_size=args.batch_size, shard_size=args.shard_size, device=device,
                            rank=rank, world_size=world)
    run = result["run"]
    who = f"rank {rank}/{world}: " if world > 1 else ""
    print(f"{who}encoded {len(run['encoded'])} shards, reused {len(run['reused'])}")
    for name in run["corrupt"]:
        print(f"{Path(args.out) / name}: sha256 did not match its record (corrupt); re-encoded")
    if result["complete"]:
        print(f"encoded {result['count']} samples into {args.out}")
    else:
        print(f"{args.out}: {len(result['missing'])} of {result['num_shards']} shards still missing "
              "(other ranks); the last rank to finish writes manifest.json")


def cmd_train_evaluator(args) -> None:
    import numpy as np

    from .metrics.evaluator import train_evaluator
    from .prepare import load_prepared

    _threads(args.threads)
    config = _config(args.config)
    images, meta = load_prepared(_prepared_dir(config, config["resolutions"]["high"]))
    classes = json.loads((_prepared_dir(config, config["resolutions"]["high"]) / "report.json").read_text())["classes"]
    attributes = [json.loads(a) for a in meta["attributes"]]
    # an attribute that always equals the class name (the synthetic "shape") would duplicate the class head
    class_names = [classes[y] for y in meta["label"]]
    names = sorted({key for attrs in attributes for key in attrs
                    if any(row.get(key) != name for row, name in zip(attributes, class_names))})
    vocab = {"class": list(classes)}
    labels = {"class": meta["label"].to_numpy().astype(np.int64)}
    for name in names:
        values = sorted({a[name] for a in attributes if name in a})
        vocab[name] = values
        labels[name] = np.array([values.index(a[name]) if name in a else -1 for a in attributes], dtype=np.int64)
    ecfg = config["evaluator"]
    result = train_evaluator(images, labels, vocab, Path(args.out), steps=ecfg["steps"],
                             batch_size=ecfg["batch_size"], seed=config["seed"], input_size=ecfg["input_size"],
                             feature_dim=ecfg["feature_dim"])
    print(f"evaluator written to {args.out}: held-out accuracy {result}")


def cmd_reference_stats(args) -> None:
    from .metrics.evaluator import load_evaluator
    from .metrics.fid import reference_statistics, save_stats
    from .prepare import load_prepared
    from .provenance import file_sha256

    _threads(args.threads)
    images, _ = load_prepared(Path(args.prepared))
    evaluator = load_evaluator(Path(args.evaluator))
    mu, sigma = reference_statistics(images, evaluator)
    report = Path(args.prepared) / "report.json"
    save_stats(Path(args.out), mu, sigma, {"prepared": str(args.prepared), "count": int(len(images)),
                                           "prepared_report_sha256": file_sha256(report),
                                           "evaluator_weights_sha256": file_sha256(Path(args.evaluator) / "model.safetensors")})
    print(f"reference statistics of {len(images)} images written to {args.out}")


def cmd_train(args) -> None:
    from .train import train_run

    _threads(args.threads)
    path = train_run(_config(args.config), args.run)
    if os.environ.get("RANK", "0") == "0":  # one line per job, not per torchrun process
        print(f"run {args.run} finished: {path}")


def cmd_sample(args) -> None:
    from .generate import sample_run

    _threads(args.threads)
    print(f"samples index: {sample_run(_config(args.config), args.run)}")


def cmd_evaluate(args) -> None:
    from .evaluate import evaluate_run

    _threads(args.threads)
    print(f"metrics: {evaluate_run(_config(args.config), args.run)}")


def cmd_report(args) -> None:
    from .report import build_report

    summary = build_report(_config(args.config))
    print(json.dumps(summary, indent=2))


def cmd_models(args) -> None:
    from tabulate import tabulate

    from .models.inventory import inventory

    rows = inventory(args.arch or None, args.size or None)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(tabulate([{**r, "params": f"{r['params'] / 1e6:.1f}M"} for r in rows], headers="keys"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ldm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name, func, help_text, config=False, threads=False):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        if config:
            p.add_argument("--config", required=True, help="scenario YAML (config/*.yaml) or the workflow's config.json")
        if threads:
            p.add_argument("--threads", type=int, default=1, help="torch threads")
        return p

    p = add("validate-config", cmd_validate_config, "check a config against the schema and list its runs")
    p.add_argument("config")
    p = add("synthesize", cmd_synthesize, "write the synthetic shapes dataset (class folders + caption shards)")
    p.add_argument("--out", required=True)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--corrupt", type=int, default=0, help="corrupt files to mix in (prepare must skip them)")
    p.add_argument("--seed", type=int, default=0)
    p = add("prepare", cmd_prepare, "decode, validate, resize and crop images; record control metadata")
    p.add_argument("source", help="class-folder tree, parquet file/dir/glob, or webdataset tar glob")
    p.add_argument("--out", required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--crop", default="center", choices=["center", "random", "random-flip"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000)
    p = add("train-vae", cmd_train_vae, "train the tiny default AutoencoderKL on the prepared images", True, True)
    p.add_argument("--out", required=True)
    p = add("encode", cmd_encode, "write the latent cache (posterior mean/std of crop and flip, text states)",
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
    p = add("train-evaluator", cmd_train_evaluator, "train the offline evaluator on the real prepared images",
            True, True)
    p.add_argument("--out", required=True)
    p = add("reference-stats", cmd_reference_stats, "evaluator feature statistics of a prepared dataset",
            threads=True)
    p.add_argument("--prepared", required=True)
    p.add_argument("--evaluator", required=True)
    p.add_argument("--out", required=True)
    p = add("train", cmd_train, "train one run of the grid (resumes from its latest snapshot; on SIGTERM/SIGUSR1 "
            "it snapshots and exits 75; under torchrun each process trains its share of the global batch)", True, True)
    p.add_argument("--run", required=True)
    p = add("sample", cmd_sample, "sample every snapshot of a run", True, True)
    p.add_argument("--run", required=True)
    p = add("evaluate", cmd_evaluate, "metrics of a run's samples, mean ± std over seeds", True, True)
    p.add_argument("--run", required=True)
    add("report", cmd_report, "tables and plots from the metrics JSONs", True)
    p = add("models", cmd_models, "architectures and sizes: parameters and forward GFLOPs at 256/512 px (meta device)")
    p.add_argument("--json", action="store_true", help="one JSON list, one object per architecture and size")
    p.add_argument("--arch", action="append", help="only this architecture (repeatable)")
    p.add_argument("--size", action="append", help="only this size name (repeatable)")
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug; imported lazily so `ldm --help` stays fast."""
    from .config import ConfigError

    kinds: list[type[BaseException]] = [ConfigError, FileNotFoundError]
    for module, names in (("ldm.prepare", ["EmptyDatasetError"]), ("ldm.latents", ["CorruptShardError"]),
                          ("ldm.autoencoder", ["MissingWeightsError"]), ("ldm.metrics.fid", ["MissingWeightsError"]),
                          ("ldm.metrics.evaluator", ["MissingWeightsError"]), ("ldm.train", ["NonFiniteLossError"])):
        if module in sys.modules:
            kinds.extend(getattr(sys.modules[module], n) for n in names if hasattr(sys.modules[module], n))
    return tuple(kinds)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as exc:  # noqa: BLE001 - re-raised below unless it is a user error
        if isinstance(exc, _user_errors()):
            print(f"ldm {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
