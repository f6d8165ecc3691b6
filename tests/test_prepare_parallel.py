"""Parallel prepare (`--workers`, `--rank/--world-size`) writes the very bytes of one process: every file,
report.json included, whatever the split, with skipped images moving the shard boundaries and parts that
straddle shards; ranks may run one after the other or at once; parts are resumed, not redone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.cli import main
from ldm.data.prepare_parallel import parts_dir
from ldm.data.synthetic_writer import write_synthetic
from ldm.stages.prepare import prepare

REPO = Path(__file__).resolve().parent.parent
# 40 images + 2 corrupt ones (skipped mid-stream), one more dropped by the source for its caption; parts of 7
# samples never line up with shards of 15 rows
N, SHARD, PART = 40, 15, 7


def files(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones too: leftover parts would show), by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, N, seed=7, corrupt=2, shard_size=16)
    meta = root / "folders" / "metadata.jsonl"
    first = json.loads(meta.read_text().splitlines()[0])["file_name"]
    with meta.open("a") as f:  # skips the source counts itself (the report sums them with the workers' skips)
        f.write("not json\n" + json.dumps({"file_name": first, "caption": 5}) + "\n")
    return root


CASES = {  # name -> (source below the synthetic root, prepare arguments)
    "folders-center": ("", dict(resolution=16)),
    "folders-random-crops": ("folders", dict(resolution=16, crop="random-flip", crops=3, seed=5)),
    "parquet-bytes": ("captions", dict(resolution=16, crop="random", seed=2)),  # samples carry their bytes
}


@pytest.fixture(scope="module")
def single(synth, tmp_path_factory) -> dict[str, tuple[dict, dict[str, bytes]]]:
    """One process's report and files per case: the reference."""
    root = tmp_path_factory.mktemp("single")
    got = {}
    for name, (sub, kw) in CASES.items():
        report = prepare(str(synth / sub), root / name, shard_size=SHARD, **kw)
        got[name] = (report, files(root / name))
    return got


def test_the_reference_exercises_skips_and_several_shards(single):
    report = single["folders-center"][0]
    assert report["skipped"] == {"bad_caption": 1, "bad_metadata": 1, "not_an_image": 1, "truncated": 1}
    assert report["kept"] == N - 1 and [s["rows"] for s in report["shards"]] == [15, 15, 9]
    assert len(single["folders-random-crops"][1]) == 1 + -(-(N - 1) * 3 // SHARD)  # 3 rows per image


@pytest.mark.parametrize("name", CASES)
def test_two_workers_write_the_bytes_of_one(synth, single, tmp_path, name):
    sub, kw = CASES[name]
    report = prepare(str(synth / sub), tmp_path / "two", shard_size=SHARD, workers=2, part_size=PART, **kw)
    assert report == single[name][0]
    assert files(tmp_path / "two") == single[name][1]


def test_ranks_one_after_another_write_the_bytes_of_one(synth, single, tmp_path):
    out, kw = tmp_path / "ranks", CASES["folders-center"][1]
    r0 = prepare(str(synth), out, shard_size=SHARD, rank=0, world_size=2, part_size=PART, **kw)
    assert r0 == {"complete": False, "parts": 6, "missing": 3, "parts_done": 3}  # 41 samples in parts of 7
    assert not (out / "report.json").exists() and not list(out.glob("shard-*"))
    r1 = prepare(str(synth), out, shard_size=SHARD, rank=1, world_size=2, workers=2, part_size=PART, **kw)
    assert r1 == single["folders-center"][0]
    assert files(out) == single["folders-center"][1]


def test_ranks_at_once_from_the_cli_write_the_bytes_of_one(tmp_path):
    """Two `ldm prepare` processes taking their rank from RANK/WORLD_SIZE (as under srun/torchrun), on 700
    images: 3 parts of the default 256 samples, so both ranks work and may both assemble at the end."""
    write_synthetic(tmp_path / "big", 700, seed=3, corrupt=3)
    single = prepare(str(tmp_path / "big"), tmp_path / "one", 16, shard_size=300)
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "ldm.cli", "prepare", str(tmp_path / "big"), "--out", str(out), "--resolution",
           "16", "--shard-size", "300"]
    env = {**os.environ, "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
    assert any("prepared 700 images" in o for o, _ in outs) and single["kept"] == 700
    assert files(out) == files(tmp_path / "one")


def test_a_rerun_rank_reuses_its_intact_parts_and_redoes_a_corrupt_one(synth, single, tmp_path):
    out, kw = tmp_path / "resume", CASES["folders-center"][1]
    prepare(str(synth), out, shard_size=SHARD, rank=0, world_size=2, part_size=PART, **kw)
    parts = parts_dir(out, str(synth), {"resolution": 16, "crop": "center", "seed": 0, "max_aspect": 4.0,
                                        "crops": 1}, PART)
    stamps = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.json")}
    assert sorted(stamps) == ["part-000000.json", "part-000002.json", "part-000004.json"]
    (parts / "part-000002.parquet").write_bytes(b"cut short")
    prepare(str(synth), out, shard_size=SHARD, rank=0, world_size=2, part_size=PART, **kw)
    again = {p.name: p.stat().st_mtime_ns for p in parts.glob("part-*.json")}
    assert [n for n in stamps if again[n] != stamps[n]] == ["part-000002.json"]
    prepare(str(synth), out, shard_size=SHARD, rank=1, world_size=2, part_size=PART, **kw)
    assert files(out) == single["folders-center"][1]


def test_other_arguments_never_reuse_parts(synth, tmp_path):
    out = tmp_path / "args"
    prepare(str(synth), out, 16, shard_size=SHARD, rank=0, world_size=2, part_size=PART)
    prepare(str(synth), out, 16, crop="random", shard_size=SHARD, rank=0, world_size=2, part_size=PART)
    assert len(list(out.glob(".parts-*"))) == 1  # the center-crop parts are gone
    one = prepare(str(synth), tmp_path / "one", 16, crop="random", shard_size=SHARD)
    assert prepare(str(synth), out, 16, crop="random", shard_size=SHARD, rank=1, world_size=2,
                   part_size=PART) == json.loads((tmp_path / "one" / "report.json").read_text()) == one


def test_bad_split_arguments_are_one_line_errors(synth, tmp_path, capsys):
    for args, word in ((["--workers", "0"], "--workers must be >= 1, got 0"),
                       (["--rank", "2", "--world-size", "2"], "rank 2 not in [0, world size 2)")):
        with pytest.raises(SystemExit) as exc:  # a launch mistake ends before any work, as in `ldm encode`
            main(["prepare", str(synth), "--out", str(tmp_path / "x"), "--resolution", "8", *args])
        assert exc.value.code == 2 and capsys.readouterr().err == f"ldm prepare: error: {word}\n"
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="workers must be a positive integer, got 0"):
        prepare(str(synth), tmp_path / "y", 8, workers=0)


