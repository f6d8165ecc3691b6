"""REPORT.md: verdicts, deltas and efficiency from metrics records, checked by hand-computed values."""
import math
from pathlib import Path

import pytest
import yaml

from ldm.config import ConfigError, load_config, merge, validate
from ldm.study import compare, first_reach, write_study_report

REPO = Path(__file__).resolve().parent.parent


def record(recipe, stage, fd, fd_std, acc=0.5, init=None, curve=None, step=300):
    return {"run_id": f"{recipe}.synthetic.{stage}.64", "recipe": recipe, "stage": stage, "init_run": init,
            "step": step, "seeds": [0, 1, 2], "code_version": "abc",
            "metrics": {"fd_evaluator": {"mean": fd, "std": fd_std, "per_seed": [fd] * 3},
                        "cond_accuracy": {"mean": acc, "std": 0.0, "per_seed": [acc] * 3}},
            "curve": curve or [{"step": step, "fd_evaluator": fd}]}


def test_verdict_needs_two_standard_errors_in_the_claimed_direction():
    base = record("a", "transfer", 100.0, 3.0)
    se = math.sqrt(3.0**2 / 3 + 3.0**2 / 3)  # 2.449
    assert compare(base, record("b", "transfer", 100 + 2.1 * se, 3.0), "fd_evaluator")["verdict"] == "supported"
    assert compare(base, record("b", "transfer", 100 + 1.9 * se, 3.0), "fd_evaluator")["verdict"] == "inconclusive"
    worse = compare(base, record("b", "transfer", 100 - 2.1 * se, 3.0), "fd_evaluator")
    assert worse["verdict"] == "contradicted" and worse["se"] == pytest.approx(se)
    # higher is better for accuracy: a variant with lower accuracy supports the baseline
    assert compare(record("a", "t", 1, 0, acc=0.6), record("b", "t", 1, 0, acc=0.4), "cond_accuracy")["verdict"] == "supported"
    assert compare(base, None, "fd_evaluator")["verdict"] == "not tested"


def test_first_reach_uses_the_metric_direction():
    rec = record("a", "t", 90, 1, curve=[{"step": 0, "fd_evaluator": 300}, {"step": 100, "fd_evaluator": 150},
                                       {"step": 200, "fd_evaluator": 95}, {"step": 300, "fd_evaluator": 90}])
    assert first_reach(rec, "fd_evaluator", 150.0) == 100
    assert first_reach(rec, "fd_evaluator", 96.0) == 200
    assert first_reach(rec, "fd_evaluator", 10.0) is None


def test_small_config_study_references_are_checked():
    raw = yaml.safe_load((REPO / "config" / "small.yaml").read_text())
    assert load_config(REPO / "config" / "small.yaml")["study"]["claims"]
    broken = merge(raw, {"study": {"efficiency": {"runs": ["improved/transfer", "improved/nowhere"], "metric": "fd_evaluator"}}})
    with pytest.raises(ConfigError, match=r"study\.efficiency\.runs: 'improved/nowhere' is not a run"):
        validate(broken)


def test_report_has_every_section_with_the_numbers(tmp_path):
    raw = yaml.safe_load((REPO / "config" / "default.yaml").read_text())
    raw["study"] = {
        "architectures": {"recipes": ["dit"], "stages": ["transfer"]},
        "ablations": {"pretraining": {"question": "q", "baseline": "dit/transfer", "variants": ["dit/scratch"]}},
        "efficiency": {"runs": ["dit/transfer", "dit/scratch"], "metric": "fd_evaluator"},
        "claims": {"6": [{"baseline": "dit/transfer", "variant": "dit/scratch", "metric": "fd_evaluator"}]},
    }
    config = validate(raw)
    pre = record("dit", "pretrain", 140, 5, step=1000)
    pre["run_id"] = "dit.synthetic.pretrain.32"
    transfer = record("dit", "transfer", 120, 2, init="dit.synthetic.pretrain.32",
                      curve=[{"step": 200, "fd_evaluator": 170}, {"step": 400, "fd_evaluator": 150},
                             {"step": 600, "fd_evaluator": 120}], step=600)
    scratch = record("dit", "scratch", 160, 2, curve=[{"step": 200, "fd_evaluator": 200},
                                                      {"step": 600, "fd_evaluator": 160}], step=600)
    text = write_study_report(config, [pre, transfer, scratch], tmp_path).read_text()
    assert "120.000 ± 2.000" in text and "2.27 (DiT-XL/2" in text
    assert "+40.000 ± 1.633" in text  # scratch - transfer, se = sqrt(2*4/3)
    # level 160 (worst final): transfer first reaches it at step 400 = 12,800 images + 32,000 pre-training
    assert "| `dit/transfer` | 400 | 44,800 |" in text
    assert "| `dit/scratch` | 600 | 19,200 |" in text
    assert "| 6 |" in text and "supported" in text
    assert "| 5 |" in text and "not tested at this scale" in text


def test_transfer_table_skips_recipes_that_ran_a_subset_of_the_stages():
    from ldm.stages.report import transfer_table

    raw = yaml.safe_load((REPO / "config" / "default.yaml").read_text())
    raw["recipes"]["other"] = {"arch": "dit", "size": "tiny", "objective": "rectified_flow", "stages": ["transfer"]}
    config = validate(raw)
    records = [dict(record(r, s, 120, 2), resolution=64)
               for r, s in [("dit", "transfer"), ("dit", "scratch"), ("other", "transfer"), ("other", "pretrain")]]
    table = transfer_table(config, records)
    assert list(table["recipe"]) == ["dit"]


def test_claim_6_needs_less_compute_not_only_a_better_final_metric():
    from ldm.study import claims_section, efficiency_costs

    config = validate(yaml.safe_load((REPO / "config" / "default.yaml").read_text()))
    pre = dict(record("dit", "pretrain", 140, 5, step=100), run_id="dit.synthetic.pretrain.32")
    transfer = record("dit", "transfer", 120, 2, init="dit.synthetic.pretrain.32", step=600,
                      curve=[{"step": 200, "fd_evaluator": 155}, {"step": 600, "fd_evaluator": 120}])
    scratch = record("dit", "scratch", 160, 2, step=600, curve=[{"step": 600, "fd_evaluator": 160}])
    by_ref = {"dit/pretrain": pre, "dit/transfer": transfer, "dit/scratch": scratch}
    by_run = {r["run_id"]: r for r in by_ref.values()}
    study = config["study"]

    def verdict(gflops_pre, gflops_high):
        pre["model"], transfer["model"], scratch["model"] = ({"train_gflops_per_image": g} for g in
                                                            (gflops_pre, gflops_high, gflops_high))
        table = claims_section(study, by_ref, None, efficiency_costs(study["efficiency"], by_ref, by_run, config))
        return next(line for line in table.splitlines() if line.startswith("| 6 |"))

    # level 160: transfer at step 200 (+100 pre-training steps) vs scratch at step 600, 32 images per step
    assert "| supported |" in verdict(1.0, 1.0)  # (100 + 200) / 600 = 0.50x the compute
    assert "| partly supported |" in verdict(8.0, 1.0)  # (800 + 200) / 600 = 1.67x
    assert "1.67x" in verdict(8.0, 1.0)
