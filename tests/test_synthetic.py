"""The synthetic worlds (docs/synthetic-world.md): the simple world is byte-for-byte the original generator,
the rich one is deterministic and carries the correlations the paper's effects need (class <-> native
size/aspect, border placement that a crop cuts, a chiral class + skewed lighting that a flip changes,
captions of 2..30 words)."""
import hashlib
import io
import json
import math
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import PIL
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from ldm.data import synthetic as syn
from ldm.data.synthetic_writer import write_synthetic

# Digests of `write_synthetic(tmp, 40, seed=0, corrupt=2)` computed with the generator as it was before the
# rich world existed. BYTES: every file's exact bytes (PNG bytes depend on zlib, parquet bytes on the pyarrow
# version that wrote them, so it is checked only under the versions it was taken with). CONTENT: decoded
# pixels, parquet rows, metadata.jsonl and dataset.json bytes: independent of those library versions.
SIMPLE_BYTES_SHA = "6d2321a9831412969097ac0d395dd5aa4e5b69b33d474d44062475fbb3b96a13"
SIMPLE_BYTES_ENV = {"pillow": "13.0.0", "pyarrow": "26.0.1", "zlib": "1.2.13"}
SIMPLE_CONTENT_SHA = "8d3f7e541172b10c4782e9358fd685e21c050e13a0ec5736b1814a797a792452"

MIRROR = {"left": "right", "right": "left", "top left": "top right", "top right": "top left",
          "bottom left": "bottom right", "bottom right": "bottom left"}


def _bytes_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _pixels(h, img: Image.Image) -> None:
    h.update(img.mode.encode() + repr(img.size).encode() + img.tobytes())


def _content_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        if p.suffix == ".parquet":
            for row in pq.read_table(p).to_pylist():
                _pixels(h, Image.open(io.BytesIO(row.pop("image"))))
                h.update(json.dumps(row, sort_keys=True).encode())
        elif "corrupt-" in p.name:
            h.update(str(p.stat().st_size > 0).encode())
        elif p.suffix == ".png":
            _pixels(h, Image.open(p))
        else:
            h.update(p.read_bytes())
    return h.hexdigest()


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mutual_information_bits(xs, ys) -> float:
    n = len(xs)
    joint, px, py = Counter(zip(xs, ys)), Counter(xs), Counter(ys)
    return sum(c / n * math.log2(c * n / (px[x] * py[y])) for (x, y), c in joint.items())


def _tercile(values):
    lo, hi = np.quantile(values, [1 / 3, 2 / 3])
    return [0 if v <= lo else 1 if v <= hi else 2 for v in values]


