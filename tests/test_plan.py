"""`ldm plan`: a study's FLOPs before it runs, checked against the closed forms it claims to count."""
import json
from pathlib import Path

import yaml

from ldm.config import validate
from ldm.models.inventory import count_forward_flops
from ldm.plan import INCEPTION_FLOPS, Job, guidance_passes, model_forward_flops, plan_jobs, summarise, vae_flops
from ldm.spec import Scenario

REPO = Path(__file__).resolve().parent.parent


def test_guidance_passes_follow_the_guidance_formula():
    assert guidance_passes(1.0, 1.0, True) == 1  # the conditional pass alone
    assert guidance_passes(4.0, 1.0, True) == 2 and guidance_passes(4.0, 3.0, False) == 2
    assert guidance_passes(4.0, 2.0, True) == 3 and guidance_passes(1.0, 2.0, True) == 3


def test_job_flops_are_the_closed_forms():
    raw = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    raw["evaluation"] = {"metrics": ["fd_evaluator", "fid_clean"]}
    scenario = Scenario(validate(raw))
    jobs = {(j.rule, j.name): j for j in plan_jobs(scenario, images=100)}
    run = next(iter(scenario.runs.values()))
    fwd, model = model_forward_flops(scenario, run)
    assert fwd == count_forward_flops(model, (4, run.resolution // 4, run.resolution // 4), 32) > 0
    tcfg, scfg = scenario.training(run), scenario.sampling(run)
    steps = scenario.stage(run).steps
    assert jobs[("train", run.run_id)].flops == steps * tcfg["batch_size"] * 3 * fwd
    enc, dec = vae_flops(scenario.config, run.resolution)
    assert jobs[("encode", f"r{run.resolution}")].flops == 2 * 100 * enc
    seeds = len(scfg["seeds"])
    evaluate = jobs[("evaluate", run.run_id)].flops
    assert evaluate == seeds * scfg["num_samples"] * INCEPTION_FLOPS  # final snapshot, every seed
    summary = summarise(list(jobs.values()), peak=1e12, mfu=0.5)
    assert summary["total"]["flops"] == sum(j.flops for j in jobs.values())
    assert summary["costliest"][0].flops == max(j.flops for j in jobs.values())


def test_jobs_that_cannot_finish_in_their_runtime_are_named():
    job = Job("sample", "x", flops=2 * 3600 * 1e12 * 0.5, gpus=1, runtime_h=1.0)  # 2 h at 1 TFLOP/s x 0.5
    assert job.hours(1e12, 0.5) == 2.0 and not job.fits(1e12, 0.5) and job.fits(1e12, 1.0)
    assert summarise([job], 1e12, 0.5)["too_long"] == [job]


def test_resumable_jobs_may_take_several_allocations():
    """train and sample go on where a killed attempt stopped, so the profile's retries give them more runtime;
    evaluate starts over, so it must fit one allocation."""
    from ldm.plan import profile_attempts

    train = Job("train", "t", flops=2.5 * 3600 * 1e12, gpus=1, runtime_h=1.0)  # 2.5 h of work, 1 h allocations
    evaluate = Job("evaluate", "e", flops=2.5 * 3600 * 1e12, gpus=1, runtime_h=1.0)
    assert train.allocations(1e12, 1.0) == 3 and not train.fits(1e12, 1.0) and train.fits(1e12, 1.0, attempts=3)
    assert not evaluate.fits(1e12, 1.0, attempts=3)
    summary = summarise([train, evaluate], 1e12, 1.0, attempts=3)
    assert summary["too_long"] == [evaluate] and summary["resumed"] == [train]
    assert summarise([train], 1e12, 1.0, attempts=2)["too_long"] == [train]
    retries = yaml.safe_load((REPO / "slurm" / "config.yaml").read_text())["retries"]
    assert profile_attempts() == 1 + retries and profile_attempts(REPO / "absent.yaml") == 1


def test_the_plan_takes_its_mfu_from_a_gpu_measurement_when_there_is_one(tmp_path):
    from ldm.plan import measured_mfu

    assert measured_mfu(tmp_path / "gpu.json") is None
    rows = [{"what": "train dit-XL/2 256px", "compile": False, "checkpointing": False, "mfu": 0.31},
            {"what": "train dit-XL/2 256px", "compile": True, "checkpointing": False, "mfu": 0.42},
            {"what": "train dit-XL/2 256px", "compile": False, "checkpointing": True, "mfu": 0.5},  # recomputes
            {"what": "train improved-XL/2 256px", "compile": True, "checkpointing": False, "mfu": 0.6}]
    (tmp_path / "gpu.json").write_text(json.dumps({"device": "NVIDIA H200", "rows": rows}))
    assert measured_mfu(tmp_path / "gpu.json") == (0.42, "measured by gpu.json on NVIDIA H200")
