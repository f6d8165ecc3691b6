"""ldm.claims / ldm.claim_items: primary and secondary items, parts, the val_loss validity guard and claim 8's
pairwise ranking test, on records with hand-computed intervals (scipy's paired t as the reference)."""
from pathlib import Path

import pytest
import yaml
from scipy import stats

from ldm import verdicts as V
from ldm.claim_items import ranking_item, val_loss_refusal
from ldm.claims import combine_parts, decide_part, evaluate_claim, is_decided
from ldm.config import load_config, study_scenarios
from ldm.efficiency import step_before
from ldm.seed_groups import group_records

REPO = Path(__file__).resolve().parent.parent


def seed_records(recipe, stage, values, metric="val_loss"):
    return [{"run_id": f"{recipe}.synthetic.{stage}.64.s{s}", "run_group": f"{recipe}.synthetic.{stage}.64",
             "train_seed": s, "recipe": recipe, "stage": stage, "step": 100,
             "metrics": {metric: {"mean": v, "std": 0.0, "per_seed": [v]}}} for s, v in enumerate(values)]


def test_the_primary_item_decides_and_a_contrary_secondary_blocks_it():
    s, c, e, i, n = (V.Verdict(v) for v in ("supported", "contradicted", "equivalent", "inconclusive", "not tested"))
    assert decide_part([s, i]) == ("supported", 0)  # an undecided secondary does not hold the part back
    assert decide_part([s, e]) == ("supported", 0)  # a difference inside the margin is not a contrary verdict
    assert decide_part([s, c]) == ("inconclusive (items disagree)", 0)
    assert decide_part([i, s]) == ("inconclusive", 0)  # the secondary never decides in the primary's place
    assert decide_part([n, c, s]) == ("inconclusive (items disagree)", 1)  # first testable item is primary
    assert decide_part([n, n]) == ("not tested", None)


def test_parts_combine_and_decided_parts_that_differ_are_mixed():
    assert combine_parts({"a": "supported", "b": "contradicted"}, "all")[0] == "mixed (a: supported; b: contradicted)"
    assert combine_parts({"a": "supported", "b": "inconclusive"}, "all")[0] == "partly supported"
    assert combine_parts({"a": "supported", "b": "supported"}, "all")[0] == "supported"
    assert combine_parts({"a": "supported", "b": "contradicted"}, "any")[0] == "inconclusive (items disagree)"
    assert combine_parts({"a": "supported", "b": "equivalent"}, "any")[0] == "supported"
    assert combine_parts({"a": "inconclusive (items disagree)", "b": "supported"}, "all")[0] == "partly supported"
    assert is_decided("mixed (a: supported; b: contradicted)") and is_decided("equivalent")
    assert not is_decided("partly supported") and not is_decided("inconclusive (items disagree)")
    assert is_decided("supported; basis: 1 training seed: sampling noise only")


def test_val_loss_is_refused_across_a_schedule_shift_and_allowed_across_positional_embeddings():
    config = load_config(REPO / "config" / "small.yaml")
    refused = val_loss_refusal(config, ["improved/transfer", "improved/transfer_noshift"])
    assert refused and "schedule shift" in refused
    assert val_loss_refusal(config, ["improved/transfer", "improved/transfer_extrapolate"]) is None
    assert val_loss_refusal(config, ["unet/transfer", "dit/transfer", "mdt/transfer"]) is None  # one objective
    assert "resolution" in val_loss_refusal(config, ["improved/pretrain", "improved/transfer"])
    own = study_scenarios(yaml.safe_load((REPO / "config" / "paper.yaml").read_text()))["imagenet1k"]
    # the baselines' own objectives and schedules: val_loss cannot rank them
    assert "objective" in val_loss_refusal(own, ["unet/transfer", "improved/transfer"])


def test_a_refused_val_loss_item_is_not_tested_and_the_next_item_decides():
    config = load_config(REPO / "config" / "small.yaml")
    records = (seed_records("improved", "transfer", [0.20, 0.21, 0.19])
               + seed_records("improved", "transfer_noshift", [0.30, 0.31, 0.29]))
    study = {"claims": {"7": [{"part": "shift", "baseline": "improved/transfer", "variant": "improved/transfer_noshift",
                               "metric": "val_loss"}]}}
    verdict, evaluated, _ = evaluate_claim("7", study, group_records(records), config=config)
    assert verdict == "not tested" and "schedule shift" in evaluated[0][1]


def test_claim_8_tests_each_pair_of_the_own_papers_order():
    config = load_config(REPO / "config" / "small.yaml")
    study = {"architectures": {"recipes": ["unet", "dit", "mdt"], "stages": ["transfer"], "metric": "val_loss"}}

    def verdict(unet, dit, mdt):
        records = [*seed_records("unet", "transfer", unet), *seed_records("dit", "transfer", dit),
                   *seed_records("mdt", "transfer", mdt)]
        return ranking_item(study, group_records(records), 0.02, config)

    kept, text = verdict([0.30, 0.31, 0.32], [0.25, 0.26, 0.27], [0.20, 0.215, 0.22])
    assert kept.verdict == "contradicted" and text.count("→ **supported**") == 3
    # mdt - dit advantage: scipy's paired interval of dit - mdt
    ci = stats.ttest_rel([0.25, 0.26, 0.27], [0.20, 0.215, 0.22]).confidence_interval(0.95)
    assert f"advantage +0.048 [95% CI {ci.low:+.3f}, {ci.high:+.3f}]" in text
    reversed_, _ = verdict([0.20, 0.21, 0.22], [0.25, 0.26, 0.27], [0.30, 0.305, 0.32])
    assert reversed_.verdict == "supported"
    noisy, _ = verdict([0.30, 0.20, 0.31], [0.25, 0.30, 0.22], [0.20, 0.33, 0.24])
    assert noisy.verdict == "inconclusive"


