"""Writes the synthetic world (`ldm.data.synthetic`: what images, captions and attributes are) to disk in
both raw layouts of formats.md, atomically and deterministically (same seed, same bytes), with the corrupt
files prepare must skip."""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

from PIL import Image

from .synthetic import CORRUPT_KINDS, attributes, caption, classes, render, sample_specs


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _corrupt_bytes(kind: str, good_png: bytes) -> bytes:
    if kind == "truncated":
        return good_png[: len(good_png) // 2]
    if kind == "not_an_image":
        return b"this is a text file with a .png name\n"
    return b""  # empty


_GENERATED = re.compile(r"\d{6}\.png(\.tmp)?")


def _remove_stale_images(folders: Path, written: set[str], class_names: list[str]) -> None:
    """Generated images an earlier run left (other seed, more images, other world), and class folders of
    another world once empty: the class-folder reader would count them as samples / classes."""
    for d in folders.iterdir():
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.is_file() and _GENERATED.fullmatch(p.name) and f"{d.name}/{p.name}" not in written:
                p.unlink()
        if d.name not in class_names and not any(d.iterdir()):
            d.rmdir()


def write_synthetic(root: Path, num_images: int, seed: int, corrupt: int = 0, shard_size: int = 500,
                    world: str = "simple") -> dict:
    """Write both raw layouts of formats.md plus dataset.json under `root`; returns dataset.json's content.

    Corrupt files (named `corrupt-NNN.png`, cycling through CORRUPT_KINDS) go into the class folders only
    and are not listed in metadata.jsonl; dataset.json's `corrupt` maps each expected skip reason to its count.
    `world` picks the generator ("simple": the original one, byte for byte; "rich": docs/synthetic-world.md);
    a rich dataset.json also records `"world": "rich"` (a simple one has no `world` key, as before).
    Generated images (`NNNNNN.png`) of an earlier run into the same root that this run did not write,
    and emptied folders of classes this world does not have, are removed.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    if num_images < 0 or corrupt < 0 or shard_size < 1:
        raise ValueError(f"bad synthetic sizes: num_images={num_images}, corrupt={corrupt}, shard_size={shard_size}")
    class_names, vocab = classes(world), attributes(world)
    root = Path(root)
    folders, captions_dir = root / "folders", root / "captions"
    for d in [folders / c for c in class_names] + [captions_dir]:
        d.mkdir(parents=True, exist_ok=True)
    for old in captions_dir.glob("shard-*.parquet"):  # a rerun with fewer images leaves no stale shard
        old.unlink()

    meta_lines, rows = [], []
    written = set()
    for spec in sample_specs(num_images, seed, world):
        png = _png(render(spec))
        attrs = {k: spec[k] for k in vocab}
        text = caption(spec)
        file_name = f"{spec['shape']}/{spec['id']}.png"
        _write_bytes(folders / file_name, png)
        written.add(file_name)
        meta_lines.append(json.dumps({"file_name": file_name, "caption": text, "attributes": attrs}, sort_keys=True))
        rows.append((png, text, spec["label"], json.dumps(attrs, sort_keys=True)))
    _write_bytes(folders / "metadata.jsonl", "".join(line + "\n" for line in meta_lines).encode())

    schema = pa.schema([("image", pa.binary()), ("caption", pa.string()), ("label", pa.int32()),
                        ("attributes", pa.string())])
    for n, start in enumerate(range(0, num_images, shard_size)):
        chunk = list(zip(*rows[start:start + shard_size]))
        table = pa.Table.from_arrays([pa.array(col, type=f.type) for col, f in zip(chunk, schema)], schema=schema)
        path = captions_dir / f"shard-{n:05d}.parquet"
        tmp = path.with_name(path.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    counts: dict[str, int] = {}
    good = _png(render({"shape": "square", "colour": "red", "size": "large", "position": "center",
                        "background": "white", "width": 64, "height": 64}))
    for old in folders.glob("*/corrupt-*.png"):
        old.unlink()
    _remove_stale_images(folders, written, class_names)
    for j in range(corrupt):
        kind = CORRUPT_KINDS[j % len(CORRUPT_KINDS)]
        _write_bytes(folders / class_names[j % len(class_names)] / f"corrupt-{j:03d}.png", _corrupt_bytes(kind, good))
        counts[kind] = counts.get(kind, 0) + 1

    info = {"classes": class_names, "attributes": vocab, "seed": seed, "num_images": num_images,
            "corrupt": counts, "layouts": {"folders": "folders", "captions": "captions"}}
    if world != "simple":
        info["world"] = world
    _write_bytes(root / "dataset.json", (json.dumps(info, indent=2, sort_keys=True) + "\n").encode())
    return info
