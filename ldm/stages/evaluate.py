"""`ldm evaluate`: metrics of every snapshot of a run, mean ± std over sampling seeds, with provenance.

Metrics are named by protocol (`ldm.metrics.registry`) so numbers computed differently never share a column.
The final numbers are the last snapshot's; the curve holds every snapshot. Each image set goes through the
evaluator once (features and predicted classes together). A guidance sweep is scored per scale, the lowest
fd_evaluator's scale recorded as `guidance_sweep.chosen_scale`. A metric that cannot be computed here (CLIP
offline) is skipped with a one-line reason, logged and kept under `skipped`. The record names its instruments
(evaluator and autoencoder weights) so that REPORT.md never compares numbers measured with different ones.

Reference statistics: `fd_evaluator` always uses the evaluator-feature statistics of the prepared real
images (`reference-stats`). The Inception protocols `fid_clean` / `fid_legacy_tf` compare with
`evaluation.reference_stats` (a mu/sigma .npz such as an ADM reference batch) when it is set, else with the
Inception statistics of the prepared images that `reference-stats --inception` cached next to the evaluator
ones (`Layout.inception_reference`), else (no cache: a run by hand) with statistics of the prepared images
computed here once. The Inception runs at 299 px (a few images/s per CPU core), so it scores the final snapshot
only unless `evaluation.inception_snapshots` is `all`, and the first `evaluation.inception_seeds` sampling
seeds (null: all); the record's `inception` says which network, reference, images, seeds and steps. Precision
/ recall use at most `evaluation.pr_real_images` evenly spaced real images (`ldm.metrics.real_subset`, the
record's `precision_recall`); no stage holds all the decoded real images (`ldm.data.prepared.PreparedImages`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checkpoint import load_final
from ..config import load_scenario
from ..data.latent_cache import LatentDataset, vae_sha256
from ..data.prepared import image_chunks
from ..data.prepared import open_prepared as load_prepared  # lazy: (PreparedImages, meta); tests swap in arrays
from ..layout import data_key
from ..metrics.clip_score import ClipUnavailable, load_clip
from ..metrics.consistency import size_consistency
from ..metrics.evaluator import BATCH as EVALUATOR_BATCH
from ..metrics.evaluator import load_evaluator
from ..metrics.fid import load_stats
from ..metrics.inception import PROTOCOLS, inception_network_identity, inception_statistics
from ..metrics.manifold import knn_radii
from ..metrics.real_subset import RealManifold
from ..metrics.registry import (INCEPTION_MODES, PR_K, PR_REAL_IMAGES, ImageSet, Need, compute_metrics,
                                eval_hash_section, metric, protocol_texts)
from ..models.inventory import run_cost
from ..provenance import atomic_write_json, code_version, digest, file_sha256
from ..ranks import Ranks
from ..sample_grid import save_sample_grid
from ..samples import load_set, read_index, read_prompts
from ..spec import Run, Scenario
from ..tracking import log_snapshot_metrics


class _Context:
    """What every image set is compared with, loaded once, on first use: the real images (decoded a chunk at a
    time, never all at once), the precision / recall subset's features and radii (`RealManifold`)."""

    def __init__(self, scenario: Scenario, resolution: int, evaluator, ref_stats, classes: list[str], log,
                 prompts: list[str] | None = None, ranks: Ranks = Ranks()):
        self.scenario, self.config, self.ranks = scenario, scenario.config, ranks
        self.resolution, self.evaluator, self.ref_stats = resolution, evaluator, ref_stats
        self.classes, self.wanted = classes, self.config["evaluation"]["metrics"]
        self._real, self._manifold, self._real_feats, self._real_radii = None, None, None, None
        self.clip, self.skipped = None, {}
        self._inception: dict[str, object] = {}
        unmet = {Need.CLASSES: None if classes else "the data has no classes (caption-only)",
                 Need.PROMPTS: None if prompts is not None else "the run is not text-conditional (no prompts)",
                 Need.CAPTION_TOWER: None if getattr(evaluator, "captions", False) else
                 "the offline evaluator has no caption tower (evaluator.captions)"}
        for name in self.wanted:
            reason = next((why for need, why in unmet.items() if why and need in metric(name).needs), None)
            if reason:
                self.skipped[name] = f"{name} skipped: {reason}"
                log(self.skipped[name])
        self.prompts = prompts
        clip_users = [name for name in self.wanted if Need.CLIP in metric(name).needs and name not in self.skipped]
        if clip_users:
            try:
                self.clip = load_clip(self.config["evaluation"]["clip_model"], ranks.device)
            except ClipUnavailable as exc:
                self.skipped.update(dict.fromkeys(clip_users, str(exc)))
                log(str(exc))
            # every rank scores CLIP or none does: a rank without it would skip collectives the others make
            if not all(ranks.gather(self.clip is not None)) and self.clip is not None:
                self.clip = None
                self.skipped.update(dict.fromkeys(clip_users, "clip_score skipped: CLIP failed to load on another rank"))

    @property
    def real(self):
        """The real prepared images, a `PreparedImages`: read a chunk at a time, never decoded all at once."""
        if self._real is None:
            self._real, _ = load_prepared(self.scenario.layout.prepared(data_key(self.resolution)))
        return self._real

    @property
    def real_features(self) -> np.ndarray:
        """Evaluator features of the precision / recall subset of the real images (`RealManifold`)."""
        if self._real_feats is None:
            cap = self.config["evaluation"].get("pr_real_images", PR_REAL_IMAGES)
            self._manifold = RealManifold(self.real, self.evaluator, cap, PR_K)
            self._real_feats, self._real_radii = self._manifold.features, self._manifold.radii
        return self._real_feats

    @property
    def real_radii(self) -> np.ndarray:
        """Their k-NN radii, computed once per evaluation (not once per image set)."""
        if self._real_radii is None:
            self._real_radii = knn_radii(self.real_features, PR_K)
        return self._real_radii

    @property
    def inception_device(self) -> str:
        """Where the Inception runs: this rank's device (its GPU when there is one, as `reference-stats`)."""
        return str(self.ranks.device)

    def inception_reference(self, mode: str):
        """The Inception reference of clean-fid mode `mode`: `evaluation.reference_stats`, else the statistics
        `reference-stats` cached (`Layout.inception_reference`), both as a path; else (mu, sigma, count) of all
        prepared images, computed once."""
        if mode not in self._inception:
            path = configured_reference(self.config, mode)
            cached = self.scenario.layout.inception_reference(self.resolution, mode)
            if path:
                self._inception[mode] = path
            elif cached.is_file():
                self._inception[mode] = cached
            else:
                self._inception[mode] = inception_statistics(image_chunks(self.real), mode,
                                                             device=self.inception_device)
        return self._inception[mode]

    def scored(self, images: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The evaluator's features and predictions, shared out over the ranks in whole batches."""
        return self.ranks.per_item(lambda x: self.evaluator.features_and_predictions(x, EVALUATOR_BATCH), images,
                                   EVALUATOR_BATCH)

    def metrics(self, images: np.ndarray, labels: np.ndarray, skip=(), wanted=None) -> dict[str, float]:
        """The wanted metrics (default: the config's) of one image set (registry order), from one evaluator pass
        over it; those in `skip` (besides the skipped ones) are left out. Image i's prompt is prompt i (every set
        holds the first images of the run's prompt list)."""
        feats, pred = self.scored(images)
        prompts = None if self.prompts is None else self.prompts[:len(images)]
        return compute_metrics(self, ImageSet(images, labels, feats, pred, prompts),
                               self.wanted if wanted is None else wanted, skip={*self.skipped, *skip})


def _summary(per_seed: dict[str, list[float]]) -> dict:
    return {name: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
                   "per_seed": v} for name, v in per_seed.items()}