def test_parts_of_a_changed_source_are_redone(synth, tmp_path):
    """A part records what it was made from: a caption edited between two runs of a rank is not served stale."""
    import shutil

    src = tmp_path / "src"
    shutil.copytree(synth / "folders", src)
    prepare(str(src), tmp_path / "out", 16, shard_size=SHARD, rank=0, world_size=2, part_size=PART)
    meta = src / "metadata.jsonl"
    rec = json.loads(meta.read_text().splitlines()[1])
    with meta.open("a") as f:
        f.write(json.dumps({**rec, "caption": "edited"}) + "\n")
    one = prepare(str(src), tmp_path / "one", 16, shard_size=SHARD)
    prepare(str(src), tmp_path / "out", 16, shard_size=SHARD, rank=1, world_size=2, part_size=PART)
    prepare(str(src), tmp_path / "out", 16, shard_size=SHARD, rank=0, world_size=2, part_size=PART)
    assert files(tmp_path / "out") == files(tmp_path / "one") and one["kept"] == N - 1


@pytest.mark.parametrize("cpus, workers", [(1, ""), (3, " --workers 2")])  # 3 cpus, capped at --cores 2
def test_the_prepare_rule_passes_its_cpus_and_keeps_its_one_cpu_command(tmp_path, cpus, workers):
    """At 1 cpu the command is byte for byte the one existing workdirs were prepared with (no rerun)."""
    import yaml

    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config.setdefault("resources", {})["prepare"] = {"cpus": cpus}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n", "-p",
                          "--directory", str(tmp_path), "--configfile", str(tmp_path / "c.yaml"), "--cores", "2"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    commands = [line for line in out.stdout.splitlines() if " -m ldm.cli prepare " in line]
    assert len(commands) == 2 and all(
        line.endswith(f" --resolution {px} --crop center --crops 1 --seed 0{workers} > work/smoke/logs/prepare.r{px}"
                      f".log 2>&1") for line, px in zip(sorted(commands, key=lambda c: "r32" in c), (16, 32)))
