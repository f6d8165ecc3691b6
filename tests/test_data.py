"""Data layer: synthetic generator, raw sources, decoding/cropping, prepare + report (docs/formats.md)."""
import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ldm.data import synthetic as syn
from ldm.data.synthetic_writer import write_synthetic
from ldm.data.sources import open_source
from ldm.data.transforms import SkipImage, crop_and_resize, decode_image
from ldm.data.prepared import load_prepared
from ldm.errors import EmptyDatasetError
from ldm.stages.prepare import prepare, sample_rng

N = 40


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, N, seed=7, corrupt=2, shard_size=16)
    return root


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# --------------------------------------------------------------------------------------------- synthetic
def test_synthetic_same_seed_same_bytes_other_seed_differs(tmp_path):
    a, b, c = (write_synthetic(tmp_path / n, 24, seed=s, corrupt=1, shard_size=10) for n, s in
               (("a", 1), ("b", 1), ("c", 2)))
    fa, fb, fc = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert fa == fb and a == b
    assert {"captions/shard-00000.parquet", "captions/shard-00002.parquet", "dataset.json",
            "folders/metadata.jsonl"} <= set(fa)
    assert fa["folders/metadata.jsonl"] != fc["folders/metadata.jsonl"]
    assert fa["captions/shard-00000.parquet"] != fc["captions/shard-00000.parquet"]


def test_synthetic_dataset_json_and_captions_state_attributes(synth):
    info = json.loads((synth / "dataset.json").read_text())
    assert info["classes"] == list(syn.SHAPES) == sorted(syn.SHAPES)
    assert info["seed"] == 7 and info["num_images"] == N and info["corrupt"] == {"truncated": 1, "not_an_image": 1}
    assert info["attributes"] == {k: list(v) for k, v in syn.ATTRIBUTES.items()}
    recs = [json.loads(line) for line in (synth / "folders/metadata.jsonl").read_text().splitlines()]
    assert len(recs) == N
    for r in recs:
        attrs, words = r["attributes"], r["caption"].split()
        assert set(attrs) == set(syn.ATTRIBUTES)
        for name, value in attrs.items():
            assert value in syn.ATTRIBUTES[name]
            assert " ".join(words).count(value) >= 1 and all(w in words for w in value.split()), (value, r)
        assert r["file_name"].split("/")[0] == attrs["shape"]
        assert (synth / "folders" / r["file_name"]).is_file()


def test_synthetic_classes_balanced_and_vocab_covered():
    specs = syn.sample_specs(203, seed=3)
    counts = Counter(s["shape"] for s in specs)
    assert set(counts) == set(syn.SHAPES) and max(counts.values()) - min(counts.values()) <= 1
    for name, vocab in syn.ATTRIBUTES.items():
        assert {s[name] for s in specs} == set(vocab)
    for s in specs:
        assert syn.MIN_SIDE <= s["width"] <= syn.MAX_SIDE and syn.MIN_SIDE <= s["height"] <= syn.MAX_SIDE
        assert 0.5 <= s["width"] / s["height"] <= 2.0
    assert len({(s["width"], s["height"]) for s in specs}) > 100  # native sizes really vary


def test_backgrounds_contrast_with_every_colour():
    for bg in syn.BACKGROUNDS.values():
        for col in syn.COLOURS.values():
            assert np.linalg.norm(np.subtract(bg, col)) >= 100


def test_render_pixels_match_spec():
    for spec in syn.sample_specs(80, seed=11):
        img = np.asarray(syn.render(spec))
        h, w = spec["height"], spec["width"]
        assert img.shape == (h, w, 3)
        bg, col = syn.BACKGROUNDS[spec["background"]], syn.COLOURS[spec["colour"]]
        for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)):  # margin keeps corners background
            assert tuple(img[y, x]) == bg
        cx, cy, side = syn.object_box(spec)
        assert tuple(img[int(cy), int(cx)]) == col  # bbox centre is inside every shape
        ys, xs = np.nonzero(np.abs(img.astype(int) - bg).sum(-1) > 0)
        # drawn extent == size attribute x shorter side (a partly covered pixel at each end: <= 2 px)
        assert abs((xs.max() - xs.min() + 1) - side) <= 2 and abs((ys.max() - ys.min() + 1) - side) <= 2
        assert abs((xs.max() + xs.min() + 1) / 2 - cx) <= 1.0 and abs((ys.max() + ys.min() + 1) / 2 - cy) <= 1.0
        # position word: where the object sits within its free range, per axis (0 = left/top, 1 = right/bottom)
        fx, fy = syn.POSITIONS[spec["position"]]
        m = syn.MARGIN * min(h, w)
        for c, extent, f in ((cx, w, fx), (cy, h, fy)):
            free = extent - 2 * m - side
            assert abs((c - m - side / 2) / free - f) <= 0.041