def guidance_sweep(ctx: _Context, samples_dir: Path, spec: dict) -> dict:
    """fd_evaluator and cond_accuracy per guidance scale (first seed, final snapshot); best fd chosen."""
    data = load_set(samples_dir, spec)
    fd, acc = [], []
    for scale in spec["scales"]:
        pick = data["scales"] == scale
        values = ctx.metrics(data["images"][pick], data["labels"][pick],
                             wanted=["fd_evaluator", *(["cond_accuracy"] if ctx.classes else [])])
        fd.append(values["fd_evaluator"])
        acc.append(values.get("cond_accuracy"))  # None on caption-only data
    best = int(np.argmin(fd))
    return {"scales": spec["scales"], "fd_evaluator": fd, "cond_accuracy": acc, "chosen_scale": spec["scales"][best],
            "criterion": "lowest fd_evaluator", "seed": spec["seed"], "step": spec["step"]}


def size_consistency_per_seed(ctx: _Context, samples_dir: Path, spec: dict) -> tuple[dict, dict]:
    """size_consistency(_pairwise) per seed, and conditional accuracy per size (mean over seeds)."""
    data = load_set(samples_dir, spec)
    _, pred = ctx.scored(data["images"])
    per_seed, by_size = {}, {}
    for seed in spec["seeds"]:
        rows, labels = [], None
        for size in spec["sizes"]:
            pick = (data["seeds"] == seed) & (data["sizes"] == size)
            order = np.argsort(data["index"][pick], kind="stable")
            rows.append(pred["class"][pick][order])
            labels = data["labels"][pick][order]
        result = size_consistency(np.stack(rows), labels, spec["sizes"])
        for name in ("size_consistency", "size_consistency_pairwise"):
            per_seed.setdefault(name, []).append(result[name])
        for size, value in result["cond_accuracy_by_size"].items():
            by_size.setdefault(size, []).append(value)
    return per_seed, {size: float(np.mean(v)) for size, v in by_size.items()}


