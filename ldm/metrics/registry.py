"""The one list of metrics: name, protocol text, direction, plotting, REPORT.md order, needs, computation.

Every other place that knows about metrics reads this module: the config schema's `evaluation.metrics`
enum (checked by tests/test_metric_registry.py), `ldm.stages.evaluate` (what an image set is scored on and the
protocol texts of a record), `ldm.stages.report` (directions, curve plots) and `ldm.study` (directions, REPORT.md
columns). A name that is not here raises `UnknownMetricError`: no metric silently gets a default direction.

Adding a metric is one `MetricSpec` in `METRICS` (plus its compute function, and the schema enum). Metrics
computed jointly share a `group` and one compute function returning all of them (precision + recall from
one pair of k-NN manifolds). `size_consistency` needs the size-condition samples rather than one image set,
so it has no per-image-set compute function (`ldm.stages.evaluate.size_consistency_per_seed` computes it);
`size_consistency_pairwise` comes out of the same computation and cannot be selected on its own.

`METRICS` is ordered as the schema enum, which is also the order an image set's values are computed and
logged in and the order of the curve plots; REPORT.md has its own order (`report_rank`: distances first).
Compute functions import the metric modules on call, so `ldm report` does not load torch through here.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from ..errors import UserError

__all__ = ["PR_K", "Need", "ImageSet", "ProtocolInputs", "MetricSpec", "METRICS", "UnknownMetricError", "metric",
           "lower_is_better", "better_sign", "direction_word", "selectable_names", "curve_metrics",
           "report_order", "protocol_texts", "compute_metrics", "INCEPTION_MODES", "INCEPTION_SETTINGS",
           "inception_modes", "eval_hash_section", "PR_REAL_IMAGES"]

PR_K = 3  # k of the k-NN manifolds of precision / recall (Kynkäänniemi et al. 2019)


class Need(str, enum.Enum):
    """What a metric reads besides the generated images (what evaluation has to load for it)."""

    FEATURES = "evaluator features of the samples"
    PREDICTIONS = "evaluator-predicted classes of the samples"
    REFERENCE_STATS = "evaluator-feature statistics of the real images (reference-stats)"
    REAL_FEATURES = "evaluator features of the real prepared images (at most evaluation.pr_real_images)"
    CLIP = "a CLIP model (evaluation.clip_model)"
    INCEPTION = "clean-fid's Inception and an Inception reference"
    SIZE_CONDITIONS = "samples of one noise at every sampling.size_conditions size"
    MODEL = "the snapshot's EMA weights and the held-out rows of the latent cache"
    CLASSES = "classes in the data (caption-only data has none)"
    PROMPTS = "the prompt each sample was generated from (text-conditional runs)"
    CAPTION_TOWER = "the offline evaluator's caption tower (evaluator.captions)"


@dataclass(frozen=True)
class ImageSet:
    """One set of generated images (one seed of one snapshot) with its single evaluator pass."""

    images: np.ndarray  # uint8 N×H×W×3
    labels: np.ndarray  # conditioning class per image
    features: np.ndarray  # evaluator features, N×F
    predictions: dict  # evaluator predictions, {"class": (N,)}
    prompts: list | None = None  # the prompt of each image (text-conditional runs), else None


class EvalContext(Protocol):
    """What compute functions read from the evaluation (`ldm.stages.evaluate._Context`); loaded lazily there."""

    ref_stats: tuple
    real_features: np.ndarray  # of the precision / recall subset of real images (`ldm.metrics.real_subset`)
    clip: Any
    classes: list[str]
    evaluator: Any  # the offline evaluator (its caption tower for caption_score / caption_accuracy)

    def inception_reference(self, mode: str) -> Any: ...  # the Inception reference of one clean-fid mode

    # optional: `inception_device` (where the Inception runs), `ranks` (`ldm.ranks.Ranks`: per-image work shared),
    # `real_radii` (the k-NN radii of `real_features`, computed once per evaluation)


def _per_image(ctx: EvalContext, fn, items, batch: int):
    """`fn(items)`, its per-image work shared out over the context's ranks when it has several (same bits)."""
    ranks = getattr(ctx, "ranks", None)
    return fn(items) if ranks is None else ranks.per_item(fn, items, batch)


@dataclass(frozen=True)
class ProtocolInputs:
    """Everything a protocol text depends on, so the same setting always gives the same text."""

    resolution: int
    clip_model: str | None
    k: int = PR_K


Compute = Callable[[EvalContext, ImageSet], dict]


