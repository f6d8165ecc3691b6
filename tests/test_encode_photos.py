"""Real photographs (scikit-image's bundled ones, arranged by scripts/skimage_classes.py) through
`ldm prepare` and `ldm encode`: every photo kept, grayscale and JPEG ones included, control metadata
matching the photo files, one latent per prepared image."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from ldm.autoencoder import tiny_vae_config, train_tiny_vae
from ldm.cli import main
from ldm.data.latent_cache import LatentDataset
from ldm.data.prepared import load_prepared
from test_latents import SMALL, shapes

pytest.importorskip("skimage")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import skimage_classes  # noqa: E402


def test_skimage_photos_prepare_and_encode(tmp_path, capsys):
    raw = tmp_path / "raw"
    counts = skimage_classes.arrange(raw, crops=2, seed=0)
    files = sorted(p.relative_to(raw).as_posix() for p in raw.glob("*/*"))
    assert sum(counts.values()) == len(files) == 9 + 2 * 6 and list(counts) == sorted(counts)  # originals + crops
    modes = {Image.open(raw / f).mode for f in files}
    assert {"RGB", "L"} <= modes and any(f.endswith(".jpg") for f in files)  # colour, grayscale, JPEG

    assert main(["prepare", str(raw), "--out", str(tmp_path / "prep"), "--resolution", "32"]) == 0
    report = json.loads((tmp_path / "prep" / "report.json").read_text())
    assert report["kept"] == len(files) and report["skipped"] == {}
    assert report["classes"] == list(skimage_classes.CLASSES)
    images, meta = load_prepared(tmp_path / "prep")
    assert images.shape == (len(files), 32, 32, 3)
    assert sorted(meta["key"]) == files
    for _, row in meta.iterrows():
        w, h = Image.open(raw / row["key"]).size
        cls = row["key"].split("/")[0]
        assert (row["orig_h"], row["orig_w"]) == (h, w)
        assert report["classes"][row["label"]] == cls
        assert row["caption"] == skimage_classes.CLASSES[cls][1]
        side = min(h, w)  # center crop: the largest centred square, to within one 32 px output pixel
        px = side / 32 + 1
        assert abs(row["crop_h"] - side) <= px and abs(row["crop_w"] - side) <= px
        assert abs(row["crop_top"] - (h - side) / 2) <= px and abs(row["crop_left"] - (w - side) / 2) <= px
    gray = meta.index[meta["key"].str.startswith("texture/")]
    assert (images[gray, :, :, 0] == images[gray, :, :, 2]).all()  # grayscale photos stay gray in RGB

    train_tiny_vae([shapes(4, 32, 0)], tmp_path / "vae", steps=1, batch_size=4, lr=1e-3, seed=0,
                   config=tiny_vae_config(**SMALL))
    assert main(["encode", "--prepared", str(tmp_path / "prep"), "--vae", str(tmp_path / "vae"), "--out",
                 str(tmp_path / "lat"), "--text-encoder", "none", "--batch-size", "8", "--shard-size", "10"]) == 0
    assert f"encoded {len(files)} samples" in capsys.readouterr().out
    t = LatentDataset(tmp_path / "lat").tensors()
    assert t["mean"].shape == (len(files), 4, 8, 8) and t["mean"].isfinite().all()
    assert t["label"].tolist() == meta["label"].tolist()