def evaluate_run(scenario: Scenario, run: Run, log=print, ranks: Ranks | None = None) -> Path:
    """The run's metrics record. Under torchrun every rank scores its share of each image set on its device
    (evaluator, Inception, CLIP: `Ranks.per_item`, in whole batches, so the same bits as one process); all
    ranks then hold every feature and compute the same metrics, and rank 0 writes the record and the grid."""
    ranks = ranks or Ranks.from_env()
    config, layout, run_id = scenario.config, scenario.layout, run.run_id
    wanted = config["evaluation"]["metrics"]
    samples_dir = layout.run(run_id).samples
    index = read_index(samples_dir)
    evaluator = load_evaluator(layout.evaluator, str(ranks.device))
    ref_file = layout.reference(run.resolution)
    mu, sigma, ref_meta = load_stats(ref_file)
    want, have = ref_meta.get("evaluator_weights_sha256"), evaluator.config.get("weights_sha256")
    if want and have and want != have:
        raise ValueError(f"{ref_file} was computed with another evaluator (weights {want[:12]}, loaded {have[:12]})")
    prompts = read_prompts(samples_dir, index)
    ctx = _Context(scenario, run.resolution, evaluator, (mu, sigma), index["classes"], log, prompts, ranks)
    validation = ValidationLoss(scenario, run, log) if "val_loss" in wanted else None
    if validation is not None and validation.skipped:
        ctx.skipped["val_loss"] = validation.skipped
    settings = config["evaluation"]
    inception = [name for name in wanted if Need.INCEPTION in metric(name).needs]
    inception_used: dict = {"steps": [], "seeds": [], "generated_images": set()}
    curve, final = [], None
    for position, entry in enumerate(index["snapshots"]):
        data = load_set(samples_dir, entry)
        per_seed: dict[str, list[float]] = {}
        # the Inception FIDs where asked for (evaluation.inception_snapshots / inception_seeds), else left out
        scored = inception and (settings["inception_snapshots"] == "all" or position == len(index["snapshots"]) - 1)
        inception_seeds = entry["seeds"][:settings["inception_seeds"]] if scored else []
        for seed in entry["seeds"]:
            pick = data["seeds"] == seed
            values = ctx.metrics(data["images"][pick], data["labels"][pick],
                                 skip=() if seed in inception_seeds else inception)
            for name, value in values.items():
                per_seed.setdefault(name, []).append(value)
            if seed in inception_seeds:
                inception_used["generated_images"].add(int(pick.sum()))
        if inception_seeds:
            inception_used["steps"].append(entry["step"])
            inception_used["seeds"] = list(inception_seeds)
        summary = _summary(per_seed)
        if validation is not None and not validation.skipped:
            # one number per snapshot (no sampling seeds): std 0 by construction, said in the record
            summary["val_loss"] = _summary({"val_loss": [validation.at(entry["step"])["val_loss"]]})["val_loss"]
        curve.append({"step": entry["step"], "num_seeds": len(entry["seeds"]), **{n: s["mean"] for n, s in summary.items()},
                      **{f"{n}_std": s["std"] for n, s in summary.items()}})
        final = (entry, data, summary)
        log(f"{run_id} step {entry['step']}: " + ", ".join(f"{n}={s['mean']:.4f}±{s['std']:.4f}" for n, s in summary.items()))
    entry, data, summary = final
    extra = {}
    for kind in ("guidance_sweep", "guidance_sweep_joint"):  # two-scale, and one joint scale (claim 5)
        if kind in index:
            extra[kind] = sweep = guidance_sweep(ctx, samples_dir, index[kind])
            log(f"{run_id} {kind.replace('_', ' ')}: " + ", ".join(
                f"{g}: fd={f:.3f} acc={a if a is None else round(a, 3)}" for g, f, a in zip(sweep["scales"], sweep["fd_evaluator"],
                                                                 sweep["cond_accuracy"])) + f"; chosen {sweep['chosen_scale']}")
    if "size_consistency" in wanted and "size_consistency" not in ctx.skipped:
        if "size_conditions" in index:
            per_seed, by_size = size_consistency_per_seed(ctx, samples_dir, index["size_conditions"])
            summary.update(_summary(per_seed))
            extra["size_conditions"] = {"sizes": index["size_conditions"]["sizes"], "cond_accuracy_by_size": by_size}
        else:
            ctx.skipped["size_consistency"] = "size_consistency skipped: sampling.size_conditions is empty"
            log(ctx.skipped["size_consistency"])
    out, grid_path = layout.metrics(run_id), layout.sample_grid(run_id)
    if not ranks.main:
        return out
    shown = save_sample_grid(data, index["classes"], grid_path)
    grid = ({"sample_grid_classes": [index["classes"][k] for k in shown]} if index["classes"] else
            {"sample_grid_prompts": [prompts[i] if prompts else None for i in shown]})
    record = {
        "run_id": run_id,
        "recipe": run.recipe, "stage": run.stage, "resolution": run.resolution, "init_run": run.init_run,
        "train_seed": run.train_seed, "run_group": run.group,
        "config_hash": digest(eval_hash_section(scenario.eval_section(run))),  # = the evaluate rule's hash
        "scenario": config["name"], "config_fingerprint": scenario.fingerprint(),
        "code_version": code_version(),
        "protocol": protocol_texts(wanted, run.resolution, config["evaluation"]["clip_model"]),
        "sampler": index["sampler"], "steps": index["steps"], "guidance": index["guidance"],
        "num_samples": index["num_samples"], "seeds": index["seeds"], "original_size": index["original_size"],
        "image_seeds": index.get("image_seeds"), "forward_batch": index.get("forward_batch"),
        "reference": {"file": str(ref_file), "sha256": file_sha256(ref_file), **ref_meta},
        "evaluator_heldout_accuracy": evaluator.config.get("heldout_accuracy"),
        "evaluator_weights_sha256": evaluator.config.get("weights_sha256"),
        "vae_weights_sha256": vae_sha256(scenario.layout.latents(run.data_key)),
        # the run's final EMA weights, as `ldm artifacts` shares them (a run evaluated by hand may have none)
        "weights_sha256": file_sha256(final) if (final := layout.run(run_id).final).is_file() else None,
        "chance_accuracy": 1.0 / len(index["classes"]) if index["classes"] else None,
        "step": entry["step"],
        "metrics": summary,
        **extra,
        **({"precision_recall": ctx._manifold.provenance()} if ctx._manifold is not None else {}),
        "skipped": ctx.skipped,
        "curve": curve,
        "sample_grid": str(grid_path), **grid,
        **({"prompts": index["prompts"]} if "prompts" in index else {}),
        "model": _model_cost(scenario, run, index),
    }
    if validation is not None and not validation.skipped:
        record["val_loss"] = {k: v for k, v in validation.at(entry["step"]).items() if k != "val_loss"}
    if inception:
        record["inception"] = inception_provenance(ctx, inception, inception_used, settings["inception_snapshots"])
        for name, used in record["inception"].items():
            log(f"{run_id} {name}: {used['generated_images']} generated images per seed (seeds {used['seeds']}, "
                f"steps {used['steps']}) vs {used['reference_images']} real images "
                f"({used['reference'].get('file', used['reference']['source'])}), {used['network']['name']}")
    atomic_write_json(out, record)
    log_snapshot_metrics(config["tracking"], layout.run(run_id).dir, curve)  # per snapshot, beside the loss
    return out


