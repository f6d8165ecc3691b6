"""Two processes (torchrun, gloo, CPU), each accumulating two micro-batches, train the same run as one
process taking the same global batch at once.

Each rank takes a contiguous share of the global batch and the random draws are made for the whole batch
on every rank, so the only difference from one process is the float32 summation order (micro-batch means,
then DDP's (g0 + g1) / 2, instead of one mean): the weights agree to float rounding, amplified a little by Adam.
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from ldm.config import launcher
from test_train import cache_config, with_steps  # noqa: F401 - the module's latent-cache fixture

from test_train import run_dir, train_run  # noqa: E402 - the config-dict adapters

RUN = "dit.synthetic.pretrain.16"
#: max |w_2proc - w_1proc| after 4 AdamW steps at lr 1e-3 (measured: 2e-7). A wrong split (both ranks
#: taking rank 0's share, tried by hand) differs by 6.4e-3, 600x this
TOLERANCE = 1e-5


def _own_workdir(config: dict, path: Path) -> dict:
    """Same config and latent cache, separate run directories."""
    config = json.loads(json.dumps(config))
    path.mkdir(parents=True)
    (path / "latents").symlink_to(Path(config["workdir"]) / "latents")
    config["workdir"] = str(path)
    return config


def test_two_processes_accumulating_match_one_with_the_same_global_batch(cache_config, tmp_path):  # noqa: F811
    config = with_steps(cache_config, "pretrain", 4, 2)  # snapshots at steps 2 and 4
    config["training"].update(batch_size=8, warmup=1, ema=0.5)
    one = _own_workdir(config, tmp_path / "one")
    two = _own_workdir(config, tmp_path / "two")
    two["training"]["grad_accum"] = 2  # each rank: 2 micro-batches of 2, the first under DDP's no_sync
    train_run(one, RUN, log=lambda *_: None)

    config_path = tmp_path / "two.json"
    config_path.write_text(json.dumps(two))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # the train rule's own command line: its launcher for a 2-process stage, then `-m ldm.cli train ... --run RUN`
    # (plain torchrun would take `--run` for an abbreviation of its `--run-path` and start nothing)
    command = f"{launcher({'gpus': 2}, shlex.quote(sys.executable))} -m ldm.cli train --config {config_path} --run {RUN}"
    proc = subprocess.run(command, shell=True, capture_output=True, text=True, env=env, timeout=240, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    records = [json.loads(line) for line in (run_dir(two, RUN) / "log.jsonl").read_text().splitlines()]
    assert records and all(r["world_size"] == 2 and r["grad_accum"] == 2 for r in records)
    state = json.loads((run_dir(two, RUN) / "checkpoints" / "step-0000004" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 4
    # both ranks wrote their global RNG state into the snapshot
    assert {p.name for p in (run_dir(two, RUN) / "checkpoints" / "step-0000004").glob("rng-rank*.json")} == \
        {"rng-rank0.json", "rng-rank1.json"}

    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_file(str(run_dir(one, RUN) / "checkpoints" / "step-0000004" / name))
        b = load_file(str(run_dir(two, RUN) / "checkpoints" / "step-0000004" / name))
        assert a.keys() == b.keys()
        worst = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
        print(f"{name}: max |2 proc - 1 proc| = {worst:.3g}")
        limit = TOLERANCE if name != "optimizer.safetensors" else 1e-4 * max(a[k].abs().max().item() for k in a)
        assert worst <= limit, (name, worst)
    # and two steps move the weights far more than the tolerance (the comparison is not vacuous)
    mid = load_file(str(run_dir(one, RUN) / "checkpoints" / "step-0000002" / "model.safetensors"))
    end = load_file(str(run_dir(one, RUN) / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert max((mid[k] - end[k]).abs().max().item() for k in mid) > 100 * TOLERANCE
