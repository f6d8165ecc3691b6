"""`ldm train-evaluator`: the offline evaluator (classifier + feature extractor) trained on the real
prepared images at the high resolution: one head for the class and one per attribute that varies
independently of it (an attribute that always equals the class name would duplicate the class head).
Caption-only data (no classes) trains the caption tower instead (`ldm.metrics.evaluator`), as does any
captioned dataset with `evaluator.captions: true`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import load_scenario
from ..data.prepared import open_prepared, read_report
from ..layout import data_key
from ..metrics.evaluator import train_evaluator


def evaluator_targets(meta, classes: list[str]) -> tuple[dict, dict]:
    """(labels, vocab) per head: `class`, then every attribute not identical to the class name; none without
    classes (an attribute head is judged against a class)."""
    if not classes:
        return {}, {}
    attributes = [json.loads(a) for a in meta["attributes"]]
    class_names = [classes[y] for y in meta["label"]]
    names = sorted({key for attrs in attributes for key in attrs
                    if any(row.get(key) != name for row, name in zip(attributes, class_names))})
    vocab = {"class": list(classes)}
    labels = {"class": meta["label"].to_numpy().astype(np.int64)}
    for name in names:
        values = sorted({a[name] for a in attributes if name in a})
        vocab[name] = values
        labels[name] = np.array([values.index(a[name]) if name in a else -1 for a in attributes], dtype=np.int64)
    return labels, vocab


def run(args) -> None:
    scenario = load_scenario(args.config)
    config = scenario.config
    prepared = scenario.layout.prepared(data_key(config["resolutions"]["high"]))
    images, meta = open_prepared(prepared)  # decoded a mini-batch at a time, never all at once
    classes = read_report(prepared)["classes"]
    labels, vocab = evaluator_targets(meta, classes)
    ecfg = config["evaluator"]
    captions = list(meta["caption"].fillna("")) if ecfg.get("captions", not classes) else None
    if captions is not None and not any(captions):
        raise ValueError(f"{prepared}: the evaluator's caption tower needs captions, and no prepared image has one")
    result = train_evaluator(images, labels, vocab, Path(args.out), steps=ecfg["steps"],
                             batch_size=ecfg["batch_size"], seed=config["seed"], input_size=ecfg["input_size"],
                             feature_dim=ecfg["feature_dim"], captions=captions)
    print(f"evaluator written to {args.out}: held-out accuracy {result}")