def test_reaching_a_level_is_known_between_two_snapshots():
    record = {"step": 300, "curve": [{"step": 100, "fd_evaluator": 150.0}, {"step": 200, "fd_evaluator": 120.0},
                                     {"step": 300, "fd_evaluator": 90.0}]}
    assert step_before(record, "fd_evaluator", 200) == 100
    assert step_before(record, "fd_evaluator", 100) == 0  # nothing before the first snapshot: the run's start
    assert step_before(record, "fd_evaluator", None) == 300  # never reached: its whole cost is the lower bound


@pytest.mark.parametrize("number", ["2", "6", "7"])
def test_small_configs_put_val_loss_first_where_it_is_valid(number):
    """The committed claims order: in every part, the first item the guard allows is val_loss, except across
    the schedule shift, where fd_evaluator leads."""
    config = load_config(REPO / "config" / "small.yaml")
    items = config["study"]["claims"][number]
    first = {}
    for item in items:
        first.setdefault(item.get("part", ""), item)
    for item in first.values():
        refused = val_loss_refusal(config, [item["baseline"], item["variant"]])
        assert (item["metric"] == "val_loss") == (refused is None)


def test_each_draw_of_training_seeds_is_decided_alone():
    from ldm.claims import draws_section

    config = load_config(REPO / "config" / "small.yaml")
    # seeds 0-2: the baseline clearly better; seeds 3-5: clearly worse. Pooled: inconclusive
    base = seed_records("improved", "pretrain", [0.20, 0.21, 0.22, 0.30, 0.31, 0.32])
    var = seed_records("improved_additive", "pretrain", [0.30, 0.31, 0.325, 0.20, 0.21, 0.225])
    study = {"draws": [[0, 1, 2], [3, 4, 5]],
             "claims": {"3": [{"baseline": "improved/pretrain", "variant": "improved_additive/pretrain",
                               "metric": "val_loss"}]}}
    text = draws_section(study, base + var, config)
    assert "Of 1 claims tested in every draw, **1 reversed** (decided in two draws, differently: 3)" in text
    assert "| 3 | supported | contradicted | inconclusive | reversed |" in text
    assert "| 1 | not tested at this scale | not tested at this scale |" in text
    # the second draw too noisy to decide: not a reversal
    var[4]["metrics"]["val_loss"]["mean"] = 0.40
    text = draws_section(study, base + var, config)
    assert "**0 reversed**" in text and "1 decided in one draw only (3:" in text
    assert "| 3 | supported | inconclusive |" in text and "| decided in one draw only |" in text


def test_evaluator_metrics_compare_only_records_of_one_evaluator():
    from ldm.claim_items import metric_item

    base = seed_records("improved", "transfer", [100.0, 110.0, 105.0], "fd_evaluator")
    var = seed_records("improved", "scratch", [200.0, 210.0, 205.0], "fd_evaluator")
    for rec in base + var:
        rec["evaluator_weights_sha256"] = "a" * 64
    item = {"baseline": "improved/transfer", "variant": "improved/scratch", "metric": "fd_evaluator"}
    assert metric_item(item, group_records(base + var), 0.02)[0].verdict == "supported"
    var[1]["evaluator_weights_sha256"] = "b" * 64  # one record scored by a retrained evaluator
    result, text = metric_item(item, group_records(base + var), 0.02)
    assert result.verdict == "not tested" and "2 different evaluator weights (aaaaaaaa, bbbbbbbb)" in text
    # val_loss does not go through the evaluator: still compared
    for rec in base + var:
        fd = rec["metrics"]["fd_evaluator"]
        rec["metrics"]["val_loss"] = dict(fd, mean=fd["mean"] / 1000)
    assert metric_item(dict(item, metric="val_loss"), group_records(base + var), 0.02)[0].verdict == "supported"


def test_runs_of_different_autoencoders_compare_on_no_metric():
    from ldm.claim_items import metric_item

    base = seed_records("improved", "transfer", [0.20, 0.21, 0.22])
    var = seed_records("improved", "scratch", [0.30, 0.31, 0.32])
    item = {"baseline": "improved/transfer", "variant": "improved/scratch", "metric": "val_loss"}
    assert metric_item(item, group_records(base + var), 0.02)[0].verdict == "supported"  # neither says: one unknown
    for rec in var:
        rec["vae_weights_sha256"] = "c" * 64  # re-encoded: a record that names its autoencoder vs ones that do not
    result, text = metric_item(item, group_records(base + var), 0.02)
    assert result.verdict == "not tested" and "2 different autoencoders (cccccccc, unrecorded)" in text
    for rec in base:
        rec["vae_weights_sha256"] = "c" * 64
    assert metric_item(item, group_records(base + var), 0.02)[0].verdict == "supported"
