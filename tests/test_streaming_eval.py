"""Evaluation reads the prepared images in bounded chunks (issue 15, "memory bounded by design"): the streamed
reader decodes exactly the rows asked for, streamed statistics equal the in-memory ones, the evaluator trains to
the same weights from the reader as from an array, and precision / recall on a fixed real subset equal a direct
computation on that subset, which the metrics record states."""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from test_eval_run import RUN, evaluate_run, sample_run, scenario  # noqa: F401 (a fixture)

from ldm.control import CONTROL_FIELDS
from ldm.data.prepared import (REPORT, PreparedImages, evenly_spaced, image_chunks, load_prepared, open_prepared,
                               parquet_schema)
from ldm.layout import Layout
from ldm.metrics.evaluator import Evaluator, load_evaluator, train_evaluator
from ldm.metrics.fid import StreamingMoments, feature_statistics, reference_statistics
from ldm.metrics.manifold import knn_radii, precision_recall
from ldm.metrics.real_subset import RealManifold
from ldm.metrics.registry import PR_REAL_IMAGES, eval_hash_section
from ldm.samples import load_set, read_index

torch.set_num_threads(1)
SHARDS = (7, 5, 9)  # uneven shards, so chunks cross shard boundaries
CLASSES = ["a", "b", "c"]


