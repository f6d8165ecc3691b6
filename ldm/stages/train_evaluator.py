"""`ldm train-evaluator`: the offline evaluator (classifier + feature extractor) trained on the real
prepared images at the high resolution: one head for the class and one per attribute that varies
independently of it (an attribute that always equals the class name would duplicate the class head)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import load_scenario
from ..data.prepared import load_prepared, read_report
from ..layout import data_key
from ..metrics.evaluator import train_evaluator


def evaluator_targets(meta, classes: list[str]) -> tuple[dict, dict]:
    """(labels, vocab) per head: `class`, then every attribute not identical to the class name."""
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
    images, meta = load_prepared(prepared)
    labels, vocab = evaluator_targets(meta, read_report(prepared)["classes"])
    ecfg = config["evaluator"]
    result = train_evaluator(images, labels, vocab, Path(args.out), steps=ecfg["steps"],
                             batch_size=ecfg["batch_size"], seed=config["seed"], input_size=ecfg["input_size"],
                             feature_dim=ecfg["feature_dim"])
    print(f"evaluator written to {args.out}: held-out accuracy {result}")
