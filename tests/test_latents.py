"""Autoencoder, text encoders and the latent cache, checked against independent references:
diffusers' own `vae.encode`, a direct transformers call on MiniLM, bit-identical files after resume."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm.autoencoder import (MissingWeightsError, load_vae, tiny_vae_config, train_tiny_vae,
                             vae_identity)
from ldm.errors import CorruptShardError
from ldm.data.latent_cache import LatentDataset, ShardShuffledLatents, map_safetensors, sample_latents, vae_sha256
from ldm.stages.encode import encode_latents
from ldm.text import load_text_encoder, minilm_path, pad_tokens

# The smallest AutoencoderKL with factor-4 downsampling: keeps every test on one thread fast.
SMALL = dict(block_out_channels=(8, 16, 16), norm_num_groups=8)
CAPTIONS = ["a red square", "", "two blue circles on a green background", "x", "a yellow triangle",
            "a purple square next to a small orange circle", "grey"]


def shapes(n: int, r: int, seed: int) -> np.ndarray:
    """Flat-colour rectangles on flat backgrounds, uint8 n x r x r x 3."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, r, r, 3), np.uint8)
    for i in range(n):
        out[i] = rng.integers(0, 256, 3)
        for _ in range(2):
            y, x = rng.integers(0, r - 4, 2)
            h, w = rng.integers(3, r // 2, 2)
            out[i, y:y + h, x:x + w] = rng.integers(0, 256, 3)
    return out


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_prepared(d: Path, images: np.ndarray, rows_per_file: int = 4) -> dict:
    """A prepared directory as docs/formats.md specifies (parquet shards + report.json)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    d.mkdir(parents=True)
    n, r = len(images), images.shape[1]
    rows = []
    for i, im in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        rows.append({"key": f"img{i}", "image": buf.getvalue(), "label": i % 3, "caption": CAPTIONS[i % 7],
                     "attributes": json.dumps({"shape": "square"}), "orig_h": 40 + i, "orig_w": 50 + i,
                     "crop_top": i, "crop_left": 2 * i, "crop_h": 32 + i, "crop_w": 32 + i, "flip": i % 2})
    schema = pa.schema([("key", pa.string()), ("image", pa.binary()), ("label", pa.int32()),
                        ("caption", pa.string()), ("attributes", pa.string()),
                        *[(c, pa.int32()) for c in ("orig_h", "orig_w", "crop_top", "crop_left", "crop_h", "crop_w")],
                        ("flip", pa.int8())])
    shards = []
    for k, a in enumerate(range(0, n, rows_per_file)):
        name = f"shard-{k:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[a:a + rows_per_file], schema=schema), d / name)
        shards.append({"file": name, "rows": len(rows[a:a + rows_per_file]), "sha256": sha(d / name)})
    report = {"kept": n, "skipped": {}, "resolution": r, "crop": "center", "classes": ["a", "b", "c"],
              "shards": shards, "source": "test"}
    (d / "report.json").write_text(json.dumps(report))
    return {"rows": rows, "report": report}


def to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return shapes(7, 32, seed=1)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory, images) -> Path:
    out = tmp_path_factory.mktemp("vae") / "tiny"
    train_tiny_vae([images, shapes(3, 16, 2)], out, steps=2, batch_size=4, lr=1e-3, seed=0,
                   config=tiny_vae_config(**SMALL))
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory, images, vae_dir) -> dict:
    root = tmp_path_factory.mktemp("enc")
    prep = write_prepared(root / "prepared", images)
    a = encode_latents(root / "prepared", str(vae_dir), root / "a", batch_size=2, shard_size=3)
    return {"root": root, "prepared": prep, "run_a": a, "a": root / "a"}


# ------------------------------------------------------------------------------------------ VAE
def test_tiny_vae_trained_from_a_prepared_reader_is_the_one_trained_from_decoded_arrays(tmp_path, cache):
    """train-vae reads `PreparedImages` (only the batches drawn are decoded): the weights are bit-identical."""
    from ldm.data.prepared import load_prepared, open_prepared

    kw = dict(steps=3, batch_size=4, lr=1e-3, seed=0, config=tiny_vae_config(**SMALL))
    decoded = load_prepared(cache["root"] / "prepared")[0]
    train_tiny_vae([decoded], tmp_path / "arrays", **kw)
    train_tiny_vae([open_prepared(cache["root"] / "prepared")[0]], tmp_path / "reader", **kw)
    w = "diffusion_pytorch_model.safetensors"
    assert sha(tmp_path / "arrays" / w) == sha(tmp_path / "reader" / w)


def test_train_tiny_vae_is_deterministic_and_writes_factors(tmp_path, vae_dir):
    imgs = [shapes(7, 32, seed=1), shapes(3, 16, seed=2)]
    kw = dict(steps=2, batch_size=4, lr=1e-3, config=tiny_vae_config(**SMALL))
    r1 = train_tiny_vae(imgs, tmp_path / "v1", seed=0, **kw)
    r2 = train_tiny_vae(imgs, tmp_path / "v2", seed=0, **kw)
    train_tiny_vae(imgs, tmp_path / "v3", seed=1, **kw)
    w = "diffusion_pytorch_model.safetensors"
    assert sha(tmp_path / "v1" / w) == sha(tmp_path / "v2" / w) == sha(vae_dir / w)
    assert sha(tmp_path / "v1" / w) != sha(tmp_path / "v3" / w)
    assert r1["psnr"] == r2["psnr"] and r1["heldout_images"] == 2
    assert vae_identity(str(tmp_path / "v1")) == {**vae_identity(str(tmp_path / "v2")), "source": str(tmp_path / "v1")}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind

    vae = load_vae(str(tmp_path / "v1"))
    cfg = json.loads((tmp_path / "v1" / "config.json").read_text())
    assert cfg["scaling_factor"] == vae.config.scaling_factor == r1["scaling_factor"] != 1.0
    assert cfg["shift_factor"] == vae.config.shift_factor == r1["shift_factor"] != 0.0
    # Independent check of the factors: fresh posterior samples of the training images, scaled, are
    # standardised (training images = all but the last held-out image of each array).
    with torch.no_grad():
        g = torch.Generator().manual_seed(123)
        z = torch.cat([vae.encode(to_unit(a[:-1])).latent_dist.sample(generator=g).flatten() for a in imgs])
    zs = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(float(zs.mean())) < 0.05 and abs(float(zs.std()) - 1) < 0.05


def test_load_vae_missing_is_fast_and_named(tmp_path):
    t = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="no-such-dir"):
        load_vae(str(tmp_path / "no-such-dir"))
    with pytest.raises(MissingWeightsError, match="nobody-here/no-such-vae"):
        load_vae("nobody-here/no-such-vae")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(MissingWeightsError, match="diffusion_pytorch_model.safetensors"):
        load_vae(str(tmp_path / "half"))
    assert time.perf_counter() - t < 5


def _sd_like_vae():
    """An AutoencoderKL with the sd-vae-ft-mse config layout (4 blocks, factor 8, mid attention,
    scaling 0.18215) but tiny widths."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                         block_out_channels=[8, 16, 16, 16], norm_num_groups=8, sample_size=64,
                         scaling_factor=0.18215)


