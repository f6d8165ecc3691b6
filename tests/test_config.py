"""Config schema, run grid and the Snakemake DAG as seen before any job runs."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ldm.config import ConfigError, load_config, merge, resolved_config_variable, validate
from ldm.provenance import digest
from ldm.layout import parse_data_key
from ldm.spec import Scenario, expand_runs


def run_section(config: dict, run_id: str) -> dict:
    scenario = Scenario(config)
    return scenario.run_section(scenario.run(run_id))


def data_section(config: dict) -> dict:
    return Scenario(config).data_section()

REPO = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def default_raw() -> dict:
    return yaml.safe_load((REPO / "config" / "default.yaml").read_text())


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml", "small.yaml", "small_reseed.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(REPO / "config" / name)
    assert config["training"]["betas"] == [0.9, 0.95]


@pytest.mark.parametrize("override, message", [
    ({"training": {"stpes": 3}}, "training.stpes: unknown key"),
    ({"sampling": {"steps": 0}}, "sampling.steps: 0 is less than the minimum of 1"),
    ({"recipes": {"dit": {"arch": "dti"}}}, "recipes.dit.arch: 'dti' is not one of"),
    ({"stages": {"pretrain": {"crop": "centre"}}}, "stages.pretrain.crop: 'centre' is not one of"),
    ({"stages": {"transfer": {"init": "pretrian"}}}, "stages.transfer.init: unknown stage 'pretrian'"),
    ({"resolutions": {"low": 128}}, "resolutions.low: 128 is above resolutions.high 64"),
    ({"colour": 1}, "colour: unknown key"),
    ({"sampling": {"sampler": "dpm"}}, "sampling.sampler: 'dpm' cannot sample recipe 'dit' (rectified_flow)"),
])
def test_schema_rejects_bad_values_naming_the_field(override, message):
    with pytest.raises(ConfigError) as info:
        validate(merge(default_raw(), override), source="x.yaml")
    assert str(info.value).startswith("x.yaml: ")
    assert message in str(info.value)


def test_run_grid_orders_init_first_and_ids_are_stable():
    config = load_config(REPO / "config" / "default.yaml")
    runs = expand_runs(config)
    ids = [r.run_id for r in runs]
    assert ids == ["dit.synthetic.pretrain.32", "dit.synthetic.transfer.64", "dit.synthetic.scratch.64"]
    transfer = runs[1]
    assert transfer.init_run == "dit.synthetic.pretrain.32" and ids.index(transfer.init_run) < 1
    # A run's hash covers its init chain: changing pre-training changes the transfer run, not scratch.
    before = {r: digest(run_section(config, r)) for r in ids}
    changed = validate(merge(default_raw(), {"stages": {"pretrain": {"steps": 7}}}))
    after = {r: digest(run_section(changed, r)) for r in ids}
    assert [r for r in ids if before[r] != after[r]] == ids[:2]


def test_stage_cycle_is_rejected():
    raw = merge(default_raw(), {"stages": {"pretrain": {"init": "transfer"}}})
    with pytest.raises(ConfigError, match="cycle"):
        expand_runs(validate(raw))


def test_dry_run_lists_the_whole_dag(tmp_path):
    out = subprocess.run(SNAKEMAKE + ["-n", "--cores", "2", "--snakefile", str(REPO / "Snakefile"),
                                      "--directory", str(tmp_path), "--quiet", "rules"],
                         capture_output=True, text=True, check=True)
    counts = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    assert counts == {"all": 1, "check_data": 2, "encode": 2, "evaluate": 3, "prepare": 2, "reference_stats": 2,
                      "report": 1, "sample": 3, "synthesize": 1, "train": 3, "train_evaluator": 1, "train_vae": 1,
                      "total": 22}


def test_config_typo_fails_before_any_job(tmp_path):
    bad = merge(yaml.safe_load((REPO / "config" / "smoke.yaml").read_text()), {"sampling": {"guidnace": 2}})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    out = subprocess.run(SNAKEMAKE + ["--cores", "1", "--snakefile", str(REPO / "Snakefile"), "--directory",
                                      str(tmp_path), "--configfile", str(path)], capture_output=True, text=True)
    assert out.returncode != 0
    assert f"{path}: sampling.guidnace: unknown key" in out.stdout + out.stderr
    assert not (tmp_path / "work").exists()  # nothing was scheduled, nothing written


def test_recipe_stage_subset_keeps_its_init_chain():
    raw = default_raw()
    raw["recipes"]["pe_extrapolate"] = {"arch": "dit", "size": "tiny", "objective": "rectified_flow",
                                        "stages": ["transfer"]}
    runs = [r.run_id for r in expand_runs(validate(raw))]
    assert runs[-2:] == ["pe_extrapolate.synthetic.pretrain.32", "pe_extrapolate.synthetic.transfer.64"]
    raw["recipes"]["pe_extrapolate"]["stages"] = ["finetune"]
    with pytest.raises(ConfigError, match=r"recipes\.pe_extrapolate\.stages: unknown stage"):
        validate(raw)


def test_sampling_settings_change_the_sample_sets_not_the_weights():
    """A recipe's or a stage's `sampling` (steps, sweeps, size conditions) reruns sampling, never training; the
    stage's wins over the recipe's, which wins over `sampling`."""
    raw = default_raw()
    run_id = "dit.synthetic.transfer.64"
    before = Scenario(validate(raw))
    raw["recipes"]["dit"]["sampling"] = {"steps": 3, "aux_samples": 5}
    raw["stages"]["transfer"]["sampling"] = {"aux_samples": 7, "size_conditions": []}
    after = Scenario(validate(raw))
    run_before, run_after = before.run(run_id), after.run(run_id)
    assert digest(after.run_section(run_after)) == digest(before.run_section(run_before))
    merged = after.sampling(run_after)
    assert (merged["steps"], merged["aux_samples"], merged["size_conditions"]) == (3, 7, [])
    assert after.sampling(after.run("dit.synthetic.pretrain.32"))["aux_samples"] == 5
    assert digest(after.eval_section(run_after)) != digest(before.eval_section(run_before))
    raw["stages"]["transfer"]["sampling"] = {"steps": 3}  # the sampler settings stay the recipe's and the study's
    with pytest.raises(ConfigError, match="stages.transfer.sampling"):
        validate(raw)


def test_resources_do_not_change_run_hashes_and_pick_the_launcher():
    from ldm.config import job_resources, launcher

    raw = default_raw()
    before = digest(run_section(validate(raw), "dit.synthetic.transfer.64"))
    raw["stages"]["transfer"]["resources"] = {"gpus": 8, "runtime": 600}
    raw["resources"] = {"default": {"mem_mb": 1000}, "train": {"gpus": 1}}
    config = validate(raw)
    assert digest(run_section(config, "dit.synthetic.transfer.64")) == before
    res = job_resources(config, "train", "transfer")
    assert (res["gpus"], res["runtime"], res["mem_mb"]) == (8, 600, 1000)
    assert job_resources(config, "train", "pretrain")["gpus"] == 1
    assert launcher(res, "py") == "py -m ldm.torchrun --standalone --nproc_per_node 8"
    assert launcher({"gpus": 1}, "py") == "py"
    raw["recipes"]["dit"]["resources"] = {"nodes": 2}  # a recipe's own, over its stage's (only for train)
    config = validate(raw)
    assert digest(run_section(config, "dit.synthetic.transfer.64")) == before
    res = job_resources(config, "train", "transfer", "dit")
    assert (res["gpus"], res["nodes"], res["runtime"]) == (8, 2, 600)
    assert job_resources(config, "sample", None, "dit") == job_resources(config, "sample")
    raw["recipes"]["dit"]["resources"] = {"nodes": 3}  # 3 x 1 processes at pretrain do not split the batch of 32
    with pytest.raises(ConfigError, match=r"stage pretrain's 3 process\(es\) \(recipe dit's resources\)"):
        validate(raw)
    assert launcher({"gpus": 4, "nodes": 2}, "py").startswith("srun --nodes 2 --ntasks-per-node 1 --kill-on-bad-exit=1 py -m ldm.torchrun --nnodes 2")


def test_the_launchers_torchrun_passes_the_jobs_own_options_to_the_workers():
    """`--run` is an abbreviation of torchrun's `--run-path`: torchrun itself refuses the rules' command line."""
    import torch.distributed.run
    from ldm.torchrun import parse_args

    job = ["-m", "ldm.cli", "train", "--config", "c.json", "--run", "dit.synthetic.pretrain.16", "--threads", "1"]
    args = parse_args(["--standalone", "--nproc_per_node", "2", *job])
    assert (args.module, args.training_script, args.nproc_per_node) == (True, "ldm.cli", "2")
    assert args.training_script_args == job[2:]
    with pytest.raises(SystemExit):
        torch.distributed.run.parse_args(["--standalone", "--nproc_per_node", "2", *job])


def _job_counts(stdout: str) -> dict:
    counts = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


def test_paper_study_runs_each_scenario_as_a_prefixed_module(tmp_path):
    from ldm.config import study_scenarios

    scenarios = study_scenarios(yaml.safe_load((REPO / "config" / "paper.yaml").read_text()))
    assert {name: len(expand_runs(cfg)) for name, cfg in scenarios.items()} == {"imagenet1k": 30, "cc12m": 16}
    out = subprocess.run(SNAKEMAKE + ["-n", "--cores", "2", "--snakefile", str(REPO / "Snakefile"), "--directory",
                                      str(tmp_path), "--configfile", str(REPO / "config" / "paper.yaml"),
                                      "--quiet", "rules"], capture_output=True, text=True, check=True)
    counts = _job_counts(out.stdout)
    assert counts["imagenet1k_train"] == 30 and counts["cc12m_train"] == 16 and counts["all"] == 1
    assert counts["imagenet1k_sample"] == counts["imagenet1k_evaluate"] == 30


def test_study_scenarios_may_not_share_a_workdir():
    from ldm.config import study_scenarios

    smoke = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    with pytest.raises(ConfigError, match=r"scenarios\.b\.workdir: 'work/smoke' is also used by 'a'"):
        study_scenarios({"name": "s", "scenarios": {"a": smoke, "b": dict(smoke, name="b")}})
    with pytest.raises(ConfigError, match="unknown key in a study config"):
        study_scenarios({"name": "s", "scenarios": {"a": smoke}, "training": {}})


def test_stages_at_one_resolution_may_crop_differently(tmp_path):
    raw = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    raw["stages"]["scratch"]["crop"] = "random"
    runs = {r.stage: r for r in expand_runs(validate(raw))}
    assert (runs["transfer"].data_key, runs["scratch"].data_key) == ("r32", "r32-random")
    assert [parse_data_key(r.data_key) for r in (runs["transfer"], runs["scratch"])] == [(32, "center"), (32, "random")]
    path = tmp_path / "crop.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = subprocess.run(SNAKEMAKE + ["-n", "--cores", "2", "--snakefile", str(REPO / "Snakefile"), "--directory",
                                      str(tmp_path), "--configfile", str(path), "--quiet", "rules"],
                         capture_output=True, text=True, check=True)
    counts = _job_counts(out.stdout)
    # r16, r32 (center: VAE, evaluator, transfer) and r32-random (scratch) are prepared and encoded
    assert counts["prepare"] == 3 and counts["encode"] == 3 and counts["reference_stats"] == 2


def test_dvc_tracked_source_reruns_on_content_not_on_mtime(tmp_path):
    raw = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    raw["dataset"]["source"] = str(tmp_path / "images")
    (tmp_path / "images").mkdir()
    plain = digest(data_section(validate(raw)))
    pointer = tmp_path / "images.dvc"
    pointer.write_text("outs:\n- md5: 1111.dir\n  path: images\n")
    first = digest(data_section(validate(raw)))
    os.utime(tmp_path / "images", (1, 1))  # what a checkout does to the files: the hash does not move
    assert digest(data_section(validate(raw))) == first != plain
    pointer.write_text("outs:\n- md5: 2222.dir\n  path: images\n")  # new content
    assert digest(data_section(validate(raw))) != first


def test_validate_config_lists_each_scenario_of_a_study(capsys):
    from ldm.cli import main

    assert main(["validate-config", str(REPO / "config" / "paper.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].rsplit(" ", 1)[-1] for line in out] == ["imagenet1k", "cc12m"]
    assert "ok (30 runs" in out[0] and "ok (16 runs" in out[1]


def test_schema_semantic_enum_is_the_models_modes():
    """Semantic modes live in `ldm.models.conditioning.SEMANTIC_MODES`; the schema's enum must say the same."""
    from ldm.models.conditioning import SEMANTIC_MODES

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    enum = schema["properties"]["recipes"]["additionalProperties"]["properties"]["semantic"]["enum"]
    assert enum == [*SEMANTIC_MODES, None]