# ------------------------------------------------------------------------------------------ simple world
@pytest.fixture(scope="module")
def simple40(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("simple40")
    write_synthetic(root, 40, seed=0, corrupt=2)
    return root


def test_simple_world_content_identical_to_original_generator(simple40):
    assert _content_digest(simple40) == SIMPLE_CONTENT_SHA


def test_simple_world_bytes_identical_to_original_generator(simple40):
    env = {"pillow": PIL.__version__, "pyarrow": pa.__version__, "zlib": zlib.ZLIB_RUNTIME_VERSION}
    if env != SIMPLE_BYTES_ENV:
        pytest.skip(f"byte digest was taken under {SIMPLE_BYTES_ENV}, this is {env} (content digest still checked)")
    assert _bytes_digest(simple40) == SIMPLE_BYTES_SHA


def test_world_argument_default_and_explicit_simple_agree(tmp_path, simple40):
    write_synthetic(tmp_path, 40, seed=0, corrupt=2, world="simple")
    assert _files(tmp_path) == _files(simple40)
    assert syn.sample_specs(30, 5) == syn.sample_specs(30, 5, world="simple")
    with pytest.raises(ValueError, match="unknown synthetic world"):
        syn.sample_specs(4, 0, world="fancy")


# -------------------------------------------------------------------------------------------- rich world
@pytest.fixture(scope="module")
def rich_specs() -> list[dict]:
    return syn.sample_specs(2000, seed=0, world="rich")


def test_rich_world_same_seed_same_bytes_other_seed_differs(tmp_path):
    infos = [write_synthetic(tmp_path / n, 40, seed=s, corrupt=2, shard_size=16, world="rich")
             for n, s in (("a", 3), ("b", 3), ("c", 4))]
    fa, fb, fc = (_files(tmp_path / n) for n in "abc")
    assert fa == fb and infos[0] == infos[1]
    assert fa["folders/metadata.jsonl"] != fc["folders/metadata.jsonl"]
    info = json.loads(fa["dataset.json"])
    assert info["world"] == "rich" and info["classes"] == list(syn.RICH_SHAPES) == sorted(syn.RICH_SHAPES)
    assert info["attributes"] == syn.attributes("rich") and set(syn.ATTRIBUTES) < set(info["attributes"])
    assert info["corrupt"] == {"truncated": 1, "not_an_image": 1}
    assert sorted(p.name for p in (tmp_path / "a/folders").iterdir() if p.is_dir()) == list(syn.RICH_SHAPES)
    # both layouts hold the same samples, every attribute within its vocabulary
    recs = [json.loads(line) for line in fa["folders/metadata.jsonl"].decode().splitlines()]
    table = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "a/captions").glob("shard-*.parquet"))])
    assert len(recs) == table.num_rows == 40
    for rec, row in zip(recs, table.to_pylist()):
        assert row["image"] == fa["folders/" + rec["file_name"]] and row["caption"] == rec["caption"]
        assert json.loads(row["attributes"]) == rec["attributes"]
        assert syn.RICH_SHAPES[row["label"]] == rec["attributes"]["shape"] == rec["file_name"].split("/")[0]
        assert all(rec["attributes"][k] in vocab for k, vocab in syn.RICH_ATTRIBUTES.items())


def test_rich_specs_prefix_stable_and_balanced(rich_specs):
    """Image i does not depend on how many images are drawn: keys and bytes stay put as N grows."""
    assert syn.sample_specs(37, seed=0, world="rich") == rich_specs[:37]
    assert [s["id"] for s in rich_specs[:3]] == ["000000", "000001", "000002"]
    for n in (37, 2000):
        counts = Counter(s["shape"] for s in rich_specs[:n])
        assert set(counts) == set(syn.RICH_SHAPES) and max(counts.values()) - min(counts.values()) <= 1
    for s in rich_specs:
        w, h = s["width"], s["height"]
        assert syn.RICH_MIN_SIDE <= min(w, h) and max(w, h) <= syn.RICH_MAX_SIDE and 0.5 <= w / h <= 2.0


def test_rich_original_size_and_aspect_predict_the_class(rich_specs):
    """Claim 1 needs something to leak: native size/aspect carry class information (none in the simple world)."""
    def stats(specs):
        labels = [s["label"] for s in specs]
        area = [s["width"] * s["height"] for s in specs]
        aspect = [s["width"] / s["height"] for s in specs]
        mean_area = {c: np.mean([a for a, s in zip(area, specs) if s["shape"] == c])
                     for c in {s["shape"] for s in specs}}
        mi = _mutual_information_bits
        return mi(labels, _tercile(area)), mi(labels, _tercile(aspect)), mean_area

    mi_area, mi_aspect, mean_area = stats(rich_specs)
    assert mi_area >= 0.4 and mi_aspect >= 0.4, (mi_area, mi_aspect)  # of log2(4) = 2 bits
    assert mean_area["square"] >= 4 * mean_area["circle"], mean_area
    assert np.median([s["width"] / s["height"] for s in rich_specs if s["shape"] == "square"]) < 0.8  # portrait
    assert np.median([s["width"] / s["height"] for s in rich_specs if s["shape"] == "circle"]) > 1.25  # landscape
    # every class still spans small and large originals (changing only the size stays in distribution)
    for c in syn.RICH_SHAPES:
        areas = [s["width"] * s["height"] for s in rich_specs if s["shape"] == c]
        assert min(areas) < 4000 and max(areas) > 25000, (c, min(areas), max(areas))
    mi_area_simple, mi_aspect_simple, _ = stats(syn.sample_specs(2000, seed=0))
    assert mi_area_simple < 0.02 and mi_aspect_simple < 0.02