def test_load_vae_pretrained_layouts(tmp_path):
    ref = _sd_like_vae()
    ref.save_pretrained(tmp_path / "sd-vae-ft-mse", safe_serialization=True)
    ref.save_pretrained(tmp_path / "pipeline" / "vae", safe_serialization=True)
    (tmp_path / "pipeline" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    # A hub cache as huggingface_hub lays it out, for a full pipeline repo (VAE under vae/).
    snap = tmp_path / "hub" / "models--org--tiny-sd" / "snapshots" / "0123abcd"
    ref.save_pretrained(snap / "vae", safe_serialization=True)
    (snap / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (tmp_path / "hub" / "models--org--tiny-sd" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny-sd" / "refs" / "main").write_text("0123abcd")

    x = to_unit(shapes(1, 32, 3))
    with torch.no_grad():
        want = ref.eval().encode(x).latent_dist.mean
    for vae in (load_vae(str(tmp_path / "sd-vae-ft-mse")), load_vae(str(tmp_path / "pipeline")),
                load_vae("org/tiny-sd", cache_dir=tmp_path / "hub")):
        assert vae.config.scaling_factor == 0.18215
        with torch.no_grad():
            assert torch.equal(vae.encode(x).latent_dist.mean, want)
        assert want.shape[-1] == 32 // 8
    ids = {vae_identity(str(tmp_path / p))["weights_sha256"] for p in ("sd-vae-ft-mse", "pipeline")}
    assert len(ids) == 1


# ------------------------------------------------------------------------------------------ text
def test_pad_modes_exact():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(3, 8, 5, generator=g)
    lengths = torch.tensor([3, 8, 1])
    pos = torch.arange(8)
    real = pos[None] < lengths[:, None]

    out, mask = pad_tokens(states, lengths, "replicate")
    assert mask.all()
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(out[i, :n], states[i, :n])
        for j in range(n, 8):
            assert torch.equal(out[i, j], states[i, j % n])
    out, mask = pad_tokens(states, lengths, "zero_mask")
    assert torch.equal(mask, real) and torch.equal(out[real], states[real]) and not out[~real].any()
    out, mask = pad_tokens(states, lengths, "zero")
    assert mask.all() and torch.equal(out[real], states[real]) and not out[~real].any()
    with pytest.raises(ValueError, match="pad mode"):
        pad_tokens(states, lengths, "mirror")


def test_noisy_replicate_noise_scale():
    D, sigma = 4096, 0.1
    states = torch.randn(2, 6, D) * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.0, 1.0])[None, :, None]
    lengths = torch.tensor([2, 4])
    clean, _ = pad_tokens(states, lengths, "replicate")
    noisy, mask = pad_tokens(states, lengths, "noisy_replicate", sigma=sigma,
                             generator=torch.Generator().manual_seed(1))
    again, _ = pad_tokens(states, lengths, "noisy_replicate", sigma=sigma,
                          generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again) and mask.all()
    for i, n in enumerate(lengths.tolist()):
        assert torch.equal(noisy[i, :n], states[i, :n])
        for j in range(n, 6):
            ratio = (noisy[i, j] - clean[i, j]).std() / (sigma * states[i, j % n].std())
            assert abs(float(ratio) - 1) < 0.05


def test_text_encoder_missing_and_none(tmp_path):
    assert load_text_encoder(None) is None and load_text_encoder("none") is None
    t = time.perf_counter()
    with pytest.raises(MissingWeightsError, match="nowhere"):
        load_text_encoder(str(tmp_path / "nowhere"))
    with pytest.raises(MissingWeightsError, match="nobody-here/no-such-t5"):
        load_text_encoder("nobody-here/no-such-t5")
    assert time.perf_counter() - t < 5


def _tiny_clip(d: Path, vocab_tokens: bool = True):
    """A CLIP text model + byte-level CLIPTokenizer (no merges) saved as a hub checkpoint would be."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values()) if vocab_tokens else []
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(d)
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=40, bos_token_id=512,
                                 eos_token_id=513, pad_token_id=513)).save_pretrained(d)


def test_clip_text_encoder_matches_direct_call(tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    _tiny_clip(tmp_path / "clip")
    te = load_text_encoder(str(tmp_path / "clip"), max_length=16)
    assert te.kind == "clip" and te.dim == 32
    caps = ["a red square", "", "a very long caption that is cut at sixteen tokens"]
    states, lengths = te.encode(caps)
    tok = CLIPTokenizer.from_pretrained(tmp_path / "clip")
    enc = tok(caps, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        want = CLIPTextModel.from_pretrained(tmp_path / "clip")(**enc).last_hidden_state
    assert lengths.tolist() == enc["attention_mask"].sum(1).tolist() == [12, 2, 16] and states.shape == (3, 16, 32)
    for i, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(states[i, :n], want[i, :n])
        assert not states[i, n:].any()
    # A tokenizer that comes back (nearly) empty is refused instead of encoding every caption alike.
    _tiny_clip(tmp_path / "empty", vocab_tokens=False)
    with pytest.raises(MissingWeightsError, match="empty vocabulary"):
        load_text_encoder(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------- latent cache
def test_cache_matches_direct_vae_and_text_calls(cache, images, vae_dir):
    from transformers import AutoModel, AutoTokenizer

    m = cache["run_a"]
    assert m["count"] == 7 and m["num_shards"] == 3 and [s["rows"] for s in m["shards"]] == [3, 3, 1]
    assert m["latent_shape"] == [4, 8, 8] and m["crop"] == "center" and m["classes"] == ["a", "b", "c"]
    assert m["vae"] == vae_identity(str(vae_dir))
    # what a metrics record names as its autoencoder: the weights file's own sha256
    assert vae_sha256(cache["a"]) == hashlib.sha256((vae_dir / "diffusion_pytorch_model.safetensors")
                                                        .read_bytes()).hexdigest()
    assert vae_sha256(cache["a"] / "nowhere") is None
    vae = load_vae(str(vae_dir))
    assert m["scaling_factor"] == vae.config.scaling_factor and m["shift_factor"] == vae.config.shift_factor
    assert m["text_encoder"] == {"name": "minilm", "dim": 384, "max_length": 32}

    t = LatentDataset(cache["a"]).tensors()
    with torch.no_grad():
        post = vae.encode(to_unit(images)).latent_dist
        post_f = vae.encode(to_unit(images[:, :, ::-1])).latent_dist
    for name, want in (("mean", post.mean), ("std", post.std), ("mean_flip", post_f.mean), ("std_flip", post_f.std)):
        assert t[name].dtype == torch.float16 and t[name].shape == (7, 4, 8, 8)
        torch.testing.assert_close(t[name].float(), want, atol=1e-3, rtol=1e-3)
    rows = cache["prepared"]["rows"]
    assert t["label"].tolist() == [r["label"] for r in rows]
    assert t["control"].tolist() == [[r[c] for c in ("orig_h", "orig_w", "crop_top", "crop_left", "crop_h", "crop_w", "flip")]
                                     for r in rows]

    tok = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModel.from_pretrained(minilm_path()).eval()
    enc = tok([r["caption"] for r in rows], padding="max_length", truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        want = model(**enc).last_hidden_state * enc["attention_mask"][..., None]
    assert t["text_emb"].dtype == torch.float16 and t["text_emb"].shape == (7, 32, 384)
    assert torch.equal(t["text_len"], enc["attention_mask"].sum(1))
    torch.testing.assert_close(t["text_emb"].float(), want, atol=2e-3, rtol=1e-3)


def test_dataset_items_and_sampling(cache):
    ds = LatentDataset(cache["a"])
    t = ds.tensors()
    assert len(ds) == 7 and ds.classes == ["a", "b", "c"]
    for i in (0, 3, 6):
        item = ds[i]
        for k in ("mean", "std_flip", "label", "control", "text_emb", "text_len"):
            assert torch.equal(item[k], t[k][i])
    scale, shift = ds.scaling_factor, ds.shift_factor
    # std = 0: z is exactly the chosen (possibly mirrored) mean, shifted and scaled.
    det = {**t, "std": torch.zeros_like(t["std"]), "std_flip": torch.zeros_like(t["std_flip"])}
    z, flips = sample_latents(det, torch.Generator().manual_seed(0), flip_prob=1.0)
    assert flips.all() and torch.allclose(z, (t["mean_flip"].float() - shift) * scale)
    z, flips = sample_latents(det, torch.Generator().manual_seed(0), flip_prob=0.0)
    assert not flips.any() and torch.allclose(z, (t["mean"].float() - shift) * scale)
    # Noise: many draws of one row have mean (mean - shift) * scale and std std * scale.
    one = {k: v[:1].expand(4000, *v.shape[1:]) if v.dim() else v for k, v in t.items()}
    z, flips = sample_latents(one, torch.Generator().manual_seed(0), flip_prob=0.0)
    torch.testing.assert_close(z.mean(0), (t["mean"][0].float() - shift) * scale, atol=0.1 * scale, rtol=0)
    torch.testing.assert_close(z.std(0) / (t["std"][0].float() * scale), torch.ones(4, 8, 8), atol=0.1, rtol=0)
    z1, f1 = sample_latents(t, torch.Generator().manual_seed(5))
    z2, f2 = sample_latents(t, torch.Generator().manual_seed(5))
    assert torch.equal(z1, z2) and torch.equal(f1, f2)


def test_mapped_rows_equal_loaded_tensors(cache, tmp_path):
    """Training's memory-mapped reader gives exactly the rows of the loaded, concatenated cache: across
    shard boundaries (7 rows in shards of 3), in any order, with repeats; bad indices are refused."""
    ds = LatentDataset(cache["a"])
    t, rows = ds.tensors(), ds.rows()
    assert len(ds.shards) == 3 and len(rows) == 7
    assert set(rows.names) == {k for k, v in t.items() if v.dim() > 0}
    idx = torch.tensor([6, 0, 3, 3, 2, 5, 1, 4, 6])
    got = rows.gather(idx)
    for name in rows.names:
        assert got[name].dtype == t[name].dtype and torch.equal(got[name], t[name][idx]), name
    assert torch.equal(rows.column("label"), t["label"])
    assert set(rows.gather(torch.tensor([1]), ["text_len"])) == {"text_len"}
    with pytest.raises(IndexError, match="out of range"):
        rows.gather(torch.tensor([7]))
    # every dtype a safetensors file can hold maps to the same values safetensors itself loads
    from safetensors.torch import load_file, save_file
    mixed = {"bf16": torch.randn(5, 3).bfloat16(), "f64": torch.randn(2).double(), "i8": torch.arange(3, dtype=torch.int8),
             "b": torch.tensor([True, False]), "u8": torch.arange(7, dtype=torch.uint8), "f32": torch.randn(4, 2)}
    save_file(mixed, str(tmp_path / "m.safetensors"), {"note": "metadata is skipped"})
    mapped, loaded = map_safetensors(tmp_path / "m.safetensors"), load_file(str(tmp_path / "m.safetensors"))
    assert mapped.keys() == loaded.keys()
    for name, value in loaded.items():
        assert mapped[name].dtype == value.dtype and torch.equal(mapped[name], value), name


def test_resume_reencodes_only_missing_shard_bit_identically(cache, vae_dir):
    root, a = cache["root"], cache["a"]
    b = root / "b"
    encode_latents(root / "prepared", str(vae_dir), b, batch_size=2, shard_size=3)
    files = sorted(p.name for p in a.iterdir())
    assert files == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    assert [sha(b / f) for f in files] == [sha(a / f) for f in files]  # clean runs agree bit for bit

    mtimes = {f: (b / f).stat().st_mtime_ns for f in files}
    (b / "shard-00001.safetensors").unlink()
    run = encode_latents(root / "prepared", str(vae_dir), b, batch_size=2, shard_size=3)["run"]
    assert run == {"encoded": ["shard-00001.safetensors"], "reused": ["shard-00000.safetensors", "shard-00002.safetensors"],
                   "corrupt": []}
    assert sorted(p.name for p in b.iterdir()) == files
    assert [sha(b / f) for f in files] == [sha(a / f) for f in files]
    assert all((b / f).stat().st_mtime_ns == mtimes[f] for f in ("shard-00000.safetensors", "shard-00002.safetensors"))

    # A shard whose bytes no longer match its recorded checksum is re-encoded too.
    (b / "shard-00002.safetensors").write_bytes(b"garbage")
    run = encode_latents(root / "prepared", str(vae_dir), b, batch_size=2, shard_size=3)["run"]
    assert run["encoded"] == run["corrupt"] == ["shard-00002.safetensors"]
    assert sha(b / "shard-00002.safetensors") == sha(a / "shard-00002.safetensors")


def test_corrupt_shard_is_named(cache, tmp_path):
    c = tmp_path / "c"
    shutil.copytree(cache["a"], c)
    p = c / "shard-00002.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="shard-00002.safetensors"):
        LatentDataset(c)
    assert len(LatentDataset(c, verify=False)) == 7
    os.remove(c / "shard-00000.safetensors")
    with pytest.raises(CorruptShardError, match="shard-00000.safetensors"):
        LatentDataset(c)


def _row_ids(items) -> list[int]:
    """Prepared row index of each item or batch (write_prepared sets orig_h = 40 + row)."""
    return [int(h) - 40 for it in items for h in it["control"].reshape(-1, 7)[:, 0].tolist()]


def test_shard_shuffled_reader_epochs_windows_workers(cache):
    ds = ShardShuffledLatents(cache["a"], window=1, seed=3)
    ref = LatentDataset(cache["a"])
    shard_rows = [[0, 1, 2], [3, 4, 5], [6]]
    orders = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        items = list(ds)
        ids = _row_ids(items)
        assert sorted(ids) == list(range(7))  # every row exactly once per epoch
        # window 1: each shard's rows come out contiguously, shards in the epoch's shard order
        assert [sorted(ids[a:a + len(shard_rows[k])]) for a, k in
                zip(np.cumsum([0] + [len(shard_rows[k]) for k in ds.shard_order(epoch)]), ds.shard_order(epoch))] \
            == [shard_rows[k] for k in ds.shard_order(epoch)]
        for it, i in zip(items, ids):
            assert all(torch.equal(it[k], ref[i][k]) for k in ref[i])
        orders.append(ids)
    assert len({tuple(o) for o in orders}) > 1 and len({tuple(ds.shard_order(e)) for e in range(6)}) > 1
    ds.set_epoch(2)
    assert _row_ids(ds) == orders[2]  # an epoch is reproducible from (seed, epoch)
    assert _row_ids(ds) == orders[3]  # without set_epoch, the next iteration is the next epoch
    # A window covering all shards shuffles rows across shards.
    wide = ShardShuffledLatents(cache["a"], window=3, seed=3)
    mixed = []
    for epoch in range(4):
        wide.set_epoch(epoch)
        mixed.append(_row_ids(wide))
    assert all(sorted(m) == list(range(7)) for m in mixed)
    assert any(sorted(m[:3]) not in shard_rows for m in mixed)

    # Ranks split the shards, and each rank's workers split its share: disjoint, complete.
    seen = []
    for rank in range(2):
        r = ShardShuffledLatents(cache["a"], window=2, seed=3, rank=rank, world_size=2)
        loader = torch.utils.data.DataLoader(r, batch_size=2, num_workers=2, persistent_workers=True)
        epochs = [_row_ids(loader) for _ in range(2)]
        assert sorted(epochs[0]) == sorted({i for k in r.shard_order(0) for i in shard_rows[k]})
        assert sorted(epochs[1]) == sorted({i for k in r.shard_order(1) for i in shard_rows[k]})
        seen.append(epochs[0])
    assert sorted(seen[0] + seen[1]) == list(range(7))
    with pytest.raises(ValueError, match="rank"):
        ShardShuffledLatents(cache["a"], rank=2, world_size=2)


def test_heldout_rows_are_flagged_by_key_and_left_out_of_training_rows(cache, vae_dir):
    """`encode --heldout` flags rows by `ldm.data.split` on the prepared keys; the cache's training rows are
    exactly the others, and without a split (fraction 0) the shards carry no flag at all."""
    import pyarrow.parquet as pq

    from ldm.data.split import heldout_mask

    out = cache["root"] / "split"
    m = encode_latents(cache["root"] / "prepared", str(vae_dir), out, batch_size=2, shard_size=3, heldout=0.4,
                       split_seed=3)
    keys = [k for f in sorted((cache["root"] / "prepared").glob("shard-*.parquet"))
            for k in pq.read_table(f, columns=["key"]).column("key").to_pylist()]
    expect = torch.from_numpy(heldout_mask(keys, 0.4, 3))
    assert 0 < int(expect.sum()) < len(keys) and m["heldout"]["rows"] == int(expect.sum())
    ds = LatentDataset(out)
    assert ds.split_rows(heldout=True).tolist() == torch.nonzero(expect).flatten().tolist()
    assert ds.split_rows(heldout=False).tolist() == torch.nonzero(~expect).flatten().tolist()
    plain = LatentDataset(cache["a"])
    assert "heldout" not in plain.rows() and plain.split_rows(heldout=False).tolist() == list(range(len(plain)))


def test_a_rank_reads_only_its_share_of_a_global_batch(cache):
    """`gather(idx, keep=share)`: the kept positions equal the full gather, the others are zeros, and only the
    kept rows are read (bytes_read counts them), so a rank reads 1/world of the global batch."""
    from ldm.data.latent_cache import LatentDataset

    rows = LatentDataset(cache["a"], verify=False).rows()
    n = len(rows)
    idx = torch.tensor([5, 0, 7, 3, 3, 1, 8, 9]) % n  # across shards of 3 rows, a repeat
    full = rows.gather(idx)
    per_batch = rows.bytes_read
    share = rows.gather(idx, keep=slice(4, 8))
    assert rows.bytes_read - per_batch == per_batch // 2
    for name in rows.names:
        assert torch.equal(share[name][4:], full[name][4:]) and not share[name][:4].any()
