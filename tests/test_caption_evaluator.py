"""The offline evaluator's caption tower (caption-only data): it learns which caption belongs to which image."""
from __future__ import annotations

import json

import numpy as np
import torch

from ldm.metrics.evaluator import (Evaluator, caption_pair_accuracy, caption_tokens, derangement, load_evaluator,
                                   train_evaluator)
from test_metrics import CLASSES, shapes

COLOUR_WORDS = ["red", "green", "blue", "yellow"]
# captions of widely different length and wording, as web captions are
TEMPLATES = ["{c} {s}", "a {c} {s}", "a photo of a {c} {s} on a plain background",
             "close-up shot: one {s}, painted {c}, centred somewhere in the frame, nothing else visible"]


def captions_for(cls: np.ndarray, col: np.ndarray, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [TEMPLATES[rng.integers(len(TEMPLATES))].format(c=COLOUR_WORDS[c], s=CLASSES[s])
            for s, c in zip(cls, col)]


def test_caption_tower_ranks_own_caption_above_another_far_above_chance(tmp_path):
    torch.set_num_threads(1)
    images, cls, col = shapes(320, 32, seed=11)
    captions = captions_for(cls, col, seed=1)
    acc = train_evaluator(images, {}, {}, tmp_path / "ev", steps=160, batch_size=48, seed=0, holdout=0.2,
                          input_size=32, width=16, feature_dim=32, captions=captions)
    # 64 held-out pairs, chance 0.5 (binomial sd 0.06): 0.75 is 4 sd above it (measured 0.83 at 120 steps)
    assert set(acc) == {"caption"} and acc["caption"] >= 0.75, acc
    evaluator = load_evaluator(tmp_path / "ev")
    assert evaluator.captions and evaluator.head_names == []
    assert json.loads((tmp_path / "ev" / "config.json").read_text())["heldout_accuracy"] == acc
    fresh, fresh_cls, fresh_col = shapes(200, 32, seed=12)
    own = captions_for(fresh_cls, fresh_col, seed=2)
    other = [own[j] for j in derangement(len(own))]
    # shuffled captions match by accident when shape and colour agree (1 in 12): those are ties or near-ties
    score = caption_pair_accuracy(evaluator.caption_similarity(fresh, own), evaluator.caption_similarity(fresh, other))
    assert score >= 0.8, score
    # an untrained tower is at chance on the same pairs: the score is learned, not built in
    untrained = Evaluator({}, input_size=32, width=16, feature_dim=32, captions=True).eval()
    chance = caption_pair_accuracy(untrained.caption_similarity(fresh, own), untrained.caption_similarity(fresh, other))
    assert abs(chance - 0.5) < 0.15, chance


def test_caption_tokens_are_stable_words_and_bigrams():
    ids, offsets = caption_tokens(["A red circle", "", "red circle a"])
    assert offsets.tolist() == [0, 5, 6]  # 3 words + 2 bigrams; the empty caption gets one token of its own
    assert sorted(ids[:3].tolist()) == sorted(ids[6:9].tolist())  # same words, other order: same word ids
    assert ids[:5].tolist() != ids[6:].tolist()  # but other bigrams
    assert ids.tolist() == caption_tokens(["A red circle", "", "red circle a"])[0].tolist()


def test_derangement_never_pairs_an_image_with_its_own_caption():
    for n in (2, 3, 8, 101):
        d = derangement(n)
        assert sorted(d.tolist()) == list(range(n)) and (d != np.arange(n)).all()
    assert caption_pair_accuracy(np.array([1.0, 0.2, 0.5]), np.array([0.0, 0.3, 0.5])) == (1 + 0 + 0.5) / 3
