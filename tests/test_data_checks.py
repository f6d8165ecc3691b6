"""`ldm check-data` (ldm/data/checks.py): prepared data that would make the study silently wrong fails in one
line; data fit for the study passes and gets its record. Tiny class-folder trees prepared at 8 px."""
import json
import os
from argparse import Namespace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ldm.cli import main
from ldm.data.checks import DataCheckError, check_prepared
from ldm.errors import UserError
from ldm.stages import check_data
from ldm.stages.prepare import prepare


def _image(path: Path, seed: int) -> None:
    """A 12 x 12 noise PNG: distinct seeds give distinct crops, so only planted duplicates repeat."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _tree(root: Path, classes: dict[str, int]) -> Path:
    for c, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _image(root / name / f"{i}.png", 100 * c + i)
    return root


def _prepared(tmp_path: Path, classes: dict[str, int], **kw) -> Path:
    root = _tree(tmp_path / "raw", classes)
    prepare(str(root), tmp_path / "prep", 8, **kw)
    return tmp_path / "prep"


def _error(prep: Path, **kw) -> str:
    with pytest.raises(DataCheckError) as info:
        check_prepared(prep, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{prep}: ")
    assert isinstance(info.value, UserError)
    return msg


def test_single_class_is_one_line_error(tmp_path):
    """One class gives chance and cond_accuracy 1.0 whatever the evaluator learned: refused, in one line."""
    prep = _prepared(tmp_path, {"cat": 3})
    msg = _error(prep)
    assert "1 class with images (cat), at least 2 needed" in msg and "cond_accuracy" in msg
    assert check_prepared(prep, min_classes=1)["classes"] == {"cat": 3}  # what a text-only study may ask


def test_empty_class_folder_is_named(tmp_path):
    """An empty class folder is a class of 0 images in report.json (its label stays): the check names it."""
    root = _tree(tmp_path / "raw", {"a": 2, "b": 2})
    (root / "empty").mkdir()
    rep = prepare(str(root), tmp_path / "prep", 8)
    assert rep["classes"] == ["a", "b", "empty"] and rep["kept"] == 4
    msg = _error(tmp_path / "prep")
    assert "class with 0 images: empty (an empty or unreadable class folder" in msg


def test_unreadable_class_folder_is_counted_and_named(tmp_path, monkeypatch):
    """A class folder that cannot be listed (permission denied: simulated, tests may run as root) is counted
    in report.json's `skipped` and then fails the check like an empty one, under its own name."""
    root = _tree(tmp_path / "raw", {"a": 2, "b": 2, "locked": 2})
    real = os.scandir

    def scandir(path="."):
        if Path(path) == root / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    rep = prepare(str(root), tmp_path / "prep", 8)
    monkeypatch.undo()
    assert rep["classes"] == ["a", "b", "locked"] and rep["kept"] == 4
    assert rep["skipped"] == {"unreadable_folder": 1}
    assert "class with 0 images: locked" in _error(tmp_path / "prep")


def test_text_recipe_needs_captions(tmp_path):
    """With --captions (a text-conditional recipe trains on the data) a dataset without one caption fails,
    saying how many are empty; a few empty captions among many are counted in the record, not refused."""
    prep = _prepared(tmp_path, {"a": 2, "b": 2})
    assert "no image has a caption (4 of 4 empty)" in _error(prep, captions=True)
    assert check_prepared(prep)["captions"] == {"nonempty": 0, "empty": 4}  # class-only: fine

    root = tmp_path / "raw"
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "caption": c}) + "\n" for f, c in
                                                 (("a/0.png", "a red thing"), ("b/1.png", "  "))))
    prepare(str(root), tmp_path / "prep2", 8)
    record = check_prepared(tmp_path / "prep2", captions=True)
    assert record["captions"] == {"nonempty": 1, "empty": 3}


def test_symlink_to_the_root_is_a_phantom_class_of_duplicates(tmp_path):
    """ROOT/mirror -> ROOT makes a class `mirror` holding every image again: identical PNG bytes under two
    classes, named with an example pair of keys."""
    root = _tree(tmp_path / "raw", {"a": 2, "b": 3})
    os.symlink(root, root / "mirror", target_is_directory=True)
    rep = prepare(str(root), tmp_path / "prep", 8)
    assert rep["classes"] == ["a", "b", "mirror"] and rep["kept"] == 10
    msg = _error(tmp_path / "prep")
    assert "identical images under two classes: b and mirror share 3 images (e.g. b/0.png = mirror/b/0.png); " \
           "a and mirror share 2 images (e.g. a/0.png = mirror/a/0.png)" in msg
    assert "phantom class" in msg


def test_labels_the_classes_do_not_name(tmp_path):
    """Caption shards with labels but no class list give labels outside report.json's classes (the models
    would embed them as the null class): refused. Unlabeled shards pass only when no class is needed."""
    for k in range(4):
        _image(tmp_path / f"img{k}.png", k)
    table = pa.table({"image_path": [f"img{k}.png" for k in range(4)], "caption": ["a caption"] * 4,
                      "label": [0, 1, 1, 0]})
    pq.write_table(table, tmp_path / "labelled.parquet")
    prepare(str(tmp_path / "labelled.parquet"), tmp_path / "p1", 8)
    msg = _error(tmp_path / "p1", min_classes=0)
    assert "labels outside report.json's 0 classes: <label 0> (2 images), <label 1> (2 images)" in msg

    pq.write_table(table.drop_columns(["label"]), tmp_path / "captions.parquet")
    prepare(str(tmp_path / "captions.parquet"), tmp_path / "p2", 8)
    assert "4 of 4 images have no class label" in _error(tmp_path / "p2")
    record = check_prepared(tmp_path / "p2", min_classes=0, captions=True)
    assert record["unlabeled"] == 4 and record["classes"] == {}


def test_good_dataset_passes_and_writes_the_record(tmp_path):
    """Every check holds: the stage writes its JSON record (counts per class, captions, duplicates within a
    class are counted, not refused) and leaves no temporary file; a later failing check removes it."""
    root = _tree(tmp_path / "raw", {"a": 3, "b": 2})
    (root / "a" / "copy.png").write_bytes((root / "a" / "0.png").read_bytes())
    prepare(str(root), tmp_path / "prep", 8)
    out = tmp_path / "prep" / "checks.json"
    check_data.run(Namespace(prepared=str(tmp_path / "prep"), min_classes=2, captions=False, out=str(out)))
    record = json.loads(out.read_text())
    assert record["classes"] == {"a": 4, "b": 2} and record["images"] == 6
    assert record["duplicates"] == {"within_class": 1, "across_classes": []}
    assert record["captions"] == {"nonempty": 0, "empty": 6} and record["unlabeled"] == 0
    assert record["checked"] == {"min_classes": 2, "captions": False}
    assert sorted(p.name for p in out.parent.glob("checks*")) == ["checks.json"]
    with pytest.raises(DataCheckError):
        check_data.run(Namespace(prepared=str(tmp_path / "prep"), min_classes=3, captions=False, out=str(out)))
    assert not out.exists()


def test_cli_exits_2_with_one_line(tmp_path, capsys):
    prep = _prepared(tmp_path, {"only": 2})
    capsys.readouterr()  # prepare's own progress line is not check-data's
    out = tmp_path / "checks.json"
    assert main(["check-data", str(prep), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"ldm check-data: error: {prep}: 1 class with images (only)")
    assert not out.exists()
    assert main(["check-data", str(prep), "--min-classes", "1", "--out", str(out)]) == 0 and out.is_file()