class ValidationLoss:
    """val_loss of a run's snapshots (`ldm.metrics.val_loss`): the model and the held-out rows loaded once.
    `skipped` holds the one-line reason when there is nothing to measure it on."""

    def __init__(self, scenario: Scenario, run: Run, log=print):
        from ..metrics.val_loss import validation_loss
        from ..models import model_from_config
        from ..recipe import build_run_objective, validation_inputs

        self.scenario, self.run, self.log, self.skipped, self._done = scenario, run, log, "", {}
        cache = LatentDataset(scenario.layout.latents(run.data_key), verify=False)
        settings = scenario.config["evaluation"]["val_loss"]
        self.rows = cache.split_rows(heldout=True)[: settings["max_images"]]
        if len(self.rows) == 0:
            self.skipped = (f"val_loss skipped: no held-out rows in {cache.dir} (dataset.heldout is 0, or the cache "
                            "was encoded before the split existed)")
            log(self.skipped)
            return
        _, model_config, _ = load_final(scenario.layout.run(run.run_id).final)
        self.model = model_from_config(model_config).eval()
        recipe, objective, num_classes = scenario.recipe(run), build_run_objective(scenario, run), len(cache.classes)
        takes_control = self.model.takes_control

        def make_inputs(batch, pad_generator):
            return validation_inputs(recipe, batch, num_classes, cache.scaling_factor, cache.shift_factor,
                                     takes_control, pad_generator)

        self._measure = lambda: validation_loss(
            self.model, objective, make_inputs, cache.rows(), self.rows, resolution=run.resolution,
            seed=scenario.config["seed"], points=settings["timesteps"], batch_size=settings["batch_size"])

    def at(self, step: int) -> dict:
        """val_loss of the EMA weights of the snapshot at `step` (computed once per step)."""
        if step not in self._done:
            from safetensors.torch import load_file

            from ..checkpoint import list_snapshots, snapshot_step

            paths = self.scenario.layout.run(self.run.run_id)
            snapshot = next(s for s in list_snapshots(paths.checkpoints) if snapshot_step(s) == step)
            self.model.load_state_dict(load_file(str(snapshot / "ema.safetensors")))
            self._done[step] = self._measure()
            self.log(f"{self.run.run_id} step {step}: val_loss={self._done[step]['val_loss']:.5f} "
                     f"({self._done[step]['images']} held-out images)")
        return self._done[step]