def _visible_after_center_crop(spec) -> float:
    """Share of the object's bounding square inside the square center crop prepare takes."""
    w, h = spec["width"], spec["height"]
    m = min(w, h)
    left, top = (w - m) / 2, (h - m) / 2
    cx, cy, side = syn.object_box(spec)
    ox = max(0.0, min(cx + side / 2, left + m) - max(cx - side / 2, left))
    oy = max(0.0, min(cy + side / 2, top + m) - max(cy - side / 2, top))
    return ox * oy / side ** 2


def test_rich_border_classes_are_cut_by_a_center_crop(rich_specs):
    visible = {c: np.array([_visible_after_center_crop(s) for s in rich_specs if s["shape"] == c])
               for c in syn.RICH_SHAPES}
    cut = {c: float((v < 0.99).mean()) for c, v in visible.items()}
    assert cut["arrow"] >= 0.7 and cut["square"] >= 0.7, cut
    assert cut["circle"] <= 0.35 and cut["triangle"] <= 0.45, cut
    for c, v in visible.items():  # cut, but mostly still there: the class stays recognisable
        assert (v < 0.4).mean() <= 0.1, (c, (v < 0.4).mean())


def _mask(img: Image.Image, spec) -> np.ndarray:
    return np.abs(np.asarray(img).astype(int) - syn.BACKGROUNDS[spec["background"]]).max(-1) > 50


def _mirror_spec(spec) -> dict:
    """The spec whose render is the mirror image of `spec`'s, if the shape is mirror-symmetric."""
    return {**spec, "position": MIRROR.get(spec["position"], spec["position"]), "light": MIRROR[spec["light"]],
            "jitter": (-spec["jitter"][0], spec["jitter"][1])}


def _arrow_points_right(img: Image.Image, spec) -> bool:
    mask = _mask(img, spec)
    cols = mask.sum(0)
    tall = np.nonzero(cols > 0.5 * cols.max())[0]  # the head's columns (the shaft is a third of the height)
    return tall.mean() > np.nonzero(cols)[0].mean()


def _lit_left(img: Image.Image, spec, mirrored: bool = False) -> bool:
    """Is the object's left half (about its centre, in `img`) brighter than its right half?"""
    px = np.asarray(img).astype(float).sum(-1)
    mask = _mask(img, spec)
    cx = syn.object_box(spec)[0]
    cx = int(spec["width"] - cx if mirrored else cx)
    return px[:, :cx][mask[:, :cx]].mean() > px[:, cx + 1:][mask[:, cx + 1:]].mean()