def test_schema_sampler_enums_are_the_spec_table():
    """Sampler names live in `ldm.spec.SAMPLERS`; the schema's enums must say the same."""
    from ldm.spec import SAMPLERS

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    recipe_enum = schema["properties"]["recipes"]["additionalProperties"]["properties"]["sampler"]["enum"]
    by_name, per_objective = schema["properties"]["sampling"]["properties"]["sampler"]["oneOf"]
    every = sorted({s for names in SAMPLERS.values() for s in names})
    assert sorted(recipe_enum) == every and sorted(by_name["enum"]) == every
    assert {k: tuple(v["enum"]) for k, v in per_objective["properties"].items()} == SAMPLERS


def test_spec_objects_have_exactly_the_schema_fields():
    """`spec.Recipe`/`spec.Stage` are built from validated sections: a key the schema adds must be a field."""
    import dataclasses

    from ldm.spec import Recipe, Stage

    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    for cls, section in ((Recipe, "recipes"), (Stage, "stages")):
        keys = set(schema["properties"][section]["additionalProperties"]["properties"])
        assert {f.name for f in dataclasses.fields(cls)} - {"name"} == keys, cls.__name__


@pytest.mark.parametrize("change, message", [
    ({"recipes": {"dit": {"arch": "dit", "size": "huge"}}}, "recipes.dit.size: 'huge' is not a size of dit"),
    ({"recipes": {"dit": {"arch": "dit", "size": "tiny", "options": {"no_such": 1}}}}, "unknown option(s) ['no_such']"),
    ({"resolutions": {"low": 24, "high": 32},
      "recipes": {"dit": {"arch": "dit", "size": "tiny", "options": {"patch_size": 4}}}},
     "latent 6 x 6): latent_size 6 is not divisible by patch_size 4"),
])
def test_preflight_builds_every_model_before_any_compute(change, message):
    """What only the model code knows fails `ldm validate-config` / Snakemake's onstart, naming the field."""
    from ldm.preflight import check_models

    raw = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    raw.update(change)
    with pytest.raises(ConfigError) as info:
        check_models(Scenario(validate(raw)))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_batch_that_does_not_split_over_processes_and_micro_batches_fails_validation():
    raw = default_raw()
    raw["training"]["grad_accum"] = 3
    with pytest.raises(ConfigError, match="training.batch_size: 32 is not divisible by stage pretrain's 1 process"):
        validate(raw)
    raw["training"]["grad_accum"] = 1
    raw["stages"]["transfer"]["resources"] = {"gpus": 3}
    with pytest.raises(ConfigError, match="stage transfer's 3 process"):
        validate(raw)