def write_prepared(out: Path, sizes=SHARDS, res: int = 16, seed: int = 0) -> np.ndarray:
    """A prepared directory of random images in shards of `sizes` rows, with its report; returns the images."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (sum(sizes), res, res, 3), dtype=np.uint8)
    out.mkdir(parents=True)
    shards, start = [], 0
    for k, n in enumerate(sizes):
        rows = range(start, start + n)
        png = []
        for i in rows:
            buf = io.BytesIO()
            Image.fromarray(images[i]).save(buf, format="PNG")
            png.append(buf.getvalue())
        columns = {"key": [f"k{i}" for i in rows], "image": png, "label": [i % 3 for i in rows],
                   "caption": [f"image {i}" for i in rows], "attributes": ["{}"] * n,
                   **{f: [0] * n for f in CONTROL_FIELDS}}
        path = out / f"shard-{k:05d}.parquet"
        pq.write_table(pa.table(columns, schema=parquet_schema()), path)
        shards.append({"file": path.name, "rows": n, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
        start += n
    (out / REPORT).write_text(json.dumps({"shards": shards, "classes": CLASSES, "kept": start}))
    return images


def tiny_evaluator(input_size: int = 32) -> Evaluator:
    torch.manual_seed(0)
    return Evaluator({"class": CLASSES}, input_size, width=8, feature_dim=6).eval()


def test_the_reader_decodes_exactly_the_rows_asked_for_one_bounded_shard_cache_at_a_time(tmp_path):
    images = write_prepared(tmp_path / "p")
    array, meta = load_prepared(tmp_path / "p")
    lazy, lazy_meta = open_prepared(tmp_path / "p")
    assert np.array_equal(array, images) and isinstance(lazy, PreparedImages)
    pd.testing.assert_frame_equal(meta, lazy_meta)  # the other columns, without one decoded image
    assert len(lazy) == len(images) and lazy.shape == images.shape and lazy.dtype == np.uint8
    rows = np.array([20, 0, 6, 7, 6, 12, 19])  # any order, repeats, across all three shards
    assert np.array_equal(lazy[rows], images[rows]) and np.array_equal(lazy[3:15], images[3:15])
    assert np.array_equal(lazy[-1], images[-1]) and np.array_equal(lazy[images[:, 0, 0, 0] > 128],
                                                                   images[images[:, 0, 0, 0] > 128])
    chunks = list(image_chunks(lazy, size=4))
    assert [len(c) for c in chunks] == [4, 4, 4, 4, 4, 1] and np.array_equal(np.concatenate(chunks), images)
    one = PreparedImages(tmp_path / "p", keep=1)
    assert np.array_equal(one[rows], images[rows]) and len(one._cached) == 1
    with pytest.raises(IndexError):
        lazy[[len(images)]]
    (tmp_path / "p" / "shard-00001.parquet").write_bytes(b"stale")
    with pytest.raises(ValueError, match="sha256"):
        PreparedImages(tmp_path / "p")


def test_streamed_moments_equal_the_two_pass_statistics_whatever_the_chunking():
    rng = np.random.default_rng(1)
    feats = rng.normal(50.0, 3.0, (1000, 7))  # a large mean: a running sum of outer products would lose digits
    mu, sigma = feature_statistics(feats)
    folded = StreamingMoments(block=64)
    for start in range(0, len(feats), 37):
        folded.add(feats[start:start + 37])
    mu_s, sigma_s = folded.statistics()
    assert folded.count == 1000 and folded._mean is not None  # blocks were merged, not one two-pass
    np.testing.assert_allclose(mu_s, mu, rtol=1e-13)
    np.testing.assert_allclose(sigma_s, sigma, rtol=1e-11, atol=1e-12)
    again = StreamingMoments.of([feats[:1], feats[1:500], feats[500:]], block=64).statistics()
    assert all(np.array_equal(a, b) for a, b in zip(again, (mu_s, sigma_s)))  # chunking never changes a bit
    small = StreamingMoments.of([feats[:30], feats[30:64]], block=64).statistics()  # one block: two-pass, exactly
    assert all(np.array_equal(a, b) for a, b in zip(small, feature_statistics(feats[:64])))
    with pytest.raises(ValueError, match="N >= 2"):
        StreamingMoments.of([feats[:1]]).statistics()


def test_streamed_reference_statistics_equal_the_in_memory_ones(tmp_path):
    images = write_prepared(tmp_path / "p")
    evaluator = tiny_evaluator()
    want = feature_statistics(evaluator.features(images))  # the old path: every feature of one array
    lazy = PreparedImages(tmp_path / "p", keep=1)
    mu, sigma = reference_statistics(lazy, evaluator)  # the same batches of 256 through the network: the same bits
    assert np.array_equal(mu, want[0]) and np.array_equal(sigma, want[1])
    # smaller batches: the network's float32 rounding differs (features ~1e-8), the statistics agree to it
    mu, sigma = reference_statistics(lazy, evaluator, batch_size=2)  # one batch of 2 decoded at a time
    np.testing.assert_allclose(mu, want[0], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(sigma, want[1], rtol=1e-4, atol=1e-9)


def test_the_evaluator_trains_to_the_same_weights_from_the_reader_as_from_an_array(tmp_path):
    images = write_prepared(tmp_path / "p", sizes=(11, 9, 12))
    labels = {"class": np.arange(len(images)) % 3}
    kwargs = dict(steps=4, batch_size=5, seed=3, holdout=0.25, input_size=32, width=8, feature_dim=4,
                  captions=[f"image {i}" for i in range(len(images))])
    acc_a = train_evaluator(images, labels, {"class": CLASSES}, tmp_path / "a", **kwargs)
    acc_b = train_evaluator(PreparedImages(tmp_path / "p", keep=1), labels, {"class": CLASSES}, tmp_path / "b",
                            **kwargs)
    assert acc_a == acc_b and set(acc_a) == {"class", "caption"}
    sha = [load_evaluator(tmp_path / d).config["weights_sha256"] for d in ("a", "b")]
    assert sha[0] == sha[1]


def test_precision_recall_on_the_subset_equal_a_direct_computation_on_that_subset(tmp_path):
    images = write_prepared(tmp_path / "p")
    evaluator, lazy = tiny_evaluator(), PreparedImages(tmp_path / "p")
    fake = evaluator.features(np.random.default_rng(2).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8))
    manifold = RealManifold(lazy, evaluator, 8, k=3)
    pick = evenly_spaced(len(images), 8)
    assert list(pick) == [0, 2, 5, 7, 10, 13, 15, 18] and list(manifold.indices) == list(pick)
    direct = evaluator.features(images[pick])
    assert np.array_equal(manifold.features, direct) and np.array_equal(manifold.radii, knn_radii(direct, 3))
    assert precision_recall(manifold.features, fake, manifold.radii, k=3) == precision_recall(direct, fake, k=3)
    assert manifold.provenance() == {"real_images": 8, "of": 21, "pr_real_images": 8, "k": 3,
                                     "selection": "evenly spaced: image i * N // M"}
    everything = RealManifold(lazy, evaluator, PR_REAL_IMAGES, k=3)  # the default keeps all 21, in order
    assert np.array_equal(everything.features, evaluator.features(images))
    assert everything.provenance()["real_images"] == 21 and everything.provenance()["selection"] == "all images"


def test_the_record_states_the_real_subset_and_its_numbers_are_the_subsets(scenario):  # noqa: F811
    config, evaluator = scenario
    config["sampling"].update(guidance_sweep=[], size_conditions=[])
    config["evaluation"].update(metrics=["precision", "recall"], pr_real_images=10)
    sample_run(config, RUN, log=lambda *_: None)
    record = json.loads(evaluate_run(config, RUN, log=lambda *_: None).read_text())
    assert record["precision_recall"] == {"real_images": 10, "of": 40, "pr_real_images": 10, "k": 3,
                                          "selection": "evenly spaced: image i * N // M"}
    real = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)  # the fixture's images
    subset = evaluator.features(real[evenly_spaced(40, 10)])
    samples = Layout.of(config).run(RUN).samples
    final = load_set(samples, read_index(samples)["snapshots"][-1])
    for i, seed in enumerate(config["sampling"]["seeds"]):
        want = precision_recall(subset, evaluator.features(final["images"][final["seeds"] == seed]), k=3)
        assert record["metrics"]["precision"]["per_seed"][i] == want["precision"]
        assert record["metrics"]["recall"]["per_seed"][i] == want["recall"]


def test_pr_real_images_enters_the_evaluate_hash_only_where_it_changes_the_numbers():
    section = {"run": {}, "evaluation": {"metrics": ["fd_evaluator", "precision", "recall"]}}
    hashed = eval_hash_section(section)
    assert hashed == section  # unset: the hash of before the key existed
    for metrics, value, kept in ((["fd_evaluator", "precision"], 500, True), (["fd_evaluator"], 500, False),
                                 (["recall"], PR_REAL_IMAGES, False)):
        given = {"run": {}, "evaluation": {"metrics": metrics, "pr_real_images": value}}
        assert ("pr_real_images" in eval_hash_section(given)["evaluation"]) == kept, (metrics, value)
