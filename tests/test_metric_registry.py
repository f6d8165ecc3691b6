"""The metric registry is the one list of metrics: the schema, evaluation, report and REPORT.md agree with it,
unknown names fail loudly, and registry-driven computation equals the metric functions called directly."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from ldm.metrics import registry
from ldm.metrics.registry import METRICS, ImageSet, MetricSpec, Need, UnknownMetricError

REPO = Path(__file__).resolve().parent.parent


def test_schema_enum_equals_the_registry():
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    enum = schema["properties"]["evaluation"]["properties"]["metrics"]["items"]["enum"]
    assert enum == list(registry.selectable_names())


def test_every_metric_has_a_direction_protocol_text_and_needs():
    inputs = registry.ProtocolInputs(resolution=64, clip_model="some/clip")
    for name, spec in METRICS.items():
        assert spec.name == name and isinstance(spec.lower_is_better, bool), name
        text = spec.protocol(inputs)
        assert isinstance(text, str) and len(text) > 20, name
        assert all(isinstance(n, Need) for n in spec.needs), name  # none: the generated images alone
        assert registry.direction_word(name) in ("lower", "higher")


def test_unknown_metric_gets_no_direction(tmp_path):
    from ldm.stages.report import transfer_table
    from ldm.seed_groups import compare, metric_names

    for lookup in (registry.metric, registry.lower_is_better, registry.better_sign):
        with pytest.raises(UnknownMetricError, match="unknown metric 'fd_typo'"):
            lookup("fd_typo")
    rec = {"metrics": {"fd_typo": {"mean": 1.0, "std": 0.0, "per_seed": [1.0]}}, "seeds": [0]}
    with pytest.raises(UnknownMetricError):
        compare(rec, rec, "fd_typo")
    with pytest.raises(UnknownMetricError):  # no silent drop out of REPORT.md either
        metric_names([rec])
    with pytest.raises(UnknownMetricError):
        registry.compute_metrics(None, None, ["fd_typo"])
    with pytest.raises(UnknownMetricError):
        registry.protocol_texts(["fd_typo"], 32, None)
    config = {"recipes": ["a"], "stages": {"lo": {"resolution": 0, "steps": 1},
                                           "hi": {"resolution": 1, "steps": 1, "init": "lo", "pos_embed": "x"},
                                           "sc": {"resolution": 1, "steps": 1}}}
    a = dict(rec, recipe="a", stage="hi", resolution=1)
    with pytest.raises(UnknownMetricError):
        transfer_table(config, [a, dict(a, stage="sc")])


#: The metrics the committed results were made with; a metric added later may go anywhere in the orders.
COMMITTED = ("fd_evaluator", "cond_accuracy", "precision", "recall", "size_consistency", "size_consistency_pairwise",
             "clip_score", "fid_clean", "fid_legacy_tf")


def test_directions_and_orders_are_the_ones_results_were_made_with():
    def committed(names):
        return tuple(n for n in names if n in COMMITTED)

    assert {n for n in COMMITTED if METRICS[n].lower_is_better} == {"fd_evaluator", "fid_clean", "fid_legacy_tf"}
    # the Inception FIDs are final-snapshot metrics by default (evaluation.inception_snapshots), not curve plots
    assert committed(registry.curve_metrics()) == ("fd_evaluator", "cond_accuracy", "precision", "recall",
                                                   "clip_score")
    assert committed(registry.report_order()) == ("fd_evaluator", "fid_clean", "fid_legacy_tf", "cond_accuracy",
                                                  "clip_score", "precision", "recall", "size_consistency")
    assert not METRICS["size_consistency_pairwise"].selectable
    assert METRICS["precision"].compute is METRICS["recall"].compute


def test_inception_metric_names_follow_clean_fid_modes():
    from ldm.metrics.inception import PROTOCOLS

    assert {n for n, s in METRICS.items() if Need.INCEPTION in s.needs} == set(PROTOCOLS.values())
    assert registry.INCEPTION_MODES == {name: mode for mode, name in PROTOCOLS.items()}


@pytest.mark.parametrize("config_file", ["default.yaml", "small.yaml"])
def test_protocol_texts_reproduce_the_committed_records(config_file):
    from ldm.config import load_config

    config = load_config(REPO / "config" / config_file)
    records = sorted((REPO / config["results"] / "metrics").glob("*.json"))
    assert records
    for path in records:
        rec = json.loads(path.read_text())
        texts = registry.protocol_texts(list(rec["protocol"]), rec["resolution"], config["evaluation"]["clip_model"])
        assert texts == rec["protocol"], path.name


def test_protocol_texts_of_metrics_not_in_committed_records():
    texts = registry.protocol_texts(["fid_legacy_tf", "clip_score", "fid_clean"], 64, "openai/clip-vit-large-patch14")
    assert list(texts) == ["fid_legacy_tf", "clip_score", "fid_clean"]  # the order asked for
    assert texts["clip_score"] == ("100 * max(cos, 0) of CLIP openai/clip-vit-large-patch14 image and caption "
                                   "embeddings, mean over images; the caption is the image's own prompt "
                                   "(text-conditional runs) or 'a photo of a {}' with the class name")
    assert texts["fid_clean"] == "clean-fid Inception FID, mode clean"
    assert texts["fid_legacy_tf"] == "clean-fid Inception FID, mode legacy_tensorflow"


class FakeEvaluator:
    """Features = first 6 pixel values; predicted class = argmax of the first 4 (deterministic, no weights)."""

    def features_and_predictions(self, images, batch_size=256):
        flat = images.reshape(len(images), -1).astype(np.float64)
        return flat[:, :6], {"class": flat[:, :4].argmax(1)}


@pytest.fixture()
def image_set():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 24)
    real = rng.normal(100, 30, (30, 6))
    ref = (real.mean(0), np.cov(real, rowvar=False))
    return images, labels, real, ref


def test_context_metrics_through_the_registry_equal_direct_calls(image_set, monkeypatch):
    from types import SimpleNamespace

    from ldm.stages import evaluate
    from ldm.metrics import manifold
    from ldm.metrics.evaluator import cond_accuracy
    from ldm.metrics.fid import feature_statistics, frechet_distance

    images, labels, real, ref = image_set
    config = {"evaluation": {"metrics": ["recall", "fd_evaluator", "cond_accuracy", "precision", "size_consistency",
                                         "clip_score"], "clip_model": None}}
    lines = []
    ctx = evaluate._Context(SimpleNamespace(config=config), 4, FakeEvaluator(), ref, ["a", "b", "c", "d"], lines.append)
    ctx._real_feats = real
    calls = []
    original = manifold.precision_recall
    monkeypatch.setattr(manifold, "precision_recall", lambda *a, **k: calls.append(k) or original(*a, **k))
    values = ctx.metrics(images, labels)
    # computation order (registry order), CLIP skipped with its reason, size_consistency not per image set
    assert list(values) == ["fd_evaluator", "cond_accuracy", "precision", "recall"]
    assert "evaluation.clip_model is null" in ctx.skipped["clip_score"] and len(lines) == 1
    assert calls == [{"k": registry.PR_K}]  # precision and recall from one computation
    feats, pred = FakeEvaluator().features_and_predictions(images)
    assert values["fd_evaluator"] == frechet_distance(*feature_statistics(feats), *ref)
    assert values["cond_accuracy"] == float(cond_accuracy(pred, {"class": labels})["class"])
    assert {k: values[k] for k in ("precision", "recall")} == original(real, feats, k=3)


def test_group_members_are_filtered_to_the_wanted_ones(image_set):
    images, labels, real, ref = image_set
    feats, pred = FakeEvaluator().features_and_predictions(images)

    class Ctx:
        ref_stats, real_features, clip, classes = ref, real, None, ["a", "b", "c", "d"]

    s = ImageSet(images, labels, feats, pred)
    values = registry.compute_metrics(Ctx(), s, ["recall", "fd_evaluator"])
    assert list(values) == ["fd_evaluator", "recall"]  # registry order, only the wanted member of the group
    assert registry.compute_metrics(Ctx(), s, ["clip_score"], skip={"clip_score"}) == {}  # clip never called


def test_registry_invariants_reject_a_split_group():
    def one(ctx, s):
        return {}

    def two(ctx, s):
        return {}

    bad = {n: MetricSpec(n, True, lambda p: "t", frozenset({Need.FEATURES}), f, group="g")
           for n, f in (("a", one), ("b", two))}
    with pytest.raises(ValueError, match="share one compute function"):
        registry._check(bad)
    no_compute = {"c": MetricSpec("c", True, lambda p: "t", frozenset({Need.FEATURES}), None)}
    with pytest.raises(ValueError, match="compute function is needed"):
        registry._check(no_compute)
