"""Tensor files (checkpoints, sample sets) have the same bytes whenever their tensors and metadata are the same."""
import hashlib
import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.provenance import save_tensors

METADATA = {"model_config": json.dumps({"arch": "dit", "hidden_size": 128}), "run_id": "dit.synthetic.pretrain.32",
            "step": "1200", "run_hash": "2eb9c8ddccf240c0", "note": "caf\u00e9 \"quoted\"\n"}


def _tensors():
    gen = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(3, 5, generator=gen), "a.bias": torch.randn(7, generator=gen).half()}


def _hashes(write, directory, times=12):
    """sha256 of `times` files written by `write(tensors, path, metadata)`."""
    directory.mkdir()
    hashes = set()
    for i in range(times):
        write(_tensors(), str(directory / f"{i}.safetensors"), METADATA)
        hashes.add(hashlib.sha256((directory / f"{i}.safetensors").read_bytes()).hexdigest())
    return hashes


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    # safetensors itself writes the metadata in a HashMap's order, which changes from one map to the next:
    # a dozen plain writes of 5 keys do not all agree (the premise: without the fix, the test fails)
    assert len(_hashes(save_file, tmp_path / "plain")) > 1
    assert len(_hashes(save_tensors, tmp_path / "ours")) == 1
    path = tmp_path / "ours" / "0.safetensors"
    with safe_open(str(path), "pt") as handle:
        assert handle.metadata() == METADATA
    loaded = load_file(str(path))
    assert loaded.keys() == _tensors().keys() and all(torch.equal(loaded[k], v) for k, v in _tensors().items())
    assert path.stat().st_size == (tmp_path / "plain" / "0.safetensors").stat().st_size
