"""Multi-process encoding: ranks run one after the other build the same cache as one process; only the
last rank writes the manifest; `ldm encode` takes the rank from torchrun's RANK/WORLD_SIZE."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from ldm.autoencoder import tiny_vae_config, train_tiny_vae
from ldm.cli import main
from ldm.data.latent_cache import LatentDataset
from ldm.stages.encode import encode_latents
from test_latents import SMALL, shapes, write_prepared

KW = dict(text_encoder=None, batch_size=2, shard_size=2)  # 7 images -> shards of 2, 2, 2, 1


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ranks")
    images = shapes(7, 16, seed=5)
    write_prepared(root / "prepared", images)
    train_tiny_vae([images], root / "vae", steps=1, batch_size=4, lr=1e-3, seed=0, config=tiny_vae_config(**SMALL))
    single = encode_latents(root / "prepared", str(root / "vae"), root / "single", **KW)
    return {"root": root, "single": single}


def test_two_ranks_in_turn_equal_one_process(setup):
    root, single = setup["root"], setup["single"]
    out = root / "two"
    r0 = encode_latents(root / "prepared", str(root / "vae"), out, rank=0, world_size=2, **KW)
    assert not r0["complete"] and r0["missing"] == ["shard-00001.safetensors", "shard-00003.safetensors"]
    assert r0["run"]["encoded"] == ["shard-00000.safetensors", "shard-00002.safetensors"]
    assert sorted(p.name for p in out.glob("shard-*")) == r0["run"]["encoded"]
    assert not (out / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        LatentDataset(out)

    r1 = encode_latents(root / "prepared", str(root / "vae"), out, rank=1, world_size=2, **KW)
    assert r1["complete"] and r1["run"]["encoded"] == ["shard-00001.safetensors", "shard-00003.safetensors"]
    files = sorted(p.name for p in (root / "single").iterdir())
    assert sorted(p.name for p in out.iterdir()) == files  # no partial records left behind
    # Same process, so even the bytes agree (tensors and safetensors metadata alike), manifest included.
    assert [sha(out / f) for f in files] == [sha(root / "single" / f) for f in files]
    assert len(LatentDataset(out)) == 7

    # Rerunning one rank on the finished cache re-checks its own shards and rewrites the same manifest.
    again = encode_latents(root / "prepared", str(root / "vae"), out, rank=0, world_size=2, **KW)
    assert again["complete"] and again["run"] == {"encoded": [], "reused": r0["run"]["encoded"], "corrupt": []}
    assert sha(out / "manifest.json") == sha(root / "single" / "manifest.json")


def test_cli_rank_from_torchrun_env(setup, monkeypatch, capsys):
    root = setup["root"]
    out = root / "env"
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    args = ["encode", "--prepared", str(root / "prepared"), "--vae", str(root / "vae"), "--out", str(out),
            "--text-encoder", "none", "--batch-size", "2", "--shard-size", "2"]
    assert main(args) == 0
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00001.safetensors"]
    assert "rank 1/3: encoded 1 shards, reused 0" in capsys.readouterr().out
    # Flags win over the environment; ranks 0 and 2 complete the cache.
    assert main(args + ["--rank", "0"]) == 0 and not (out / "manifest.json").exists()
    assert main(args + ["--rank", "2", "--world-size", "3"]) == 0
    assert "encoded 7 samples" in capsys.readouterr().out
    names = sorted(p.name for p in (root / "single").glob("shard-*"))
    assert [sha(out / f) for f in names] == [sha(root / "single" / f) for f in names]
    with pytest.raises(SystemExit) as exc:
        main(args + ["--rank", "3"])
    assert exc.value.code == 2 and "rank 3 not in [0, world size 3)" in capsys.readouterr().err