def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path, capsys):
    from ldm.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrecipes: {a: [\n")
    assert main(["validate-config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}:3:1: not valid YAML" in err


def test_snakemake_stops_before_the_first_job_on_a_recipe_the_models_reject(tmp_path):
    raw = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    raw["recipes"]["dit"]["size"] = "huge"
    config = tmp_path / "huge.yaml"
    config.write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                          str(tmp_path), "--configfile", str(config), "--cores", "1"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode != 0 and "recipes.dit.size: 'huge' is not a size of dit" in out.stderr + out.stdout
    assert not (tmp_path / "work").exists()  # nothing prepared, trained or encoded


def test_init_config_gives_the_dataset_its_own_name_workdir_and_results(tmp_path, capsys):
    from ldm.cli import main
    from ldm.layout import Layout

    (tmp_path / "raw" / "cat").mkdir(parents=True)
    out = tmp_path / "mine.yaml"
    args = ["init-config", "--source", str(tmp_path / "raw"), "--name", "mine", "--out", str(out),
            "--template", str(REPO / "config" / "default.yaml")]
    assert main(args) == 0
    config = load_config(out)
    default = load_config(REPO / "config" / "default.yaml")
    assert (config["name"], config["workdir"], config["results"]) == ("mine", "work/mine", "results/mine")
    assert config["dataset"] == {**default["dataset"], "name": "mine", "source": str(tmp_path / "raw"),
                                 "synthetic": config["dataset"]["synthetic"]}
    assert config["recipes"] == default["recipes"] and config["stages"] == default["stages"]
    assert main(args) == 2 and "already exists" in capsys.readouterr().err  # never overwritten
    assert main(["init-config", "--source", str(tmp_path / "nope"), "--name", "x", "--out", str(tmp_path / "x.yaml")]) == 2
    # datasets sharing a workdir keep their own VAE and evaluator
    other = {**config, "dataset": {**config["dataset"], "name": "other"}}
    assert Layout.of(config).trained_vae != Layout.of(other).trained_vae
    assert Layout.of(config).evaluator != Layout.of(other).evaluator


def test_nested_numeric_overrides_in_the_readme_style_are_numbers(tmp_path):
    """`--config training='{"lr": 0.01}'`: Snakemake hands nested scalars over as strings; they are numbers."""
    import json

    out = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                          str(tmp_path), "--configfile", str(REPO / "config" / "smoke.yaml"), "--cores", "1", "-n",
                          "--config", 'training={"lr": 0.01, "batch_size": 8}', 'sampling={"seeds": [0, 1]}'],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    (stored,) = (tmp_path / ".snakemake" / "ldm-configs").glob("*.json")
    config = json.loads(stored.read_text())
    assert config["training"]["lr"] == 0.01 and config["training"]["batch_size"] == 8
    assert config["sampling"]["seeds"] == [0, 1]


@pytest.mark.parametrize("configfile", ["small.yaml", "paper.yaml"])
def test_study_configs_plan_their_dag(configfile, tmp_path):
    """A dry run of the toy study and of the paper study builds the DAG (config files are read as they are)."""
    out = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory",
                          str(tmp_path), "--configfile", str(REPO / "config" / configfile), "--cores", "1", "-n"],
                         capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_reseed_config_is_small_with_other_training_seeds_and_the_claim_grid():
    """config/small_reseed.yaml repeats small.yaml's settings (a config cannot include another): they must not drift."""
    small, reseed = (yaml.safe_load((REPO / "config" / f"{n}.yaml").read_text()) for n in ("small", "small_reseed"))
    for key in set(small) | set(reseed):
        if key in ("name", "results", "train_seeds", "recipes", "study"):
            continue
        assert reseed.get(key) == small.get(key), key
    assert not set(reseed["train_seeds"]) & set(small["train_seeds"])
    # one workdir, so the jobs both configs share have one command line (the config's path variable is the
    # workdir's): otherwise Snakemake redoes them ("code changed") each time the other config runs
    assert resolved_config_variable(reseed["workdir"]) == resolved_config_variable(small["workdir"])
    assert resolved_config_variable("work/a-b") != resolved_config_variable("work/a_b")
    # the reseed draw is small's second draw of the claim runs: small trains those seeds too, so its
    # REPORT.md pools both draws and decides each alone (study.draws)
    assert reseed["train_seeds"] in small["study"]["draws"]
    for name, recipe in reseed["recipes"].items():
        assert {k: v for k, v in recipe.items() if k not in ("stages", "train_seeds")} == \
            {k: v for k, v in small["recipes"][name].items() if k not in ("stages", "train_seeds")}, name
        assert set(recipe["stages"]) <= set(small["recipes"][name]["stages"]), name
        assert set(reseed["train_seeds"]) <= set(small["recipes"][name]["train_seeds"]), name
    for key in ("claims", "efficiency", "equivalence_margin"):
        assert reseed["study"][key] == small["study"][key], key
