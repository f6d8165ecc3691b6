"""REPORT.md: verdicts, deltas and efficiency from metrics records, checked by hand-computed values."""
import math

import numpy as np
from pathlib import Path

import pytest
import yaml

from ldm.config import ConfigError, load_config, merge, validate
from ldm.efficiency import first_reach
from ldm.seed_groups import compare
from ldm.study import write_study_report

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
    # scratch - transfer ± 2 se, se = sqrt(2*4/3) = 1.633 (one training seed: sampling seeds only, marked †)
    assert "+40.000 [+36.734, +43.266]†" in text
    assert "each run is trained once" in text and "**Method.**" in text
    # level 160 (worst final): transfer first reaches it at step 400 = 12,800 images + 32,000 pre-training
    assert "| `dit/transfer` | 400 | 44,800 |" in text
    assert "| `dit/scratch` | 600 | 19,200 |" in text
    # no FLOPs in these records: the compute item is not tested (images seen are no compute across resolutions)
    assert "| 6 |" in text and "| supported; basis: 1 training seed: sampling noise only |" in text
    assert "train_gflops_per_image" in text
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
    from ldm.claims import claims_section
    from ldm.efficiency import efficiency_costs

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
        table = claims_section(study, by_ref, efficiency_costs(study["efficiency"], by_ref, by_run, config))
        return next(line for line in table.splitlines() if line.startswith("| 6 |"))

    # level 160: transfer at step 200 (+100 pre-training steps) vs scratch at step 600, 32 images per step
    assert "| supported; basis:" in verdict(1.0, 1.0)  # (100 + 200) / 600 = 0.50x the compute
    # (800 + 200) / 600 = 1.67x: better at equal high-res steps, more compute overall. Before training seeds this
    # read "partly supported"; the compute is now an item of its own, and two items that disagree say so
    assert "| inconclusive (items disagree); basis:" in verdict(8.0, 1.0)
    # transfer's cost lies in (8·100·32, 8·100·32 + 200·32] GFLOPs = (2.56e13, 3.2e13] FLOPs, scratch's in
    # (0, 600·32] GFLOPs = (0, 1.92e13]: even at the censoring's best case the transfer is dearer
    assert "advantage in [-3.2e+13, -6.4e+12] (1 training seed: cost bounds only" in verdict(8.0, 1.0)
    assert "→ **contradicted**" in verdict(8.0, 1.0)


# ------------------------------------------------------------------------------------------ training seeds
def seeded(recipe, stage, seed, fd, acc=0.5, curve=None, step=200, gflops=None, **extra):
    """A metrics record of one training seed (ids `<run>.s<seed>`), three sampling seeds around `fd`."""
    group = f"{recipe}.synthetic.{stage}.64"
    rec = {"run_id": f"{group}.s{seed}", "run_group": group, "train_seed": seed, "recipe": recipe, "stage": stage,
           "resolution": 64, "init_run": None, "step": step, "seeds": [0, 1, 2], "num_samples": 8,
           "chance_accuracy": 0.25, "code_version": "abc",
           "metrics": {"fd_evaluator": {"mean": fd, "std": 1.0, "per_seed": [fd - 1, fd, fd + 1]},
                       "cond_accuracy": {"mean": acc, "std": 0.0, "per_seed": [acc] * 3}},
           "curve": curve or [{"step": step, "fd_evaluator": fd, "fd_evaluator_std": 1.0}], **extra}
    if gflops is not None:
        rec["model"] = {"train_gflops_per_image": gflops}
    return rec


FD = {  # per training seed 0, 1, 2; lower is better, the baseline "base" is claimed better than each
    "base": [100.0, 104.0, 98.0],
    "worse": [103.0, 108.5, 100.0],  # paired differences 3, 4.5, 2: supported
    "better": [95.0, 99.0, 93.5],  # -5, -5, -4.5: contradicted
    "same": [100.2, 103.9, 98.1],  # 0.2, -0.1, 0.1: inside ±2% of 100.67: equivalent
    "noisy": [104.0, 102.0, 101.0],  # 4, -2, 3: inconclusive
}


