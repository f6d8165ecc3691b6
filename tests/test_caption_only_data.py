"""Text-to-image on caption-only data a user brings: hand-written img2dataset tars (no class anywhere, captions of
very different lengths, broken members) through prepare -> encode -> train -> sample -> evaluate."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import yaml
from PIL import Image, ImageDraw

from test_pipeline import _snakemake_config

COLOURS = {"red": (210, 40, 40), "blue": (40, 70, 220), "yellow": (235, 205, 30)}
SHAPES = ["circle", "square"]
CAPTIONS = ["{c} {s}",
            "a {c} {s} on white",
            "photo of a single {c} {s}, slightly off centre, on a plain white background, taken in daylight with "
            "a phone camera, no other objects anywhere in the picture, and no text or watermark of any kind"]


def _image(colour: str, shape: str, rng) -> bytes:
    w, h = int(rng.integers(40, 72)), int(rng.integers(40, 72))  # web images come in every size and aspect
    img = Image.new("RGB", (w, h), (250, 250, 250))
    r = min(w, h) * 0.3
    cx, cy = w / 2 + rng.uniform(-4, 4), h / 2 + rng.uniform(-4, 4)
    draw = getattr(ImageDraw.Draw(img), "ellipse" if shape == "circle" else "rectangle")
    draw((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_tars(root, per_shard: int = 48) -> dict:
    """Two shards in img2dataset's layout (KEY.jpg, KEY.txt, KEY.json), written by hand; returns what is broken."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    broken = {"truncated_jpeg": "000000007", "json_not_an_object": "000000011", "caption_without_image": "000000013"}
    for shard in range(2):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{shard:04d}{i:05d}"
                colour, shape = list(COLOURS)[int(rng.integers(3))], SHAPES[int(rng.integers(2))]
                caption = CAPTIONS[int(rng.integers(len(CAPTIONS)))].format(c=colour, s=shape)
                jpeg = _image(colour, shape, rng)
                if key == broken["truncated_jpeg"]:
                    jpeg = jpeg[: len(jpeg) // 3]
                meta = {"caption": caption, "url": f"https://example.com/{key}.jpg", "key": key, "status": "success",
                        "width": 64, "height": 64, "original_width": 64, "original_height": 64}
                if key != broken["caption_without_image"]:
                    _add(tar, f"{key}.jpg", jpeg)
                _add(tar, f"{key}.txt", caption.encode())
                _add(tar, f"{key}.json", b"[1, 2]" if key == broken["json_not_an_object"] else json.dumps(meta).encode())
    return broken


def test_text_to_image_on_hand_written_caption_tars(tmp_path):
    broken = write_tars(tmp_path / "data" / "web")
    config = {
        "name": "webcaps", "seed": 0, "workdir": "work/webcaps", "results": "work/webcaps/results", "threads": 1,
        "dataset": {"name": "web", "source": "data/web/*.tar", "heldout": 0.2, "random_crops": 1},
        "resolutions": {"low": 16, "high": 32},
        "autoencoder": {"steps": 10, "batch_size": 16, "lr": 2.0e-3},
        "text_encoder": "minilm",
        "evaluator": {"steps": 20, "batch_size": 32, "input_size": 32, "feature_dim": 16},
        "recipes": {"mmdit": {"arch": "mmdit", "size": "tiny", "conditioning": "text", "control": "none"}},
        "stages": {"pretrain": {"resolution": "low", "steps": 6},
                   "transfer": {"resolution": "high", "steps": 4, "init": "pretrain", "pos_embed": "interpolate"}},
        "training": {"batch_size": 8, "lr": 1.0e-3, "warmup": 2, "ema": 0.9, "snapshots": 1},
        "sampling": {"sampler": "ddim", "steps": 2, "guidance": 2.0, "num_samples": 12, "seeds": [0, 1],
                     "original_size": 32, "batch_size": 12},
        "evaluation": {"metrics": ["fd_evaluator", "caption_score", "caption_accuracy", "val_loss", "clip_score"]},
    }
    configfile = tmp_path / "webcaps.yaml"
    configfile.write_text(yaml.safe_dump(config))
    out = _snakemake_config(tmp_path, configfile)
    work = tmp_path / "work" / "webcaps"
    logs = "\n".join(p.read_text()[-800:] for p in sorted((work / "logs").rglob("*.log"))) if work.exists() else ""
    assert out.returncode == 0, out.stderr[-3000:] + logs

    report = json.loads((work / "prepared" / "web" / "r32" / "report.json").read_text())
    assert report["classes"] == [] and report["kept"] == 96 - len(broken)
    assert sum(report["skipped"].values()) == len(broken), report["skipped"]

    run = "mmdit.web.transfer.32"
    samples = work / "runs" / run / "samples"
    prompts = json.loads((samples / "prompts.json").read_text())
    assert prompts["source"] == "held-out captions" and len(prompts["prompts"]) == 12
    assert len({len(p.split()) for p in prompts["prompts"]}) > 1  # short and long captions both prompt
    cache = work / "latents" / "web" / "r32"
    from ldm.data.latent_cache import LatentDataset

    heldout = set(LatentDataset(cache).split_rows(heldout=True).tolist())
    assert set(prompts["rows"]) <= heldout  # prompted only with captions no run trained on

    record = json.loads((work / "results" / "metrics" / f"{run}.json").read_text())
    metrics = record["metrics"]
    assert {"fd_evaluator", "caption_score", "caption_accuracy", "val_loss"} <= set(metrics)
    assert "cond_accuracy" not in metrics and record["chance_accuracy"] is None
    assert 0.0 <= metrics["caption_accuracy"]["mean"] <= 1.0
    assert "clip_score" in record["skipped"]  # no CLIP weights offline: skipped with its reason, never faked
    assert record["sample_grid_prompts"] == prompts["prompts"][:12]  # what the grid was prompted with
