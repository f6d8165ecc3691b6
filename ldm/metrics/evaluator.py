"""Offline evaluator: a small CNN that replaces Inception where no pretrained weights can be fetched.

Why our own network: the embedded default (synthetic shapes, CPU, no network) cannot download
clean-fid's Inception, and Inception features of 32-64 px cartoons say little anyway. A classifier
trained on the prepared data gives (a) a feature space for Fréchet distance (`fd_evaluator`, computed
through clean-fid in `ldm.metrics.fid`) and (b) predicted class/attributes for conditional accuracy.

Design choices:
- Fixed input size (default 64, a multiple of 32: the stem strides it down to 32 px, so a 64 px
  evaluator costs what a 32 px one does). Every input, at train and at test time, goes through the same
  `resize_to_input` (bilinear, antialias, float 0..255), so features never depend on who resized.
- Inputs are raw pixel values 0..255 (uint8 arrays N×H×W×3, uint8 tensors N×3×H×W as torchmetrics
  passes them, or float tensors N×3×H×W in 0..255 as clean-fid passes them); normalisation is inside.
- GroupNorm, not BatchNorm: features of an image do not depend on the batch it came in, nor on
  running statistics estimated during a short training run.
- The trunk ends in a 4×4 average pool (keeps `position`) concatenated with a global max pool. Without
  the max, shape accuracy on the synthetic data stalled near 0.6 after 400 steps (it is decided by
  a few corner/notch pixels that averaging dilutes); with it, 0.95-0.99.
- Augmentation is small random translation (edge padding, at most size/16 px, well below the position
  bins) plus faint pixel noise, so the heads tolerate the jitter and grain of generated images; no flips,
  colour or scale jitter, since those would change the attributes being judged.
- Deterministic: model init, split, batches and augmentation draw from generators seeded by `seed`;
  on CPU two runs with the same seed give bit-identical weights (and config.json: no timings in it).
- Held in memory as uint8 at the input size (12 KiB per 64 px image): fine for the synthetic and small
  scenarios; for ImageNet-scale data train on a class-balanced subset.
- Caption-only data (img2dataset tars: no classes) gets a caption tower instead of a class head: a
  contrastive image-text model trained on the dataset's own pairs (symmetric InfoNCE, as CLIP), whose text
  side is a bag of hashed words (`caption_tokens`). Why not a pretrained text encoder: the evaluator must
  exist offline and must not share the generator's text encoder (a generator that learned that encoder's
  quirks would be scored by them). It scores a sample against the prompt it was generated from
  (`caption_score`, `caption_accuracy`), the offline stand-in for CLIPScore, never reported as clip_score.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save

from ldm.progress import progress
from ldm.provenance import atomic_write_bytes, atomic_write_json, file_sha256

FORMAT = "ldm-evaluator/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class EvaluatorNotFoundError(FileNotFoundError):
    """Raised with a one-line reason when an evaluator directory is missing or incomplete."""


def resize_to_input(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float N×3×H×W (0..255) -> N×3×size×size; identity at the native size (no resampling at all)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def to_float_batch(images) -> torch.Tensor:
    """Accept the three pixel layouts we meet and return float32 N×3×H×W in 0..255.

    Float numpy arrays are refused on purpose: their range (0..1, -1..1, 0..255) is ambiguous.
    Float tensors are taken as 0..255 (clean-fid's convention).
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise TypeError(f"expected uint8 array N×H×W×3, got {images.dtype} {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    elif not isinstance(images, torch.Tensor):
        raise TypeError(f"expected uint8 numpy array or torch tensor, got {type(images).__name__}")
    elif images.ndim != 4 or images.shape[1] != 3:
        raise TypeError(f"expected tensor N×3×H×W, got {tuple(images.shape)}")
    # Contiguous NCHW always: a permuted (channels-last) tensor takes other conv kernels on CPU and
    # shifts features by ~1e-5 relative, enough to make the same images score differently by path.
    return images.to(torch.float32).contiguous()


#: images per forward pass when scoring (also the unit of a rank's share in `ldm evaluate`: same batches, same bits)
BATCH = 256

#: hashed-word vocabulary of the caption tower (collisions are rare at the caption lengths we meet)
CAPTION_BUCKETS = 8192


def caption_tokens(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(word ids, offsets) for `nn.EmbeddingBag`: lower-cased words and word bigrams hashed by crc32 (stable
    across processes, unlike `hash`); an empty caption gets one id of its own, so it still has an embedding."""
    ids, offsets = [], []
    for caption in captions:
        words = re.findall(r"[a-z0-9]+", (caption or "").lower())
        grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])] or ["<empty>"]
        offsets.append(len(ids))
        ids.extend(zlib.crc32(g.encode()) % CAPTION_BUCKETS for g in grams)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


def _block(cin: int, cout: int, stride: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class Evaluator(nn.Module):
    """Shared conv trunk -> `feature_dim` features -> one linear head per entry of `vocab` ("class" first),
    and with `captions` a caption tower whose embeddings the image features are matched against."""

    def __init__(self, vocab: dict[str, list[str]], input_size: int = 64, width: int = 32, feature_dim: int = 128,
                 captions: bool = False):
        super().__init__()
        if "class" not in vocab and not captions:
            raise ValueError("vocab must contain a 'class' head (or the evaluator must have a caption tower)")
        if vocab and "class" not in vocab:
            raise ValueError("attribute heads need a 'class' head")
        if input_size < 32 or input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
        self.head_names = (["class"] + sorted(k for k in vocab if k != "class")) if vocab else []
        self.vocab = {k: list(vocab[k]) for k in self.head_names}
        self.input_size, self.width, self.feature_dim, self.captions = input_size, width, feature_dim, captions
        w = width
        self.trunk = nn.Sequential(
            _block(3, w, input_size // 32, kernel=input_size // 32 + 2), _block(w, 2 * w, 2),
            _block(2 * w, 4 * w, 2), _block(4 * w, 4 * w, 1),
        )
        self.feature = nn.Sequential(nn.Linear(17 * 4 * w, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(self.vocab[k])) for k in self.head_names})
        if captions:
            self.words = nn.EmbeddingBag(CAPTION_BUCKETS, feature_dim, mode="mean")
            self.text_proj = nn.Sequential(nn.SiLU(), nn.Linear(feature_dim, feature_dim))
            self.image_proj = nn.Linear(feature_dim, feature_dim)
            self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.extra: dict = {}  # training record (accuracies, seed...) kept in config.json

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x: float N×3×H×W in 0..255, any H×W. Returns (features, {head: logits})."""
        x = resize_to_input(x, self.input_size) / 127.5 - 1.0
        h = self.trunk(x)
        # 4×4 average cells keep where things are (position); the global max keeps small local evidence
        # (a corner, a notch) that averaging over the background would dilute: it is what makes shape learnable.
        f = self.feature(torch.cat([F.adaptive_avg_pool2d(h, 4).flatten(1), h.amax((2, 3))], 1))
        return f, {k: head(f) for k, head in self.heads.items()}

    def embed_captions(self, captions: list[str]) -> torch.Tensor:
        """Unit-norm caption embeddings (N, feature_dim)."""
        ids, offsets = caption_tokens(captions)
        device = self.words.weight.device
        return F.normalize(self.text_proj(self.words(ids.to(device), offsets.to(device))), dim=-1)

    def embed_images(self, features: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings from trunk features (the space captions are matched in)."""
        return F.normalize(self.image_proj(features), dim=-1)

    @torch.no_grad()
    def caption_similarity(self, images, captions: list[str], batch_size: int = BATCH) -> np.ndarray:
        """Cosine (N,) float64 of each image with its own caption in the caption tower's space."""
        if not self.captions:
            raise ValueError("this evaluator has no caption tower (trained on data with classes)")
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        out = []
        for (f, _), a in zip(self._batches(images, batch_size), range(0, len(images), batch_size)):
            text = self.embed_captions(list(captions[a:a + batch_size]))
            out.append((self.embed_images(f) * text).sum(-1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def _batches(self, images, batch_size: int):
        device = next(self.parameters()).device
        self.eval()
        with torch.no_grad():
            for i in range(0, len(images), batch_size):
                yield self(to_float_batch(images[i : i + batch_size]).to(device))

    def features(self, images, batch_size: int = BATCH) -> np.ndarray:
        """Feature vectors, float64 (N, feature_dim): float64 so FD statistics are not accumulated in float32."""
        out = [f.double().cpu().numpy() for f, _ in self._batches(images, batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.feature_dim))

    def features_and_predictions(self, images, batch_size: int = BATCH) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`features` and `predict` from one forward pass (evaluation needs both for every image set)."""
        feats, out = [], {k: [] for k in self.head_names}
        for f, logits in self._batches(images, batch_size):
            feats.append(f.double().cpu().numpy())
            for k, v in logits.items():
                out[k].append(v.argmax(1).cpu().numpy())
        if not feats:
            return np.zeros((0, self.feature_dim)), {k: np.zeros(0, np.int64) for k in self.head_names}
        return np.concatenate(feats), {k: np.concatenate(v) for k, v in out.items()}

    def predict(self, images, batch_size: int = BATCH) -> dict[str, np.ndarray]:
        """Arg-max index per head, int64 (N,); names via `self.vocab[head][index]`."""
        out: dict[str, list] = {k: [] for k in self.head_names}
        for _, logits in self._batches(images, batch_size):
            for k, v in logits.items():
                out[k].append(v.argmax(1).cpu().numpy())
        return {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in out.items()}

    @property
    def config(self) -> dict:
        """Everything config.json holds: architecture, vocab, and the training record (held-out accuracy...)."""
        return {"format": FORMAT, "vocab": self.vocab, "heads": self.head_names, "input_size": self.input_size,
                "width": self.width, "feature_dim": self.feature_dim, "captions": self.captions, **self.extra}


def _augment(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random integer translation with edge padding, plus faint Gaussian pixel noise (0..255 scale)."""
    n, _, h, w = x.shape
    if max_shift > 0:
        padded = F.pad(x, (max_shift,) * 4, mode="replicate")
        offs = torch.randint(0, 2 * max_shift + 1, (n, 2), generator=gen).tolist()
        x = torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offs)])
    return (x + 3.0 * torch.randn(x.shape, generator=gen)).clamp(0, 255)


def _validate(images, labels: dict, vocab: dict) -> None:
    if getattr(images, "dtype", None) != np.uint8 or getattr(images, "ndim", 0) != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be a uint8 array N×H×W×3, got {getattr(images, 'shape', type(images))}")
    if set(labels) != set(vocab):
        raise ValueError(f"labels heads {sorted(labels)} differ from vocab heads {sorted(vocab)}")
    for k, y in labels.items():
        y = np.asarray(y)
        if y.shape != (len(images),):
            raise ValueError(f"labels[{k!r}] has shape {y.shape}, expected ({len(images)},)")
        if y.size and (y.min() < -1 or y.max() >= len(vocab[k])):
            raise ValueError(f"labels[{k!r}] outside -1..{len(vocab[k]) - 1}")


def caption_pair_accuracy(similarity_own: np.ndarray, similarity_other: np.ndarray) -> float:
    """Share of images closer to their own caption than to another image's (chance 0.5; ties count half)."""
    return float(np.mean((similarity_own > similarity_other) + 0.5 * (similarity_own == similarity_other)))


def derangement(n: int) -> np.ndarray:
    """The "other caption" of image i: caption (i + n // 2) mod n, never its own for n > 1, fixed (no RNG) so
    the number is the same for every run scored on the same prompts."""
    return (np.arange(n) + max(1, n // 2)) % n


def _contrastive_loss(model: "Evaluator", features: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE over the batch; pairs with the same caption (crops of one image, repeated prompts)
    are not negatives of each other."""
    img, txt = model.embed_images(features), model.embed_captions(captions)
    logits = model.logit_scale.exp().clamp(max=100.0) * img @ txt.T
    codes = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    ids = torch.tensor([codes[c] for c in captions], device=logits.device)
    same = (ids[:, None] == ids[None, :]) & ~torch.eye(len(captions), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same, float("-inf"))
    target = torch.arange(len(captions), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def _inputs(images, rows, size: int) -> torch.Tensor:
    """uint8 N×3×size×size: the images at `rows` as the evaluator sees them (resized, rounded), decoded here."""
    return resize_to_input(to_float_batch(images[np.asarray(rows)]), size).round().clamp(0, 255).to(torch.uint8)


def train_evaluator(images, labels: dict[str, np.ndarray], vocab: dict[str, list[str]], out: Path,
                    steps: int, batch_size: int, seed: int, holdout: float = 0.1, *, input_size: int = 64,
                    width: int = 32, feature_dim: int = 128, lr: float = 1e-3,
                    device: str = "cpu", captions: list[str] | None = None) -> dict[str, float | None]:
    """Train on a random (1-holdout) share, report accuracy per head on the rest, save to `out`.

    `images`: uint8 N×H×W×3, or a `ldm.data.prepared.PreparedImages` (each mini-batch is decoded and resized when
    drawn, so memory does not grow with N). Labels of -1 are ignored in the loss and in the accuracy. Returns
    {head: held-out accuracy} (None for a head without held-out targets). With `captions` (one per image) the caption tower trains
    beside the heads and the result has `caption`: held-out own-vs-other caption accuracy (`derangement`).
    `out/config.json` is written last, after the weights, and records the weights' sha256, so a half-replaced
    pair is detected at load time.
    """
    _validate(images, labels, vocab)
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    n = len(images)
    n_val = int(round(n * holdout))
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    if len(train_idx) == 0:
        raise ValueError("no training images left after the hold-out split")

    with torch.random.fork_rng(devices=[]):  # own seed for init, without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = Evaluator(vocab, input_size, width, feature_dim, captions=captions is not None)
    model.to(device)
    gen = torch.Generator().manual_seed(seed)
    y_all = {k: torch.as_tensor(np.asarray(v), dtype=torch.long) for k, v in labels.items()}

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, steps // 20)  # short warm-up, then cosine to zero: stable at a high lr for few steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    max_shift = input_size // 16
    train_t = torch.as_tensor(train_idx)
    perm, pos = train_t[torch.randperm(len(train_t), generator=gen)], 0
    model.train()
    for _ in progress(range(steps), "train-evaluator", unit="step"):
        if pos + batch_size > len(perm):  # new epoch: fresh permutation, drop the ragged tail
            perm, pos = train_t[torch.randperm(len(train_t), generator=gen)], 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        x = _augment(_inputs(images, idx.numpy(), input_size).float(), max_shift, gen).to(device)
        features, logits = model(x)
        losses = [] if captions is None else [_contrastive_loss(model, features, [captions[i] for i in idx.tolist()])]
        for k, lg in logits.items():
            y = y_all[k][idx].to(device)
            if (y >= 0).any():  # cross-entropy over an all-ignored batch is NaN
                losses.append(F.cross_entropy(lg, y, ignore_index=-1))
        if not losses:
            continue
        opt.zero_grad(set_to_none=True)
        torch.stack(losses).sum().backward()
        opt.step()
        sched.step()

    acc: dict[str, float | None] = {k: None for k in model.head_names}
    if captions is not None:
        acc["caption"] = None
    if n_val:  # held-out images decoded a batch at a time (the batches of one pass over them: the same bits)
        own = None if captions is None else [captions[i] for i in val_idx]
        other = None if own is None else [own[j] for j in derangement(len(own))]
        preds, sims = [], []
        for a in range(0, n_val, BATCH):
            x = _inputs(images, val_idx[a:a + BATCH], input_size)
            preds.append(model.predict(x))
            if own is not None:
                sims.append([model.caption_similarity(x, c[a:a + BATCH]) for c in (own, other)])
        for k in model.head_names:
            y, pred = np.asarray(labels[k])[val_idx], np.concatenate([p[k] for p in preds])
            mask = y >= 0
            acc[k] = float((pred[mask] == y[mask]).mean()) if mask.any() else None
        if own is not None and n_val > 1:
            acc["caption"] = caption_pair_accuracy(*(np.concatenate(v) for v in zip(*sims)))

    model.to("cpu")
    out = Path(out)
    blob = save({k: v.contiguous() for k, v in model.state_dict().items()}, metadata={"format": FORMAT})
    model.extra = {"heldout_accuracy": acc, "steps": steps, "batch_size": batch_size, "seed": seed,
                   "holdout": holdout, "n_train": int(len(train_idx)), "n_heldout": int(n_val), "lr": lr,
                   "torch_version": torch.__version__,
                   "weights_sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write_bytes(out / WEIGHTS, blob)
    atomic_write_json(out / CONFIG, model.config)
    return acc


def load_evaluator(path: str | Path, device: str = "cpu") -> Evaluator:
    """Load `path/` (a directory holding model.safetensors + config.json) in eval mode."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    weights, cfg_path = path / WEIGHTS, path / CONFIG
    missing = [p.name for p in (weights, cfg_path) if not p.is_file()]
    if missing:
        raise EvaluatorNotFoundError(f"evaluator not found: {path} lacks {', '.join(missing)}; train it first "
                                     "(ldm.metrics.evaluator.train_evaluator)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_path}: format {cfg.get('format')!r}, expected {FORMAT!r}")
    if "weights_sha256" in cfg and file_sha256(weights) != cfg["weights_sha256"]:
        raise ValueError(f"{weights} does not match the sha256 recorded in {cfg_path}: retrain the evaluator")
    model = Evaluator(cfg["vocab"], cfg["input_size"], cfg["width"], cfg["feature_dim"],
                      captions=cfg.get("captions", False))
    model.load_state_dict(load_file(weights))
    model.extra = {k: v for k, v in cfg.items() if k not in model.config}
    return model.to(device).eval()


def cond_accuracy(pred: dict[str, np.ndarray], target: dict[str, np.ndarray]) -> dict[str, float]:
    """Share of images whose predicted head matches the conditioning target, per head given in `target`.

    Targets of -1 mean "not conditioned on this head" and are skipped; `all` counts an image as correct
    when every head it was conditioned on matches (images conditioned on nothing are left out).
    """
    if "class" not in target:
        raise ValueError("target must contain 'class'")
    missing = sorted(set(target) - set(pred))
    if missing:
        raise ValueError(f"predictions lack heads {missing}")
    n = len(np.asarray(target["class"]))
    ok, given = np.ones(n, bool), np.zeros(n, bool)
    result = {}
    for k in ["class"] + sorted(k for k in target if k != "class"):
        y, p = np.asarray(target[k]), np.asarray(pred[k])
        if y.shape != (n,) or p.shape != (n,):
            raise ValueError(f"head {k!r}: prediction {p.shape} / target {y.shape}, expected ({n},)")
        mask = y >= 0
        hit = p == y
        if mask.any():
            result[k] = float(hit[mask].mean())
        ok &= hit | ~mask
        given |= mask
    result["all"] = float(ok[given].mean()) if given.any() else float("nan")
    return result