def sweep(fd, acc=(0.4, 0.6, 0.8)):
    return {"scales": [1.0, 2.0, 4.0], "fd_evaluator": list(fd), "cond_accuracy": list(acc), "chosen_scale": 2.0}


def seeded_records():
    records = []
    for name, values in FD.items():
        for seed, fd in enumerate(values):
            extra = {}
            if name == "base":  # reaches the efficiency level (108.5) at step 100, seed 2 only at 150
                first = 105.0 if seed < 2 else 112.0
                curve = [{"step": 100, "fd_evaluator": first}, {"step": 150, "fd_evaluator": 105.0},
                         {"step": 200, "fd_evaluator": fd}]
                extra = {"guidance_sweep": sweep([110 + seed, 100 + seed, 105 + seed]),
                         "guidance_sweep_joint": sweep([115 + seed, 108 + seed + [0, 1.5, -0.5][seed], 112 + seed])}
            else:
                curve = [{"step": 100, "fd_evaluator": 130.0}, {"step": 200, "fd_evaluator": fd}]
            records.append(seeded(name, "transfer", seed, fd, curve=curve, gflops=1.0, **extra))
    return records


def seeded_config(claims, **study):
    raw = yaml.safe_load((REPO / "config" / "default.yaml").read_text())
    for name in FD:
        raw["recipes"][name] = dict(raw["recipes"]["dit"], stages=["transfer"])
    config = validate(raw)
    # the new claim-item keys (kind, margin, sweeps, accuracy_level) are set after validation: the schema is
    # not this test's subject
    config["study"] = {"ablations": {"cond": {"question": "q", "baseline": "base/transfer",
                                              "variants": ["worse/transfer", "same/transfer"]}},
                       "efficiency": {"runs": ["base/transfer", "worse/transfer"], "metric": "fd_evaluator"},
                       "claims": claims, **study}
    return config


def claim_row(text, number):
    return next(line for line in text.splitlines() if line.startswith(f"| {number} |"))


def test_seeded_report_aggregates_over_training_seeds_and_reaches_every_verdict(tmp_path):
    from scipy import stats

    item = lambda variant, metric="fd_evaluator", **kw: {"baseline": "base/transfer", "variant": f"{variant}/transfer",  # noqa: E731
                                                       "metric": metric, **kw}
    claims = {"1": [item("noisy")], "2": [item("worse")], "3": [item("better")], "4": [item("worse", part="FID"), item("same", "cond_accuracy", part="alignment")],
              "6": [item("worse")], "7": [item("same"), item("same", "cond_accuracy")]}
    text = write_study_report(seeded_config(claims), seeded_records(), tmp_path).read_text()
    assert "each run is trained once," not in text and "Each run is trained once per training seed (0, 1, 2)" in text
    assert "(5 runs, 15 trainings" in text
    # table cells: mean ± std over the 3 training seeds; the delta's interval is scipy's paired t interval
    assert f"| {np.mean(FD['base']):.3f} ± {np.std(FD['base'], ddof=1):.3f} (n=3) |" == "| 100.667 ± 3.055 (n=3) |"
    assert "| `base/transfer` | 100.667 ± 3.055 (n=3) |" in text
    ci = stats.ttest_rel(FD["worse"], FD["base"]).confidence_interval(0.95)
    assert f"+3.167 [{ci.low:+.3f}, {ci.high:+.3f}] |" in text
    assert "paired t over 3 training seeds" in text and "1 training seed" not in claim_row(text, 2)
    assert "| supported |" in claim_row(text, 2)
    assert "| contradicted |" in claim_row(text, 3)
    row1 = claim_row(text, 1)
    assert "| inconclusive |" in row1 and "would need about" in row1 and "training seeds per run" in row1
    assert "| equivalent |" in claim_row(text, 7)
    assert "| supported |" in claim_row(text, 4) and "(and/or claim" in claim_row(text, 4)  # fd supported, acc equivalent
    # claim 6: the quality item decides; the compute item's costs are censored between snapshots: base reaches the
    # level at step 100 (seeds 0, 1: no snapshot before, so (0, 100]) and 150 (seed 2: (100, 150]), worse at
    # 200 ((100, 200]); 32 images per step, 1 GFLOP per image. Worst-case ends of the paired t intervals:
    row6 = claim_row(text, 6)
    assert "| supported |" in row6 and "compute (derived from study.efficiency)" in row6
    assert "3 of 3 and 3 of 3 training seeds reached it" in row6
    low = stats.ttest_rel(np.array([100, 100, 100]) * 32e9, np.array([100, 100, 150]) * 32e9).confidence_interval().low
    high = stats.ttest_rel(np.array([200, 200, 200]) * 32e9, np.array([0, 0, 100]) * 32e9).confidence_interval().high
    assert f"advantage in [{low:+.3g}, {high:+.3g}] (censoring-aware t over 3 + 3 training seeds) → **inconclusive**" in row6
    assert "| `base/transfer` | 117 ± 29 | 3,733 ± 924 |" in text and "| 3 of 3 |" in text


