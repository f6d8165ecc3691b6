"""What the study needs of prepared data, checked right after `ldm prepare` (the `check-data` stage).

Why: some datasets prepare without an error and still make the study silently wrong. A single class gives
an evaluator that learned nothing a cond_accuracy of 1.0 at chance 1.0; an empty class folder becomes a
class of 0 images that the models embed and sample; a text-conditional recipe trained on empty captions
learns the unconditional model; a symlink back to the dataset root makes a phantom class of duplicates.

The checks read the prepared shards one at a time: label, caption and key columns, and the PNG bytes of
each shard only to hash them (8 bytes per image are kept), so a dataset of any size fits in memory.
Duplicates are identical PNG crops: with a random crop policy the same source image gives different crops
under different keys, so the center-crop data (what the evaluator reads) is where duplicates show.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np

from ldm.data.prepared import read_report
from ldm.errors import UserError

#: Class pairs named in full in the error message; the rest are counted.
SHOWN_PAIRS = 3


class DataCheckError(UserError, ValueError):
    """Prepared data the study cannot use as it is; the message names every failed check on one line."""


def _digest(blob: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little", signed=True)


def _class_name(classes: list[str], label: int) -> str:
    if label < 0:
        return "(unlabeled)"
    return classes[label] if label < len(classes) else f"<label {label}>"


def summarize(prepared: Path) -> dict:
    """Counts per class, unlabeled and out-of-range labels, captions and duplicate images of a prepared
    directory (shards in report.json order)."""
    import pyarrow.parquet as pq

    prepared = Path(prepared)
    report = read_report(prepared)
    classes = [str(c) for c in report.get("classes", [])]
    labels, digests, keys = [], [], []
    empty_captions = 0
    for shard in report["shards"]:
        path = prepared / shard["file"]
        if not path.is_file():
            raise DataCheckError(f"{path}: prepared shard listed in report.json is missing (rerun `ldm prepare`)")
        pf = pq.ParquetFile(path)
        meta = pf.read(columns=["key", "label", "caption"])
        keys.append(meta.column("key"))
        labels.append(meta.column("label").to_numpy().astype(np.int64))
        empty_captions += sum(1 for c in meta.column("caption").to_pylist() if not (c or "").strip())
        for batch in pf.iter_batches(batch_size=256, columns=["image"]):
            digests.append(np.fromiter((_digest(b) for b in batch.column(0).to_pylist()), np.int64))
    label = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    digest = np.concatenate(digests) if digests else np.zeros(0, np.int64)
    counts = Counter(label.tolist())
    per_class = {name: counts.get(i, 0) for i, name in enumerate(classes)}
    out_of_range = {_class_name(classes, y): n for y, n in sorted(counts.items()) if y >= len(classes)}
    return {"prepared": str(prepared), "images": int(len(label)), "classes": per_class,
            "unlabeled": int(sum(n for y, n in counts.items() if y < 0)), "labels_outside_classes": out_of_range,
            "captions": {"nonempty": int(len(label) - empty_captions), "empty": int(empty_captions)},
            "duplicates": _duplicates(digest, label, classes, keys)}


def _duplicates(digest: np.ndarray, label: np.ndarray, classes: list[str], key_chunks) -> dict:
    """Groups of identical PNG bytes: how many images repeat an earlier one within its class, and the class
    pairs that share images (count, and the pair of keys that comes first in the data as an example)."""
    order = np.argsort(digest, kind="stable")  # stable: within a group, rows stay in data order
    d = digest[order]
    same = np.flatnonzero(d[1:] == d[:-1]) + 1  # positions (in sorted order) repeating the previous digest
    within = 0
    pairs: dict[tuple[int, int], list] = {}  # (label a, label b) -> [images, first row a, its row b]
    for start, stop in _runs(same):
        rows = order[start - 1:stop]
        first = {}
        for r in rows.tolist():
            first.setdefault(int(label[r]), r)
        within += len(rows) - len(first)
        firsts = sorted(first.items())
        for (ya, ra), (yb, rb) in zip(firsts, firsts[1:]):
            entry = pairs.setdefault((ya, yb), [0, ra, rb])
            entry[0] += 1
            if ra < entry[1]:
                entry[1:] = [ra, rb]
    if not pairs:
        return {"within_class": int(within), "across_classes": []}
    import pyarrow as pa

    keys = pa.chunked_array(key_chunks)
    across = [{"classes": [_class_name(classes, ya), _class_name(classes, yb)], "images": n,
               "example": [keys[ra].as_py(), keys[rb].as_py()]} for (ya, yb), (n, ra, rb) in pairs.items()]
    across.sort(key=lambda e: (-e["images"], e["classes"]))
    return {"within_class": int(within), "across_classes": across}


def _runs(positions: np.ndarray):
    """(start, stop) of each run of consecutive positions: one group of equal digests each."""
    if not len(positions):
        return
    breaks = np.flatnonzero(np.diff(positions) != 1)
    starts = np.concatenate([[0], breaks + 1])
    stops = np.concatenate([breaks, [len(positions) - 1]])
    for a, b in zip(starts.tolist(), stops.tolist()):
        yield int(positions[a]), int(positions[b]) + 1


def problems(summary: dict, min_classes: int = 2, captions: bool = False) -> list[str]:
    """Every failed check, one phrase each (empty when the data is fit for the study)."""
    found = []
    per_class = summary["classes"]
    with_images = [c for c, n in per_class.items() if n > 0]
    if min_classes > 0 and len(with_images) < min_classes:
        named = f" ({', '.join(with_images)})" if with_images else ""
        found.append(f"{len(with_images)} class{'es' if len(with_images) != 1 else ''} with images{named}, "
                     f"at least {min_classes} needed (with one class, chance and cond_accuracy are 1.0 whatever "
                     f"the evaluator learned)")
    empty = [c for c, n in per_class.items() if n == 0]
    if empty:
        found.append(f"class{'es' if len(empty) > 1 else ''} with 0 images: {', '.join(empty)} "
                     f"(an empty or unreadable class folder: remove it or fill it)")
    if summary["labels_outside_classes"]:
        found.append(f"labels outside report.json's {len(per_class)} classes: "
                     + ", ".join(f"{k} ({n} images)" for k, n in summary["labels_outside_classes"].items()))
    if min_classes > 0 and summary["unlabeled"]:
        found.append(f"{summary['unlabeled']} of {summary['images']} images have no class label")
    caps = summary["captions"]
    if captions and caps["nonempty"] == 0:
        found.append(f"no image has a caption ({caps['empty']} of {summary['images']} empty) and a "
                     f"text-conditional recipe trains on them")
    across = summary["duplicates"]["across_classes"]
    if across:
        shown = "; ".join(f"{a} and {b} share {e['images']} image{'s' if e['images'] != 1 else ''} "
                          f"(e.g. {e['example'][0]} = {e['example'][1]})"
                          for e in across[:SHOWN_PAIRS] for a, b in [e["classes"]])
        more = f"; and {len(across) - SHOWN_PAIRS} more class pairs" if len(across) > SHOWN_PAIRS else ""
        found.append(f"identical images under two classes: {shown}{more} (a copy, or a symlink back to the "
                     f"dataset root, makes a phantom class)")
    return found


def check_prepared(prepared: Path, min_classes: int = 2, captions: bool = False) -> dict:
    """The record of a prepared directory fit for the study; DataCheckError naming every failed check."""
    if min_classes < 0:
        raise DataCheckError(f"--min-classes must be >= 0, got {min_classes}")
    summary = summarize(prepared)
    found = problems(summary, min_classes, captions)
    if found:
        raise DataCheckError(f"{prepared}: " + "; ".join(found))
    return {**summary, "checked": {"min_classes": int(min_classes), "captions": bool(captions)}}
