"""Training seeds: each run of the grid trained once per seed, ids carrying the seed, inits within a seed."""
import copy

import yaml

from ldm.config import validate
from ldm.provenance import digest
from ldm.spec import Scenario, expand_runs

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _default(**top):
    config = yaml.safe_load((REPO / "config" / "default.yaml").read_text())
    config.update(top)
    return validate(config, "test")


def test_without_train_seeds_the_grid_keeps_its_ids_and_seeds():
    scenario = Scenario(_default())
    assert list(scenario.runs) == ["dit.synthetic.pretrain.32", "dit.synthetic.transfer.64", "dit.synthetic.scratch.64"]
    run = scenario.run("dit.synthetic.transfer.64")
    assert run.train_seed is None and run.group == run.run_id
    assert scenario.run_seed(run) == int(digest([0, run.run_id]), 16) % (2**63)


def test_train_seeds_repeat_every_run_and_chain_inits_within_a_seed():
    scenario = Scenario(_default(train_seeds=[0, 1, 2]))
    assert len(scenario.runs) == 9
    run = scenario.run("dit.synthetic.transfer.64.s1")
    assert run.train_seed == 1 and run.group == "dit.synthetic.transfer.64"
    assert run.init_run == "dit.synthetic.pretrain.32.s1"
    # common random numbers: one seed, one data order and noise stream for every run of that seed
    assert scenario.run_seed(run) == scenario.run_seed(scenario.run("dit.synthetic.scratch.64.s1"))
    assert scenario.run_seed(run) != scenario.run_seed(scenario.run("dit.synthetic.scratch.64.s2"))


def test_a_recipe_list_overrides_the_top_level_one_and_adding_a_seed_reruns_nothing_else():
    config = _default(train_seeds=[0, 1])
    more = copy.deepcopy(config)
    more["train_seeds"] = [0, 1, 2]
    a, b = Scenario(config), Scenario(more)
    for run_id, run in a.runs.items():  # the existing runs keep their hashes
        assert digest(a.run_section(run)) == digest(b.run_section(b.run(run_id)))
    config["recipes"]["dit"]["train_seeds"] = [7]
    assert [r.run_id for r in expand_runs(config)] == ["dit.synthetic.pretrain.32.s7", "dit.synthetic.transfer.64.s7",
                                                       "dit.synthetic.scratch.64.s7"]


def test_another_scenarios_checkpoint_is_taken_from_the_same_seed():
    config = _default(train_seeds=[0, 1])
    config["stages"]["scratch"]["init_checkpoint"] = "elsewhere/runs/x.s{train_seed}/final.safetensors"
    runs = {r.run_id: r for r in expand_runs(config)}
    assert runs["dit.synthetic.scratch.64.s1"].init_checkpoint == "elsewhere/runs/x.s1/final.safetensors"