def test_claim_items_that_disagree_are_flagged(tmp_path):
    claims = {"7": [{"baseline": "base/transfer", "variant": "worse/transfer", "metric": "fd_evaluator"},
                    {"baseline": "base/transfer", "variant": "better/transfer", "metric": "fd_evaluator"}]}
    row = claim_row(write_study_report(seeded_config(claims), seeded_records(), tmp_path).read_text(), 7)
    assert "| inconclusive (items disagree) |" in row
    assert "→ **supported**" in row and "→ **contradicted**" in row  # each number keeps its own verdict


def test_equivalence_margin_comes_from_the_config(tmp_path):
    base = {"baseline": "base/transfer", "variant": "same/transfer", "metric": "fd_evaluator"}
    records = seeded_records()
    text = write_study_report(seeded_config({"2": [base]}), records, tmp_path).read_text()
    assert "| equivalent |" in claim_row(text, 2)
    # a margin smaller than the interval's reach: no longer equivalent
    tight = write_study_report(seeded_config({"2": [dict(base, margin={"absolute": 0.05})]}), records, tmp_path).read_text()
    assert "| inconclusive |" in claim_row(tight, 2)
    loose = write_study_report(seeded_config({"2": [dict(base, variant="worse/transfer")]}, equivalence_margin=0.5),
                               records, tmp_path).read_text()
    assert "| equivalent |" in claim_row(loose, 2) and "excludes 0" in claim_row(loose, 2)  # precedence
    assert "`study.equivalence_margin` = 0.5" in loose


def test_claim_5_tradeoff_item_compares_the_sweeps(tmp_path):
    item = {"kind": "tradeoff", "baseline": "base/transfer", "variant": "base/transfer", "metric": "fd_evaluator",
            "baseline_sweep": "guidance_sweep", "variant_sweep": "guidance_sweep_joint", "accuracy_level": 0.6}
    records = seeded_records()
    row = claim_row(write_study_report(seeded_config({"5": [item]}), records, tmp_path).read_text(), 5)
    # best fd at accuracy >= 0.6: 100 + s (separate) vs 108 + s + (0, 1.5, -0.5) (joint): differences 8, 9.5, 7.5
    assert "| supported |" in row and "101.000 vs 109.333" in row and "advantage +8.333" in row
    # between the sweep points: at 0.7 separate 102.5 + s, joint 110 + s + (0, 0.75, -0.25)
    row = claim_row(write_study_report(seeded_config({"5": [dict(item, accuracy_level=0.7)]}), records,
                                       tmp_path).read_text(), 5)
    assert "103.500 vs 111.167" in row
    for rec in records:
        rec.pop("guidance_sweep_joint", None)
    row = claim_row(write_study_report(seeded_config({"5": [item]}), records, tmp_path).read_text(), 5)
    assert "| not tested at this scale |" in row and "sampling.guidance_sweep_joint" in row