@dataclass(frozen=True)
class MetricSpec:
    """One metric. `compute` returns {name: value} for every metric of its `group` (None: not computed per
    image set, see `Need.SIZE_CONDITIONS`); `report_rank` orders REPORT.md's columns (None: not there)."""

    name: str
    lower_is_better: bool
    protocol: Callable[[ProtocolInputs], str]
    needs: frozenset
    compute: Compute | None
    group: str = ""  # metrics computed by one call; "" = the metric alone
    curve: bool = True  # plotted against the training step (computed at every snapshot)
    report_rank: int | None = None
    selectable: bool = True  # may be named in evaluation.metrics (False: a by-product of its group)

    @property
    def group_name(self) -> str:
        return self.group or self.name


# ------------------------------------------------------------------------------------------ compute functions
def _fd_evaluator(ctx: EvalContext, s: ImageSet) -> dict:
    from .fid import feature_statistics, frechet_distance

    return {"fd_evaluator": frechet_distance(*feature_statistics(s.features), *ctx.ref_stats)}


def _cond_accuracy(ctx: EvalContext, s: ImageSet) -> dict:
    from .evaluator import cond_accuracy

    return {"cond_accuracy": float(cond_accuracy(s.predictions, {"class": s.labels})["class"])}


def _precision_recall(ctx: EvalContext, s: ImageSet) -> dict:
    from .manifold import precision_recall

    return precision_recall(ctx.real_features, s.features, getattr(ctx, "real_radii", None), k=PR_K)


def _clip_score(ctx: EvalContext, s: ImageSet) -> dict:
    from .clip_score import BATCH, class_captions, clip_score

    captions = s.prompts if s.prompts is not None else class_captions(s.labels, ctx.classes)
    scores = _per_image(ctx, lambda rows: clip_score(s.images[rows], [captions[i] for i in rows], *ctx.clip),
                        np.arange(len(s.images)), BATCH)
    return {"clip_score": float(scores.mean())}


def _caption_match(ctx: EvalContext, s: ImageSet) -> dict:
    from .evaluator import BATCH, caption_pair_accuracy, derangement

    def similarity(captions):
        return _per_image(ctx, lambda rows: ctx.evaluator.caption_similarity(s.images[rows], [captions[i] for i in rows]),
                          np.arange(len(s.images)), BATCH)

    own = similarity(s.prompts)
    other = similarity([s.prompts[j] for j in derangement(len(s.prompts))])
    return {"caption_score": float(100.0 * np.clip(own, 0, None).mean()),
            "caption_accuracy": caption_pair_accuracy(own, other)}


#: Inception metric -> clean-fid mode (`ldm.metrics.inception.PROTOCOLS` is its inverse; tests/test_metric_registry.py)
INCEPTION_MODES = {"fid_clean": "clean", "fid_legacy_tf": "legacy_tensorflow"}
#: `evaluation` keys that only the Inception metrics read (`eval_hash_section`)
INCEPTION_SETTINGS = ("inception_max_images", "inception_snapshots", "inception_seeds")
#: real images in the precision / recall manifold when `evaluation.pr_real_images` is not set (not in
#: ldm.config.DEFAULTS: a filled-in key would enter every evaluate hash); every image of the toy configs
PR_REAL_IMAGES = 10_000


def inception_modes(metrics: Iterable[str]) -> list[str]:
    """The clean-fid modes that the metric names `metrics` ask for, in registry order (for the rules, which must
    not import `ldm.metrics.inception`: torch)."""
    wanted = set(metrics)
    return [mode for name, mode in INCEPTION_MODES.items() if name in wanted]


def eval_hash_section(section: dict) -> dict:
    """`Scenario.eval_section` as the evaluate rule hashes it (and as a record's `config_hash` states it): the
    Inception settings (`INCEPTION_SETTINGS`) are left out of its `evaluation` when no Inception metric is wanted,
    since they change nothing then, so configs without Inception metrics keep the hashes they had before these
    settings existed (no rerun of existing work directories). `pr_real_images` (set only where a config sets it)
    is left out unless precision or recall is wanted and it differs from `PR_REAL_IMAGES`: it changes nothing
    then either."""
    evaluation = section["evaluation"]
    wanted = set(evaluation.get("metrics", ()))
    drop = set() if inception_modes(wanted) else set(INCEPTION_SETTINGS)
    if not wanted & {"precision", "recall"} or evaluation.get("pr_real_images", PR_REAL_IMAGES) == PR_REAL_IMAGES:
        drop.add("pr_real_images")
    if not drop & set(evaluation):
        return section
    return {**section, "evaluation": {k: v for k, v in evaluation.items() if k not in drop}}