def test_rich_flip_changes_the_distribution(rich_specs):
    """A mirrored circle/square/triangle is the render of another spec the world draws (mirrored position,
    other light side); a mirrored arrow is not (the world's arrows all point right), and the light side a
    mirror swaps is recoverable from the pixels and skewed (P_LIGHT_LEFT), so the flip flag carries information."""
    specs = rich_specs[:240]
    lit_left_native, lit_left_flipped = [], []
    for s in specs:
        img = syn.render(s)
        flipped = ImageOps.mirror(img)
        nearest = syn.render(_mirror_spec(s))
        side = syn.object_box(s)[2]
        differ = (_mask(flipped, s) ^ _mask(nearest, s)).sum() / side ** 2
        if s["shape"] == "arrow":
            assert differ > 0.2, (s, differ)
            assert _arrow_points_right(img, s) and not _arrow_points_right(flipped, s), s
        else:
            assert differ < 0.05, (s, differ)
        assert _lit_left(img, s) == (s["light"] == "left"), s
        lit_left_native.append(_lit_left(img, s))
        lit_left_flipped.append(_lit_left(flipped, s, mirrored=True))
    assert np.mean(lit_left_native) >= 0.75 and np.mean(lit_left_flipped) <= 0.25
    p_left = Counter(s["light"] for s in rich_specs)["left"] / len(rich_specs)
    assert p_left == pytest.approx(syn.P_LIGHT_LEFT, abs=0.03)
    # the simple world has neither: every mirrored image is the render of another spec it draws
    for s in syn.sample_specs(40, seed=0):
        m = {**s, "position": MIRROR.get(s["position"], s["position"]), "jitter": (-s["jitter"][0], s["jitter"][1])}
        differ = (_mask(ImageOps.mirror(syn.render(s)), s) ^ _mask(syn.render(m), s)).sum()
        assert differ / syn.object_box(s)[2] ** 2 < 0.05, s


def test_rich_captions_vary_in_length_and_state_only_true_facts(rich_specs):
    words = [len(syn.caption(s).split()) for s in rich_specs]
    assert min(words) == 2 and 25 <= max(words) <= syn.MAX_CAPTION_WORDS, (min(words), max(words))
    assert np.mean([n <= 3 for n in words]) >= 0.2 and np.mean([n >= 20 for n in words]) >= 0.15
    assert np.std(words) >= 8
    simple_words = [len(syn.caption(s).split()) for s in syn.sample_specs(500, seed=0)]
    assert max(simple_words) - min(simple_words) <= 4  # what the rich world fixes
    vocab_words = {"colour": set(syn.COLOURS), "size": set(syn.SIZES), "background": set(syn.BACKGROUNDS)}
    for s in rich_specs:
        text = syn.caption(s)
        assert text == syn.caption(dict(s)) == syn.rich_caption(s)  # a pure function of the spec
        tokens = set(text.replace(",", " ").split())
        assert s["shape"] in tokens and not (tokens & set(syn.RICH_SHAPES)) - {s["shape"]}, text
        for attr, vocab in vocab_words.items():
            assert tokens & vocab <= {s[attr]}, (attr, text)
        if "lit from the" in text:
            assert f"lit from the {s['light']}" in text
        if "frame" in text:
            assert f"in a {syn.frame_words(s['width'], s['height'])} frame" in text
        if "resolution" in text:
            assert f"at {syn.resolution_words(s['width'], s['height'])} resolution" in text
        if s["detail"] >= 3:
            assert s["colour"] in tokens and s["size"] in tokens and s["background"] in tokens
    assert len({syn.caption(s) for s in rich_specs}) > 1000


def test_rich_then_simple_in_one_root_leaves_no_stale_class_or_image(tmp_path):
    write_synthetic(tmp_path / "mixed", 24, seed=1, corrupt=1, world="rich")
    write_synthetic(tmp_path / "mixed", 12, seed=1, corrupt=1)
    write_synthetic(tmp_path / "fresh", 12, seed=1, corrupt=1)
    assert _files(tmp_path / "mixed") == _files(tmp_path / "fresh")
    assert sorted(p.name for p in (tmp_path / "mixed/folders").iterdir() if p.is_dir()) == list(syn.SHAPES)


def test_rich_world_prepares(tmp_path):
    from ldm.stages.prepare import prepare

    write_synthetic(tmp_path / "raw", 24, seed=2, corrupt=3, world="rich")
    rep = prepare(str(tmp_path / "raw" / "folders"), tmp_path / "prep", resolution=32, crop="random-flip", seed=0)
    assert rep["kept"] == 24 and sum(rep["skipped"].values()) == 3 and rep["classes"] == list(syn.RICH_SHAPES)
