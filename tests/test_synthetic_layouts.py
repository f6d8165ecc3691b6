"""`ldm synthesize --layout imagenet|cc12m`: the rich world in the layouts of the paper's datasets, read back by
the same sources `prepare` uses for real data; deterministic to the byte; no class anywhere in the CC12M one."""
import csv
import io
import json
import tarfile

import pytest
from PIL import Image

from ldm.data.sources import open_source
from ldm.data.synthetic_layouts import synset_attributes, wnid, write_cc12m_layout, write_imagenet_layout


def test_imagenet_layout_is_an_ilsvrc_tree_of_distinct_synsets(tmp_path):
    info = write_imagenet_layout(tmp_path / "in", classes=12, per_class=2, val_per_class=1, seed=0)
    assert info == {"layout": "imagenet", "classes": 12, "train_images": 24, "val_images": 12}
    train = sorted(p.name for p in (tmp_path / "in" / "train").iterdir())
    assert train == [wnid(k) for k in range(12)] and train[0] == "n01440764"
    assert sorted(p.name for p in (tmp_path / "in" / "train" / train[3]).iterdir()) == [f"{train[3]}_0.JPEG",
                                                                                      f"{train[3]}_1.JPEG"]
    src = open_source(str(tmp_path / "in" / "train"))
    samples = list(src)
    assert src.classes == train and sorted(s.label for s in samples) == sorted(list(range(12)) * 2)
    with open(tmp_path / "in" / "LOC_val_solution.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["ImageId"] for r in rows] == [f"ILSVRC2012_val_{i:08d}" for i in range(1, 13)]
    for r in rows:
        name, *box = r["PredictionString"].split()
        img = Image.open(tmp_path / "in" / "val" / f"{r['ImageId']}.JPEG")
        assert img.format == "JPEG" and name in train
        x0, y0, x1, y1 = map(int, box)
        assert 0 <= x0 < x1 < img.width and 0 <= y0 < y1 < img.height
    mapping = (tmp_path / "in" / "LOC_synset_mapping.txt").read_text().splitlines()
    assert [m.split()[0] for m in mapping] == train
    combos = synset_attributes(1000, seed=0)
    assert len({tuple(sorted(c.items())) for c in combos}) == 1000  # 1,000 distinct classes
    with pytest.raises(ValueError, match="classes must be in 1..1728"):
        synset_attributes(2000, seed=0)
    # deterministic to the byte
    write_imagenet_layout(tmp_path / "again", classes=12, per_class=2, val_per_class=1, seed=0)
    for p in (tmp_path / "in").rglob("*.JPEG"):
        assert p.read_bytes() == (tmp_path / "again" / p.relative_to(tmp_path / "in")).read_bytes()


def test_cc12m_layout_is_img2dataset_shards_without_classes(tmp_path):
    info = write_cc12m_layout(tmp_path / "cc", num_images=25, seed=1, shard_size=10)
    assert info == {"layout": "cc12m", "images": 25, "shards": 3}
    assert sorted(p.name for p in (tmp_path / "cc").iterdir()) == [
        "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json", "00002.tar", "00002_stats.json"]
    with tarfile.open(tmp_path / "cc" / "00001.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["000010000.jpg", "000010000.txt", "000010000.json"] and len(names) == 30
        meta = json.loads(tar.extractfile("000010003.json").read())
        caption = tar.extractfile("000010003.txt").read().decode()
        img = Image.open(io.BytesIO(tar.extractfile("000010003.jpg").read()))
    assert meta["caption"] == caption and 2 <= len(caption.split()) <= 30 and meta["key"] == "000010003"
    assert (meta["width"], meta["height"]) == img.size and meta["status"] == "success"
    assert not {"label", "cls", "class"} & set(meta)  # no class information anywhere
    samples = list(open_source(str(tmp_path / "cc")))
    assert len(samples) == 25 and {s.label for s in samples} == {-1}
    assert len({s.caption for s in samples}) > 15  # captions vary (length and detail)
    lengths = [len(s.caption.split()) for s in samples]
    assert min(lengths) <= 4 and max(lengths) >= 15
    write_cc12m_layout(tmp_path / "again", num_images=25, seed=1, shard_size=10)
    assert (tmp_path / "cc" / "00002.tar").read_bytes() == (tmp_path / "again" / "00002.tar").read_bytes()