def _inception_fid(mode: str, name: str) -> Compute:
    def compute(ctx: EvalContext, s: ImageSet) -> dict:
        from . import inception

        # the reference of this protocol: the statistics file configured for it, else the cached npz
        # `reference-stats` wrote (`ldm.metrics.inception.inception_reference_path`), else the prepared images
        ref = ctx.inception_reference(mode)
        device = getattr(ctx, "inception_device", None) or "cpu"
        feats = _per_image(ctx, lambda x: inception.inception_features(x, mode, device=device, reference=ref),
                           s.images, inception.BATCH)
        return {name: float(inception.inception_fid(None, ref, mode=mode, device=device, gen_features=feats))}

    compute.__name__ = f"_inception_fid_{mode}"
    return compute


def _clip_protocol(p: ProtocolInputs) -> str:
    from .clip_score import CAPTION_TEMPLATE

    return (f"100 * max(cos, 0) of CLIP {p.clip_model} image and caption embeddings, mean over images; the caption "
            f"is the image's own prompt (text-conditional runs) or '{CAPTION_TEMPLATE}' with the class name")


_CAPTION_TOWER = ("offline evaluator's caption tower (contrastive, trained on the dataset's own image-caption pairs; "
                  "not CLIP, never comparable with clip_score)")


_SIZES = "share of (seed, image) groups whose evaluator class is the same at every size in sampling.size_conditions"
_EVAL = frozenset({Need.FEATURES, Need.REFERENCE_STATS})
_PR = frozenset({Need.FEATURES, Need.REAL_FEATURES})

# ------------------------------------------------------------------------------------------------- the registry
METRICS: dict[str, MetricSpec] = {s.name: s for s in [
    MetricSpec("fd_evaluator", True, lambda p: "Frechet distance (clean-fid frechet_distance) on offline-evaluator "
               f"features, samples vs. all real prepared images at {p.resolution}px", _EVAL, _fd_evaluator,
               report_rank=0),
    MetricSpec("cond_accuracy", False, lambda p: "share of samples whose evaluator-predicted class equals the "
               "conditioning class", frozenset({Need.PREDICTIONS, Need.CLASSES}), _cond_accuracy, report_rank=3),
    MetricSpec("precision", False, lambda p: f"improved precision (Kynkaanniemi et al. 2019, k={p.k}) on evaluator "
               "features: share of samples inside the k-NN manifold of all real prepared images", _PR,
               _precision_recall, group="precision_recall", report_rank=5),
    MetricSpec("recall", False, lambda p: f"improved recall (k={p.k}): share of real prepared images inside the "
               "k-NN manifold of the samples of one seed", _PR, _precision_recall, group="precision_recall",
               report_rank=6),
    MetricSpec("size_consistency", False, lambda p: f"{_SIZES} (same noise and class); _pairwise: mean agreement "
               "over size pairs", frozenset({Need.PREDICTIONS, Need.SIZE_CONDITIONS, Need.CLASSES}), None,
               group="size_consistency", curve=False, report_rank=7),
    MetricSpec("size_consistency_pairwise", False, lambda p: "mean over pairs of sizes in sampling.size_conditions "
               "of the share of (seed, image) groups whose evaluator class agrees (with size_consistency)",
               frozenset({Need.PREDICTIONS, Need.SIZE_CONDITIONS}), None, group="size_consistency", curve=False,
               selectable=False),
    MetricSpec("clip_score", False, _clip_protocol, frozenset({Need.CLIP}), _clip_score, report_rank=4),
    MetricSpec("caption_score", False, lambda p: f"100 * max(cos, 0) of image and own-prompt embeddings in the "
               f"{_CAPTION_TOWER}, mean over images", frozenset({Need.PROMPTS, Need.CAPTION_TOWER}), _caption_match,
               group="caption_match", report_rank=9),
    MetricSpec("caption_accuracy", False, lambda p: f"share of samples closer to their own prompt than to another "
               f"sample's (prompt (i + n // 2) mod n; chance 0.5) in the {_CAPTION_TOWER}",
               frozenset({Need.PROMPTS, Need.CAPTION_TOWER}), _caption_match, group="caption_match",
               report_rank=10),
    # computed per snapshot from the weights, not from an image set (`ldm.stages.evaluate`, `ldm.metrics.val_loss`)
    MetricSpec("val_loss", True, lambda p: "the objective's per-sample loss on held-out images (dataset.heldout), "
               "mean over t = (i + 0.5) / n and images, fixed noise per (image, t), EMA weights; compare only runs "
               "of one objective, parameterisation and DDPM schedule", frozenset({Need.MODEL}), None,
               report_rank=8),
    # Inception FIDs: by default at the final snapshot only (evaluation.inception_snapshots: the 299 px network runs
    # a few images/s per CPU core), so not curve metrics: curves.png plots every point of a curve metric. With
    # inception_snapshots: all, the record's curve points carry them too (curve CSVs, the study's efficiency).
    MetricSpec("fid_clean", True, lambda p: "clean-fid Inception FID, mode clean", frozenset({Need.INCEPTION}),
               _inception_fid("clean", "fid_clean"), curve=False, report_rank=1),
    MetricSpec("fid_legacy_tf", True, lambda p: "clean-fid Inception FID, mode legacy_tensorflow",
               frozenset({Need.INCEPTION}), _inception_fid("legacy_tensorflow", "fid_legacy_tf"), curve=False,
               report_rank=2),
]}


