"""`ldm encode` killed with SIGKILL midway and rerun: the cache equals an uninterrupted run's shard for
shard, and the rerun redoes only the shards the killed run had not recorded; a flipped byte is named."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ldm.autoencoder import tiny_vae_config, train_tiny_vae
from ldm.cli import main
from ldm.errors import CorruptShardError
from ldm.data.latent_cache import LatentDataset
from ldm.stages.encode import encode_latents
from test_latents import SMALL, shapes, write_prepared

REPO = Path(__file__).resolve().parent.parent
SHARD, BATCH, N = 6, 6, 42  # 7 shards of 6 rows at 64 px: ~0.1 s each on one thread, time enough to kill


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("kill")
    images = shapes(N, 64, seed=4)
    write_prepared(root / "prepared", images)
    train_tiny_vae([images[:8]], root / "vae", steps=1, batch_size=4, lr=1e-3, seed=0, config=tiny_vae_config(**SMALL))
    ref = encode_latents(root / "prepared", str(root / "vae"), root / "ref", text_encoder=None,
                         batch_size=BATCH, shard_size=SHARD)
    return {"root": root, "ref": ref}


def _same_shards(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys(), name
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)


def test_sigkill_midway_then_rerun_redoes_only_missing(setup, capsys):
    root, ref = setup["root"], setup["ref"]
    out = root / "killed"
    cmd = [sys.executable, "-m", "ldm.cli", "encode", "--prepared", str(root / "prepared"), "--vae", str(root / "vae"),
           "--out", str(out), "--text-encoder", "none", "--batch-size", str(BATCH), "--shard-size", str(SHARD)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    partial = out / ".manifest.partial.0.json"
    for _ in range(3):  # a machine that stalls this process for the whole run could let encode finish
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not partial.exists() and proc.poll() is None:  # partial: written once the first shard is complete
            assert time.monotonic() < deadline, "encode never completed a shard"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.returncode in (0, -signal.SIGKILL), err[-2000:]
        if proc.returncode == -signal.SIGKILL and not (out / "manifest.json").exists():
            break
        shutil.rmtree(out)
    assert proc.returncode == -signal.SIGKILL

    assert not (out / "manifest.json").exists()  # killed before the end
    done = [s["file"] for s in json.loads(partial.read_text())["shards"]]
    assert 1 <= len(done) < ref["num_shards"]
    mtimes = {f: (out / f).stat().st_mtime_ns for f in done}

    rerun = encode_latents(root / "prepared", str(root / "vae"), out, text_encoder=None,
                           batch_size=BATCH, shard_size=SHARD)
    names = [s["file"] for s in ref["shards"]]
    assert rerun["complete"] and rerun["run"]["reused"] == done and rerun["run"]["corrupt"] == []
    assert rerun["run"]["encoded"] == [n for n in names if n not in done]
    assert all((out / f).stat().st_mtime_ns == mtimes[f] for f in done)  # kept, not rewritten
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *names]  # no partial/tmp left
    _same_shards(out, root / "ref", names)
    keep = ("count", "num_shards", "latent_shape", "scaling_factor", "shift_factor", "vae", "params", "classes")
    assert {k: rerun[k] for k in keep} == {k: ref[k] for k in keep}
    assert [s["rows"] for s in rerun["shards"]] == [s["rows"] for s in ref["shards"]]

    # A flipped byte: the reader names the shard, and a rerun re-encodes exactly that shard.
    victim = out / names[-2]
    data = bytearray(victim.read_bytes())
    data[-7] ^= 0x20
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=names[-2]):
        LatentDataset(out)
    capsys.readouterr()
    assert main(cmd[3:]) == 0  # the same `ldm encode` command, in this process
    printed = capsys.readouterr().out
    assert f"encoded 1 shards, reused {len(names) - 1}" in printed
    assert f"{victim}: sha256 did not match its record (corrupt); re-encoded" in printed
    _same_shards(out, root / "ref", names)
    assert len(LatentDataset(out)) == N