def test_one_training_seed_per_side_is_labelled_and_never_equivalent():
    from ldm.seed_groups import compare

    a = record("a", "t", 100.0, 0.3)
    b = record("b", "t", 100.2, 0.3)  # 0.2 ± 0.49: well inside ±2 % of 100, but on sampling noise only
    c = compare(a, b, "fd_evaluator")
    assert c["verdict"] == "inconclusive" and "equivalence needs ≥ 2 training seeds" in c["reason"]
    assert c["basis"] == "1 training seed: sampling noise only"
    far = compare(a, record("b", "t", 110.0, 0.3), "fd_evaluator")
    assert far["label"] == "supported (1 training seed: sampling noise only)"


def test_groups_reject_two_records_of_one_seed():
    from ldm.seed_groups import group_records

    recs = seeded_records()
    assert [len(g) for g in group_records(recs).values()] == [3] * 5
    with pytest.raises(ValueError, match="two metrics records of one training seed"):
        group_records(recs + [dict(recs[0], run_id="dup")])
    old = record("a", "t", 1.0, 0.0)  # no train_seed / run_group: seed 0, its own group
    assert list(group_records([old])) == ["a/t"]


def test_report_tables_aggregate_per_run_group_and_keep_per_seed_rows(tmp_path):
    from scipy import stats

    from ldm.stages.report import plot_curves, runs_per_seed_table, runs_table, transfer_table

    config = validate(yaml.safe_load((REPO / "config" / "default.yaml").read_text()))
    transfer, scratch = [101.0, 99.0, 104.0], [110.0, 103.0, 111.0]
    records = [seeded("dit", "transfer", s, fd) for s, fd in enumerate(transfer)]
    records += [seeded("dit", "scratch", s, fd) for s, fd in enumerate(scratch)]
    runs = runs_table(records)
    assert list(runs["run"]) == ["dit.synthetic.transfer.64", "dit.synthetic.scratch.64"]
    assert runs["fd_evaluator"][0] == pytest.approx(np.mean(transfer))
    assert runs["fd_evaluator_std"][0] == pytest.approx(np.std(transfer, ddof=1))
    assert list(runs["train_seeds"]) == [3, 3] and runs["std_over"][0] == "training seeds"
    per_seed = runs_per_seed_table(records)
    assert len(per_seed) == 6 and list(per_seed["train_seed"]) == [0, 1, 2, 0, 1, 2]
    table = transfer_table(config, records)
    assert len(table) == 1 and table["fd_evaluator delta"][0] == pytest.approx(np.mean(transfer) - np.mean(scratch), abs=1e-4)
    ci = stats.ttest_rel(transfer, scratch).confidence_interval()
    assert table["fd_evaluator 95% CI"][0] == f"[{ci.low:+.4f}, {ci.high:+.4f}]"
    assert table["fd_evaluator verdict"][0] == "supported"
    assert table["fd_evaluator (transfer)"][0] == f"{np.mean(transfer):.3f} ± {np.std(transfer, ddof=1):.3f} (n=3)"
    # old records (one seed, no train_seed) keep their single row and sampling-seed std
    old = runs_table([record("dit", "transfer", 120, 2) | {"resolution": 64, "num_samples": 8, "chance_accuracy": 0.25}])
    assert list(old["run"]) == ["dit.synthetic.transfer.64"] and old["fd_evaluator_std"][0] == 2
    assert old["std_over"][0] == "sampling seeds"
    # the curve figure is byte-stable
    plot_curves(records, tmp_path / "a.png")
    plot_curves(records, tmp_path / "b.png")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