def test_synthetic_layouts_hold_the_same_samples(synth):
    recs = [json.loads(line) for line in (synth / "folders/metadata.jsonl").read_text().splitlines()]
    table = pa.concat_tables([pq.read_table(p) for p in sorted((synth / "captions").glob("shard-*.parquet"))])
    assert table.num_rows == N and pq.read_table(synth / "captions/shard-00000.parquet").num_rows == 16
    for rec, row in zip(recs, table.to_pylist()):
        assert row["image"] == (synth / "folders" / rec["file_name"]).read_bytes()
        assert row["caption"] == rec["caption"]
        assert json.loads(row["attributes"]) == rec["attributes"]
        assert syn.SHAPES[row["label"]] == rec["attributes"]["shape"]


# ------------------------------------------------------------------------------------------- transforms
def _hostile_images() -> dict:
    """name -> (bytes, expected skip reason or None)."""
    good = _png(Image.new("RGB", (24, 24), (10, 200, 30)))
    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (16, 0, 32, 32))
    exif_src = Image.new("RGB", (40, 20), (255, 0, 0))
    exif_src.paste((0, 0, 255), (20, 0, 40, 20))  # stored: left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    return {
        "a/empty.png": (b"", "empty"),
        "a/truncated.png": (good[: len(good) // 2], "truncated"),
        "a/text.png": (b"not an image at all\n", "not_an_image"),
        "a/cmyk.jpg": (_jpeg(Image.new("CMYK", (32, 32), (0, 255, 255, 0))), None),
        "a/gray.png": (_png(Image.new("L", (30, 20), 100)), None),
        "a/rgba.png": (_png(Image.new("RGBA", (20, 30), (255, 0, 0, 128))), None),
        "b/palette.png": (_png(pal, transparency=0), None),
        "b/sixteen.png": (_png(Image.fromarray(np.full((20, 20), 32768, np.uint16))), None),
        "b/tiny.png": (_png(Image.new("RGB", (5, 7), (0, 0, 200))), None),
        "b/wide.png": (_png(Image.new("RGB", (100, 10), (9, 9, 9))), "extreme_aspect"),
        "b/exif.jpg": (_jpeg(exif_src, exif=exif.tobytes()), None),
        "b/bomb.png": (_png(Image.new("1", (10_000, 10_000))), "decompression_bomb"),
    }


def test_decode_image_modes_to_rgb():
    imgs = _hostile_images()
    def dec(name):
        out = decode_image(imgs[name][0], name)
        assert out.mode == "RGB"
        return np.asarray(out).astype(int)
    assert np.abs(dec("a/cmyk.jpg") - [255, 0, 0]).max() <= 3
    assert (dec("a/gray.png") == 100).all()
    assert np.abs(dec("a/rgba.png") - [255, 127, 127]).max() <= 1  # half-transparent red over white
    pal = dec("b/palette.png")
    assert (pal[:, :16] == 255).all() and (pal[:, 16:] == [0, 0, 255]).all()  # transparent index -> white
    assert (dec("b/sixteen.png") == 128).all()  # 32768 / 65535 * 255, scaled not clipped
    ex = dec("b/exif.jpg")
    assert ex.shape == (40, 20, 3)  # rotated to portrait
    assert np.abs(ex[:18] - [255, 0, 0]).max() <= 12 and np.abs(ex[22:] - [0, 0, 255]).max() <= 12


@pytest.mark.parametrize("name", ["a/empty.png", "a/truncated.png", "a/text.png", "b/bomb.png"])
def test_decode_image_rejects(name):
    data, reason = _hostile_images()[name]
    with pytest.raises(SkipImage) as e:
        decode_image(data, name)
    assert e.value.reason == reason


def test_decode_image_max_pixels_is_a_parameter():
    data = _png(Image.new("RGB", (100, 100)))
    assert decode_image(data, "k", max_pixels=10_000).size == (100, 100)
    with pytest.raises(SkipImage, match="decompression_bomb"):
        decode_image(data, "k", max_pixels=9_999)


def _bands(h, w):
    img = Image.new("RGB", (w, h), (0, 255, 0))
    if w > h:  # red and blue quarter bands along the long axis, green in the middle
        img.paste((255, 0, 0), (0, 0, w // 4, h))
        img.paste((0, 0, 255), (3 * w // 4, 0, w, h))
    else:
        img.paste((255, 0, 0), (0, 0, w, h // 4))
        img.paste((0, 0, 255), (0, 3 * h // 4, w, h))
    return img


@pytest.mark.parametrize("h,w,box", [(100, 200, (0, 50, 100, 100)), (200, 100, (50, 0, 100, 100))])
def test_center_crop_closed_form(h, w, box):
    out, meta = crop_and_resize(_bands(h, w), 50, "center", np.random.default_rng(0))
    assert meta == dict(orig_h=h, orig_w=w, crop_top=box[0], crop_left=box[1], crop_h=box[2], crop_w=box[3], flip=0)
    assert out.size == (50, 50) and (np.asarray(out) == [0, 255, 0]).all()  # the bands are cut off exactly


def test_center_crop_is_centered_square_for_any_size():
    rng = np.random.default_rng(5)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(20, 600, 2))
        if max(h, w) > 4 * min(h, w):
            continue
        R = int(rng.choice([32, 48, 64]))
        out, m = crop_and_resize(Image.new("RGB", (w, h)), R, "center", rng)
        s, tol = min(h, w), max(2, 0.02 * max(h, w))
        assert out.size == (R, R) and (m["orig_h"], m["orig_w"]) == (h, w)
        assert abs(m["crop_h"] - s) <= tol and abs(m["crop_w"] - s) <= tol
        assert abs(m["crop_top"] - (h - s) / 2) <= tol and abs(m["crop_left"] - (w - s) / 2) <= tol
        assert 0 <= m["crop_top"] <= h - m["crop_h"] and 0 <= m["crop_left"] <= w - m["crop_w"]


def test_tiny_image_upscaled_and_aspect_limit():
    out, m = crop_and_resize(Image.new("RGB", (5, 7)), 16, "center", np.random.default_rng(0))
    # short side 5 -> 16 (long 7 -> 22), crop rows 3..19 of 22 == rows 1..6 of 7 in the original
    assert out.size == (16, 16) and m == dict(orig_h=7, orig_w=5, crop_top=1, crop_left=0, crop_h=5, crop_w=5, flip=0)
    with pytest.raises(SkipImage, match="extreme_aspect"):
        crop_and_resize(Image.new("RGB", (100, 10)), 8, "center", np.random.default_rng(0))
    crop_and_resize(Image.new("RGB", (40, 10)), 8, "center", np.random.default_rng(0))  # 4:1 is allowed
    assert crop_and_resize(Image.new("RGB", (100, 10)), 8, "center", None, max_aspect=10)[0].size == (8, 8)
    with pytest.raises(ValueError, match="'middle'"):
        crop_and_resize(Image.new("RGB", (8, 8)), 8, "middle", None)


def _gradient(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (h + w)], -1).astype(np.uint8))


def test_random_crop_box_locates_the_pixels():
    img = _gradient(120, 300)
    lefts = set()
    for s in range(20):
        out, m = crop_and_resize(img, 40, "random", np.random.default_rng(s))
        lefts.add(m["crop_left"])
        assert m["crop_h"] == 120 and abs(m["crop_w"] - 120) <= 1 and m["flip"] == 0
        # independent reference: cut the recorded box from the original and resize it
        ref = img.crop((m["crop_left"], m["crop_top"], m["crop_left"] + m["crop_w"], m["crop_top"] + m["crop_h"]))
        diff = np.abs(np.asarray(ref.resize((40, 40), Image.LANCZOS), int) - np.asarray(out, int))
        assert diff.mean() < 2.5, (s, m, diff.mean())
    assert len(lefts) >= 10 and min(lefts) >= 0 and max(lefts) <= 180


def test_random_flip_mirrors_the_random_crop():
    img = _gradient(90, 150)
    flips = []
    for s in range(40):
        a, ma = crop_and_resize(img, 32, "random", np.random.default_rng(s))
        b, mb = crop_and_resize(img, 32, "random-flip", np.random.default_rng(s))
        # a mirrored crop's box is mirrored in the original's frame: left' = orig_w - left - width
        mirrored_left = ma["orig_w"] - ma["crop_left"] - ma["crop_w"]
        assert mb == {**ma, "flip": mb["flip"], "crop_left": mirrored_left if mb["flip"] else ma["crop_left"]}
        expect = np.asarray(a)[:, ::-1] if mb["flip"] else np.asarray(a)
        assert np.array_equal(np.asarray(b), expect)
        flips.append(mb["flip"])
    assert 10 <= sum(flips) <= 30


# --------------------------------------------------------------------------------------------- prepare
def _check_report(out: Path, report: dict):
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == report
    assert sum(s["rows"] for s in report["shards"]) == report["kept"]
    for s in report["shards"]:
        assert _sha(((out / s["file"]).read_bytes())) == s["sha256"]
    assert sorted(p.name for p in out.iterdir()) == sorted([s["file"] for s in report["shards"]] + ["report.json"])


def test_prepare_synthetic_keeps_good_counts_corrupt(synth, tmp_path):
    out = tmp_path / "p32"
    rep = prepare(str(synth), out, 32, crop="center", shard_size=15)
    assert rep["kept"] == N and rep["skipped"] == {"not_an_image": 1, "truncated": 1}
    assert rep["resolution"] == 32 and rep["crop"] == "center" and rep["classes"] == list(syn.SHAPES)
    assert [s["rows"] for s in rep["shards"]] == [15, 15, 10]
    _check_report(out, rep)
    x, df = load_prepared(out)
    assert x.shape == (N, 32, 32, 3) and x.dtype == np.uint8 and len(df) == N
    assert list(df.columns) == ["key", "label", "caption", "attributes", "orig_h", "orig_w",
                                "crop_top", "crop_left", "crop_h", "crop_w", "flip"]
    assert str(df["label"].dtype) == "int32" and str(df["flip"].dtype) == "int8"
    meta = {json.loads(line)["file_name"]: json.loads(line) for line in
            (synth / "folders/metadata.jsonl").read_text().splitlines()}
    for row in df.itertuples():
        rec = meta[row.key]
        assert row.caption == rec["caption"] and json.loads(row.attributes) == rec["attributes"]
        assert syn.SHAPES[row.label] == rec["attributes"]["shape"]
        with Image.open(synth / "folders" / row.key) as im:
            w, h = im.size
        assert (row.orig_h, row.orig_w) == (h, w) and row.flip == 0
    # idempotent: same arguments -> same bytes; fewer shards -> stale shard files removed
    assert prepare(str(synth), tmp_path / "again", 32, shard_size=15)["shards"] == rep["shards"]
    rep2 = prepare(str(synth), out, 32, shard_size=100)
    _check_report(out, rep2)
    assert len(rep2["shards"]) == 1


def test_prepare_randomness_depends_on_key_not_order(synth, tmp_path):
    full = prepare(str(synth / "folders"), tmp_path / "full", 24, crop="random-flip", seed=3)
    sub_root = tmp_path / "subset"
    shutil.copytree(synth / "folders" / "square", sub_root / "square")
    (sub_root / "circle").mkdir()  # labels shift in the subset; crops are compared by key only
    sub = prepare(str(sub_root), tmp_path / "sub", 24, crop="random-flip", seed=3)
    xa, da = load_prepared(tmp_path / "full")
    xb, db = load_prepared(tmp_path / "sub")
    cols = ["crop_top", "crop_left", "crop_h", "crop_w", "flip"]
    ia = {k: i for i, k in enumerate(da["key"])}
    for j, k in enumerate(db["key"]):
        i = ia[k]
        assert np.array_equal(xa[i], xb[j]) and da.loc[i, cols].tolist() == db.loc[j, cols].tolist()
    assert sub["kept"] == len(db) > 0 and 0 < da["flip"].sum() < full["kept"]
    other = prepare(str(synth / "folders"), tmp_path / "seed4", 24, crop="random-flip", seed=4)
    assert other["shards"][0]["sha256"] != full["shards"][0]["sha256"]


def test_random_crops_per_image_are_rows_of_their_own(synth, tmp_path):
    """`crops=K`: K random crops of every image, the first exactly the single-crop one, each with its own box;
    the held-out split keeps all crops of an image on one side."""
    from ldm.data.split import heldout_mask, image_key

    one = prepare(str(synth / "folders"), tmp_path / "one", 24, crop="random", seed=3)
    three = prepare(str(synth / "folders"), tmp_path / "three", 24, crop="random", seed=3, crops=3)
    x1, d1 = load_prepared(tmp_path / "one")
    x3, d3 = load_prepared(tmp_path / "three")
    assert three["kept"] == one["kept"] and len(d3) == 3 * len(d1) and three["crops_per_image"] == 3
    assert "crops_per_image" not in one
    by_image = d3.groupby(d3["key"].map(image_key))
    assert sorted(by_image.size().unique()) == [3] and sorted(by_image.groups) == sorted(d1["key"])
    first = {k: i for i, k in enumerate(d3["key"])}
    cols = ["crop_top", "crop_left", "crop_h", "crop_w"]
    for j, k in enumerate(d1["key"]):  # crop 0 is the single-crop prepare's crop
        assert np.array_equal(x1[j], x3[first[k]]) and d1.loc[j, cols].tolist() == d3.loc[first[k], cols].tolist()
    boxes = by_image.apply(lambda g: len({tuple(r) for r in g[["crop_top", "crop_left"]].values.tolist()}))
    assert (boxes > 1).mean() > 0.5  # most images get different crops
    held = heldout_mask(d3["key"].tolist(), 0.3, seed=0)
    assert all(len(set(held[list(idx)])) == 1 for idx in by_image.indices.values()) and 0 < held.sum() < len(held)
    with pytest.raises(ValueError, match="1 with the center crop"):
        prepare(str(synth / "folders"), tmp_path / "bad", 24, crop="center", crops=2)


def test_sample_rng_is_a_function_of_seed_and_key():
    draw = lambda seed, key: sample_rng(seed, key).integers(0, 2**62, 4).tolist()  # noqa: E731
    assert draw(0, "a/1.png") == draw(0, "a/1.png")
    assert len({str(draw(s, k)) for s in (0, 1) for k in ("a/1.png", "a/2.png", "shard-00000.parquet:0")}) == 6


def test_prepare_hostile_corpus(tmp_path):
    root = tmp_path / "raw"
    for name, (data, _) in _hostile_images().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "b/notes.txt").write_text("not an image extension: ignored")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "a/gray.png", "caption": "gray"}) + "\n")
    rep = prepare(str(root), tmp_path / "out", 16)
    expected = Counter(r for _, r in _hostile_images().values() if r)
    assert rep["kept"] == 7 and rep["skipped"] == dict(expected) and rep["classes"] == ["a", "b"]
    x, df = load_prepared(tmp_path / "out")
    px = {k: x[i].astype(int) for i, k in enumerate(df["key"])}
    row = {k: df.iloc[i] for i, k in enumerate(df["key"])}
    assert np.abs(px["a/cmyk.jpg"] - [255, 0, 0]).max() <= 3
    assert (px["a/gray.png"] == 100).all() and row["a/gray.png"].caption == "gray"
    assert row["a/cmyk.jpg"].caption == "" and row["a/cmyk.jpg"].attributes == "{}"
    assert np.abs(px["a/rgba.png"] - [255, 127, 127]).max() <= 1
    assert (px["b/sixteen.png"] == 128).all()
    assert (px["b/palette.png"][:, :6] == 255).all() and (px["b/palette.png"][:, 10:] == [0, 0, 255]).all()
    assert (px["b/tiny.png"] == [0, 0, 200]).all() and (row["b/tiny.png"].orig_h, row["b/tiny.png"].orig_w) == (7, 5)
    ex = row["b/exif.jpg"]
    assert (ex.orig_h, ex.orig_w, ex.crop_top, ex.crop_h) == (40, 20, 10, 20)  # size after EXIF rotation
    assert np.abs(px["b/exif.jpg"][:6] - [255, 0, 0]).max() <= 15
    assert np.abs(px["b/exif.jpg"][10:] - [0, 0, 255]).max() <= 15
    assert row["a/gray.png"].label == 0 and row["b/tiny.png"].label == 1


def test_prepare_empty_and_bad_arguments(tmp_path):
    root = tmp_path / "bad"
    (root / "x").mkdir(parents=True)
    (root / "x/a.png").write_bytes(b"")
    (root / "x/b.png").write_text("text")
    with pytest.raises(EmptyDatasetError, match=r"no usable images in .*bad: skipped \{'empty': 1, 'not_an_image': 1\}"):
        prepare(str(root), tmp_path / "out", 16)
    assert not (tmp_path / "out" / "report.json").exists()
    for kwargs, word in (({"resolution": 0}, "0"), ({"resolution": "64"}, "'64'"), ({"crop": "middle"}, "'middle'")):
        args = {"resolution": 16, **kwargs}
        with pytest.raises(ValueError, match=word):
            prepare(str(root), tmp_path / "out", **args)


# --------------------------------------------------------------------------------------------- sources
def _content(source) -> Counter:
    return Counter((_sha(s.read()), s.caption, s.label, json.dumps(s.attributes, sort_keys=True))
                   for s in source if "corrupt" not in s.key)


def _write_tar(path: Path, recs, synth, use_cls: bool):
    with tarfile.open(path, "w") as tar:
        for i, r in enumerate(recs):
            label = syn.SHAPES.index(r["attributes"]["shape"])
            parts = {"png": (synth / "folders" / r["file_name"]).read_bytes(), "txt": r["caption"].encode()}
            if use_cls:
                parts["cls"] = str(label).encode()
                parts["json"] = json.dumps({"attributes": r["attributes"]}).encode()
            else:
                parts["json"] = json.dumps({"label": label, "attributes": r["attributes"]}).encode()
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"d/{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_sources_read_the_same_samples(synth, tmp_path):
    folder = open_source(str(synth))
    assert folder.name.startswith("synthetic:") and folder.classes == list(syn.SHAPES)
    ref = _content(folder)
    assert sum(ref.values()) == N
    recs = [json.loads(line) for line in (synth / "folders/metadata.jsonl").read_text().splitlines()]
    _write_tar(tmp_path / "w-000.tar", recs[:25], synth, use_cls=True)
    _write_tar(tmp_path / "w-001.tar", recs[25:], synth, use_cls=False)
    for spec in (str(synth / "captions"), str(synth / "captions/shard-*.parquet"), str(tmp_path / "w-*.tar")):
        src = open_source(spec)
        assert _content(src) == ref, spec
        assert not src.skipped
    assert open_source(str(synth / "captions")).classes == list(syn.SHAPES)
    keys = [s.key for s in open_source(str(synth / "captions/shard-00001.parquet"))]
    assert keys == [f"shard-00001.parquet:{i}" for i in range(16)]
    # centre crops are deterministic, so every layout prepares to the same set of pixels
    pix = []
    for n, spec in (("o1", str(synth)), ("o2", str(tmp_path / "w-*.tar")), ("o3", str(synth / "captions"))):
        prepare(spec, tmp_path / n, 16)
        pix.append(sorted(_sha(a.tobytes()) for a in load_prepared(tmp_path / n)[0]))
    assert len(pix[0]) == N and pix[0] == pix[1] == pix[2]


def test_unreadable_captions_are_skipped_with_reason(tmp_path):
    good = _png(Image.new("RGB", (16, 16), (1, 2, 3)))
    (tmp_path / "img.png").write_bytes(good)
    table = pa.table({"image_path": ["img.png"] * 4, "caption": ["ok", None, "ok", "ok"],
                      "attributes": ['{"a": "b"}', "{}", "{not json", "[1]"]})
    pq.write_table(table, tmp_path / "caps.parquet")
    rep = prepare(str(tmp_path / "caps.parquet"), tmp_path / "out", 8)
    assert rep["kept"] == 1 and rep["skipped"] == {"bad_caption": 1, "bad_attributes": 2}
    _, df = load_prepared(tmp_path / "out")
    assert df["key"].tolist() == ["caps.parquet:0"] and df["label"].tolist() == [-1]
    with tarfile.open(tmp_path / "t.tar", "w") as tar:
        for name, data in (("a.png", good), ("a.txt", b"fine"), ("b.png", good), ("b.txt", b"\xff\xfe bad")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    src = open_source(str(tmp_path / "t.tar"))
    assert [(s.key, s.caption) for s in src] == [("t.tar:a", "fine")] and src.skipped == {"bad_caption": 1}
    with pytest.raises(FileNotFoundError):
        open_source(str(tmp_path / "missing.parquet"))


# ------------------------------------------------------------------------------- nothing silently wrong
def test_fifo_named_like_an_image_is_skipped_not_read(tmp_path):
    """A FIFO named x.png would block `read()` forever: it is skipped as `not_a_file` (in a thread with a
    deadline, so a regression fails instead of hanging the suite)."""
    import os
    import threading

    root = tmp_path / "raw"
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        (root / cls / "ok.png").write_bytes(_png(Image.new("RGB", (16, 16), (10, 20, 30) if cls == "a" else 0)))
    os.mkfifo(root / "a" / "x.png")
    result = {}
    worker = threading.Thread(target=lambda: result.update(prepare(str(root), tmp_path / "out", 8)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive():
        try:  # unblock a reader waiting for a writer, so the thread can end
            os.close(os.open(root / "a" / "x.png", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        pytest.fail("prepare blocked on a FIFO")
    assert result["kept"] == 2 and result["skipped"] == {"not_a_file": 1}


def test_images_without_class_subfolders_is_one_line(tmp_path, capsys):
    """Images at the top level and no class folder: one line saying they must be in class subfolders and
    how many sit at the top; images beside class folders are counted, not silently dropped."""
    from ldm.cli import main

    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        (root / f"{i}.png").write_bytes(_png(Image.new("RGB", (16, 16), (i, 0, 0))))
    with pytest.raises(EmptyDatasetError, match=r"flat: 3 images at its top level and no class subfolder; "
                                                r"images must be in class subfolders"):
        open_source(str(root))
    assert main(["prepare", str(root), "--out", str(tmp_path / "out"), "--resolution", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ldm prepare: error: ") and "class subfolders" in err
    (root / "a").mkdir()
    (root / "a" / "in.png").write_bytes(_png(Image.new("RGB", (16, 16), (9, 9, 9))))
    rep = prepare(str(root), tmp_path / "out", 8)
    assert rep["kept"] == 1 and rep["skipped"] == {"outside_class_folder": 3} and rep["classes"] == ["a"]


def test_missing_latent_shard_ends_with_how_to_recover(tmp_path):
    """A deleted cache shard is named, and the message ends with the recovery that `ldm encode` really does:
    rerun it with the cache's arguments and the manifest in place (intact shards are kept)."""
    from ldm.data.latent_cache import FORMAT, LatentDataset
    from ldm.errors import CorruptShardError

    (tmp_path / "manifest.json").write_text(json.dumps(
        {"format": FORMAT, "shards": [{"file": "shard-00000.safetensors", "rows": 2, "sha256": "0" * 64}]}))
    with pytest.raises(CorruptShardError) as info:
        LatentDataset(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'shard-00000.safetensors'}: shard listed in manifest is missing; to recover, "
                          f"rerun `ldm encode --out {tmp_path}` with the arguments that wrote it")
    assert "keeps every shard that still matches manifest.json and re-encodes the missing ones" in msg
    assert msg.endswith("re-encodes every shard)") and "\n" not in msg