def _model_cost(scenario: Scenario, run: Run, index: dict) -> dict:
    """Size and training FLOPs per image of the run's model (REPORT.md's efficiency table), from the
    samples index (samples made before it recorded the model: from the checkpoint and the cache)."""
    if "model_config" in index:
        return run_cost(index["model_config"], tuple(index["latent_shape"]), index.get("text_tokens", 0))
    manifest = LatentDataset(scenario.layout.latents(run.data_key), verify=False).manifest
    _, model_config, _ = load_final(scenario.layout.run(run.run_id).final)
    text_tokens = int((manifest.get("text_encoder") or {}).get("max_length", 0))
    return run_cost(model_config, tuple(manifest["latent_shape"]), text_tokens)


def configured_reference(config: dict, mode: str) -> str | None:
    """The statistics file `evaluation.reference_stats` names for the protocol of clean-fid mode `mode`
    (keyed by metric, so a file declared for one protocol is never used for the other), or None."""
    return (config["evaluation"]["reference_stats"] or {}).get(PROTOCOLS[mode])


def fid_reference(scenario: Scenario, resolution: int, mode: str | None = None) -> dict:
    """What an Inception metric compared with: `evaluation.reference_stats`, or (given its clean-fid `mode`) the
    statistics `reference-stats` cached when they exist, by path and sha256 with their meta; else the prepared
    images."""
    path = configured_reference(scenario.config, mode) if mode is not None else None
    if not path and mode is not None and scenario.layout.inception_reference(resolution, mode).is_file():
        path = scenario.layout.inception_reference(resolution, mode)
    if not path:
        return {"source": "prepared images", "dir": str(scenario.layout.prepared(data_key(resolution)))}
    _, _, meta = load_stats(path)
    return {"source": "statistics file", "file": str(path), "sha256": file_sha256(Path(path)), **meta}


def inception_provenance(ctx: _Context, names: list[str], used: dict, snapshots: str) -> dict:
    """Per Inception metric: the network (name, sha256, file), the reference (`fid_reference`), how many real
    (`reference_images`; None when a statistics file does not say) and generated images (per seed) each FID
    used, and at which sampling seeds and snapshot steps it was computed."""
    counts = sorted(used["generated_images"])
    out = {}
    for name in names:
        mode = INCEPTION_MODES[name]
        ref = ctx.inception_reference(mode)
        if isinstance(ref, tuple):  # computed here from the prepared images
            reference, real, identity = fid_reference(ctx.scenario, ctx.resolution), int(ref[2]), \
                inception_network_identity()
        else:
            reference = fid_reference(ctx.scenario, ctx.resolution, mode)
            real, identity = reference.get("count"), inception_network_identity(reference=reference)
        out[name] = {"mode": mode, "network": identity, "reference": reference, "reference_images": real,
                     "generated_images": counts[0] if len(counts) == 1 else counts, "seeds": used["seeds"],
                     "snapshots": snapshots, "steps": used["steps"]}
    return out


def run(args) -> None:
    scenario = load_scenario(args.config)
    with Ranks.from_env() as ranks:
        out = evaluate_run(scenario, scenario.run(args.run), ranks=ranks)
    print(f"metrics: {out}" if ranks.main else f"rank {ranks.rank}/{ranks.world}: shares scored")