def _check(metrics: dict[str, MetricSpec]) -> None:
    """Registry invariants, checked at import so a bad entry fails at once rather than in a report."""
    groups: dict[str, list[MetricSpec]] = {}
    for spec in metrics.values():
        groups.setdefault(spec.group_name, []).append(spec)
        if (spec.compute is None) != bool({Need.SIZE_CONDITIONS, Need.MODEL} & spec.needs):
            raise ValueError(f"metric {spec.name}: a compute function is needed unless it reads the size "
                             "conditions or the model")
        if spec.curve and spec.compute is None and Need.MODEL not in spec.needs:
            raise ValueError(f"metric {spec.name}: only metrics computed per image set or per snapshot have a curve")
    for name, members in groups.items():
        if len({id(m.compute) for m in members}) != 1:
            raise ValueError(f"metric group {name}: members must share one compute function")
        if not any(m.selectable for m in members):
            raise ValueError(f"metric group {name}: no member can be selected")
    ranks = [s.report_rank for s in metrics.values() if s.report_rank is not None]
    if len(ranks) != len(set(ranks)):
        raise ValueError(f"report_rank values repeat: {sorted(ranks)}")


_check(METRICS)


class UnknownMetricError(UserError, LookupError):
    """A metric name the registry does not know (a typo, or a metric added without its registry entry)."""


def metric(name: str) -> MetricSpec:
    """The spec of `name`; UnknownMetricError naming the known metrics otherwise."""
    try:
        return METRICS[name]
    except KeyError:
        raise UnknownMetricError(f"unknown metric {name!r}: not in ldm/metrics/registry.py METRICS "
                                 f"(known: {', '.join(METRICS)})") from None


def lower_is_better(name: str) -> bool:
    return metric(name).lower_is_better


def better_sign(name: str) -> int:
    """+1 where larger is better, -1 where smaller is better."""
    return -1 if lower_is_better(name) else 1


def direction_word(name: str) -> str:
    """"lower" or "higher", as in the axis label "<metric> (lower is better)"."""
    return "lower" if lower_is_better(name) else "higher"


def selectable_names() -> tuple[str, ...]:
    """What `evaluation.metrics` may list, in registry order (= the schema enum)."""
    return tuple(n for n, s in METRICS.items() if s.selectable)


def curve_metrics() -> tuple[str, ...]:
    """Metrics plotted against the training step, in plot order."""
    return tuple(n for n, s in METRICS.items() if s.curve)


def report_order() -> tuple[str, ...]:
    """REPORT.md's metric columns, in order."""
    ranked = [s for s in METRICS.values() if s.report_rank is not None]
    return tuple(s.name for s in sorted(ranked, key=lambda s: s.report_rank))


def protocol_texts(wanted: Iterable[str], resolution: int, clip_model: str | None) -> dict[str, str]:
    """{metric: how it was computed} for the metrics of `wanted`, in that order."""
    inputs = ProtocolInputs(resolution=resolution, clip_model=clip_model)
    return {name: metric(name).protocol(inputs) for name in wanted}


def compute_metrics(ctx: EvalContext, image_set: ImageSet, wanted: Iterable[str],
                    skip: Iterable[str] = ()) -> dict[str, float]:
    """Values of the wanted per-image-set metrics, each group computed once, in registry order (a group's
    values in its compute function's order); metrics in `skip` (e.g. CLIP unavailable) are left out."""
    wanted = [metric(name).name for name in wanted]
    keep = set(wanted) - set(skip)
    values: dict[str, float] = {}
    done = set()
    for spec in METRICS.values():
        if spec.name not in keep or spec.compute is None or spec.group_name in done:
            continue
        done.add(spec.group_name)
        values.update({k: v for k, v in spec.compute(ctx, image_set).items() if k in keep})
    return values
