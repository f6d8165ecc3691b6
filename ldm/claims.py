"""The paper's claims (PAPER.md) decided on a study's records: each claim's items judged
(`ldm.claim_items`: metric, compute, trade-off, ranking; statistics in `ldm.verdicts`), then combined into
one verdict per claim with the evidence text REPORT.md prints.

How items combine, fixed before the runs: a claim's items fall into *parts* (an item's `part`, default one
part; claim 7 asserts two things, so it has two). In each part the first item that can be tested is its
*primary* item and decides the part; the others are *secondary*: they are reported, and one that is decided
against the primary (supported vs contradicted) makes the part "inconclusive (items disagree)", but an
undecided secondary does not hold the part back. Parts combine with `ldm.verdicts.combine` ("and/or"
claims in `ANY_OF`: one part suffices); parts that are all decided but differ give "mixed", which names
each part's verdict and counts as decided.
"""
from __future__ import annotations

from . import verdicts as V
from .claim_items import compute_item, metric_item, ranking_item, tradeoff_item
from .efficiency import efficiency_costs
from .seed_groups import group_records, group_stat, instrument_mismatch, markdown_table, train_seed

#: PAPER.md, "Claims a small-scale run can test" (abbreviated).
CLAIMS = {
    "1": "Changing only the size condition changes semantics under additive adaLN, much less under disentangled conditioning",
    "2": "Disentangled conditioning improves FID over additive adaLN at equal compute",
    "3": "Time-scheduled control beats unscheduled control",
    "4": "Noisy replicate padding beats zero padding (FID and/or text alignment)",
    "5": "Separate semantic/control guidance gives a better trade-off than one joint scale",
    "6": "Low-res pre-training + high-res fine-tuning reaches a given high-res FID with less compute than high-res from scratch",
    "7": "PE resampling transfers better than extrapolation; noise-schedule shift helps at high res",
    "8": "Architecture ranking under one protocol can differ from the ranking of their own papers",
}
#: claims whose parts are alternatives ("and/or"): one supported part suffices (`ldm.verdicts.combine`)
ANY_OF = {"4"}


def claim_items(number: str, study: dict) -> list[tuple[dict, bool]]:
    """The claim's items, plus for claim 6 a compute item derived from study.efficiency when the config
    names none (True marks it derived)."""
    items = [(item, False) for item in study.get("claims", {}).get(number, [])]
    eff = study.get("efficiency")
    if (number == "6" and items and eff and not any(i.get("kind") == "compute" for i, _ in items)
            and {items[0][0]["baseline"], items[0][0]["variant"]} <= set(eff["runs"])):
        first = items[0][0]
        items.append(({"kind": "compute", "baseline": first["baseline"], "variant": first["variant"],
                       "metric": eff["metric"]}, True))
    return items


DECIDED = ("supported", "contradicted", "equivalent")


def judge_item(item: dict, derived: bool, study: dict, by_ref: dict, efficiency, by_run,
               config) -> tuple[V.Verdict, str]:
    margin = float(study.get("equivalence_margin", V.DEFAULT_MARGIN))
    kind = item.get("kind", "metric")
    if kind == "compute":
        return compute_item(item, study, by_ref, by_run, config, efficiency, derived)
    if kind == "tradeoff":
        return tradeoff_item(item, by_ref, margin)
    return metric_item(item, by_ref, margin, config)


def decide_part(results: list[V.Verdict]) -> tuple[str, int | None]:
    """(the part's verdict, index of its primary item): the first tested item decides; a secondary decided
    the other way (supported vs contradicted) makes it "inconclusive (items disagree)"."""
    tested = [i for i, r in enumerate(results) if r.verdict != "not tested"]
    if not tested:
        return "not tested", None
    primary = results[tested[0]].verdict
    opposite = {"supported": "contradicted", "contradicted": "supported"}.get(primary)
    if opposite and any(results[i].verdict == opposite for i in tested[1:]):
        return "inconclusive (items disagree)", tested[0]
    return primary, tested[0]


def combine_parts(parts: dict[str, str], mode: str) -> tuple[str, str]:
    """One claim verdict from its parts' verdicts (module docstring)."""
    if len(parts) == 1:
        (verdict,) = parts.values()
        if verdict.startswith("inconclusive (items disagree)"):
            return verdict, "a secondary item is decided against the primary one"
        return verdict, "decided by its primary item"
    tested = {name: v for name, v in parts.items() if v != "not tested"}
    if len(tested) > 1 and all(v in DECIDED for v in tested.values()) and len(set(tested.values())) > 1:
        if not (mode == "any" and "supported" in tested.values()):
            return ("mixed (" + "; ".join(f"{n}: {v}" for n, v in tested.items()) + ")",
                    "every part decided, not alike")
    plain = [v.split(" (")[0] for v in parts.values()]  # "inconclusive (items disagree)" counts as inconclusive
    verdict, rule = V.combine(plain, mode)
    return verdict, f"parts: {rule.replace('items', 'parts').replace('item', 'part')}"


def evaluate_claim(number: str, study: dict, by_ref: dict, efficiency=None, by_run: dict | None = None,
                   config: dict | None = None) -> tuple[str, list[tuple[V.Verdict, str]], str]:
    """(claim verdict, [(item verdict, evidence text with its role)], the combination rule that fired)."""
    items = claim_items(number, study)
    judged = [judge_item(item, derived, study, by_ref, efficiency, by_run, config) for item, derived in items]
    names = list(dict.fromkeys(item.get("part", "") for item, _ in items))
    part_verdicts, evaluated = {}, []
    for name in names:
        members = [k for k, (item, _) in enumerate(items) if item.get("part", "") == name]
        verdict, primary = decide_part([judged[k][0] for k in members])
        part_verdicts[name or "claim"] = verdict
        for position, k in enumerate(members):
            result, text = judged[k]
            role = ("primary" if position == primary else
                    "secondary" + (", does not decide" if result.verdict not in DECIDED else ""))
            evaluated.append((result, (f"*{name}*, " if name else "") + f"{role}: {text}"))
    verdict, rule = combine_parts(part_verdicts, "any" if number in ANY_OF else "all")
    short = {V.SAMPLING_ONLY: "sampling noise only", V.NO_NOISE: "no noise estimate"}
    deciding = [r for r, _ in judged]
    bases = sorted({short[r.basis] for r in deciding if r.verdict in DECIDED and r.interval is not None
                    and not r.interval.training}
                   | {"cost bounds only" for r in deciding if r.verdict in DECIDED and "1 training seed" in
                      r.extra.get("basis", "")})
    if bases and verdict != "not tested":  # every basis that is not training seeds rests on one training seed
        verdict = f"{verdict}; basis: 1 training seed: {', '.join(bases)}"
    return verdict, evaluated, rule


def is_decided(verdict: str) -> bool:
    return verdict.split(";")[0].split(" (")[0] in (*DECIDED, "mixed")


def claim_rows(study: dict, by_ref: dict, efficiency=None, by_run: dict | None = None,
               config: dict | None = None) -> list[list[str]]:
    """[number, claim, verdict, evidence] per claim of CLAIMS."""
    margin = float(study.get("equivalence_margin", V.DEFAULT_MARGIN))
    rows = []
    for number, text in CLAIMS.items():
        if number == "8" and study.get("architectures"):
            result, evidence = ranking_item(study, by_ref, margin, config)
            ours = " < ".join(r for r, _ in arch_ranking(study, by_ref) or [])
            verdict = "not tested at this scale" if result.verdict == "not tested" else result.verdict
            rows.append([number, text, verdict, f"{evidence}. fd_evaluator ranking here (best first; runs of other "
                                                f"instruments left out): {ours or 'n/a'}"])
        elif not study.get("claims", {}).get(number):
            rows.append([number, text, "not tested at this scale", "no run pair in this grid"])
        else:
            verdict, evaluated, rule = evaluate_claim(number, study, by_ref, efficiency, by_run, config)
            if verdict == "not tested":
                verdict = "not tested at this scale"
            evidence = "; ".join(f"({i + 1}) {text_}" for i, (_, text_) in enumerate(evaluated))
            rows.append([number, text, verdict, f"{evidence}. Claim: {rule}"])
    return rows


def claims_section(study: dict, by_ref: dict, efficiency: tuple[float | None, dict] | None = None,
                   by_run: dict | None = None, config: dict | None = None) -> str:
    """One verdict per claim with its evidence (each item with its role, the baseline's advantage, its
    interval, basis and verdict), the combination rule, and a line counting the decided claims."""
    rows = claim_rows(study, by_ref, efficiency, by_run, config)
    decided = [row[0] for row in rows if is_decided(row[2])]
    count = (f"**{len(decided)} of {len(CLAIMS)} claims decided** (supported, contradicted, equivalent, or mixed "
             f"with every part decided): {', '.join(decided) or 'none'}.")
    return count + "\n\n" + markdown_table(["#", "claim (PAPER.md)", "verdict here", "evidence"], rows)


def draws_section(study: dict, records: list[dict], config: dict | None = None) -> str:
    """Each claim decided on each disjoint draw of training seeds alone (`study.draws`), beside all seeds: do
    the verdicts replicate? A verdict that changes between draws where both test it is counted."""
    draws = [sorted(d) for d in study["draws"]]
    columns = []
    for seeds in [*draws, None]:
        recs = [r for r in records if seeds is None or train_seed(r) in seeds]
        by_ref, by_run = group_records(recs), {r["run_id"]: r for r in recs}
        efficiency = efficiency_costs(study["efficiency"], by_ref, by_run, config) if "efficiency" in study else None
        columns.append({row[0]: row[2].split(";")[0] for row in claim_rows(study, by_ref, efficiency, by_run, config)})
    rows, reversed_, one_only, both = [], [], [], 0
    for number in CLAIMS:
        per_draw = [c[number] for c in columns[:-1]]
        tested = [v for v in per_draw if not v.startswith("not tested")]
        if len(tested) < 2:
            change = "n/a (tested in one draw)"
        else:
            both += 1
            decided = {v for v in tested if is_decided(v)}
            if len(decided) > 1:
                change = "reversed"
                reversed_.append(number)
            elif decided and len(set(tested)) > 1:
                change = "decided in one draw only"
                one_only.append(number)
            else:
                change = "same"
        rows.append([number, *per_draw, columns[-1][number], change])
    names = [f"training seeds {', '.join(map(str, d))}" for d in draws]
    head = (f"The claims decided again on each draw of training seeds alone. Of {both} claims tested in every draw, "
            f"**{len(reversed_)} reversed** (decided in two draws, differently: {', '.join(reversed_) or 'none'}) and "
            f"{len(one_only)} decided in one draw only ({', '.join(one_only) or 'none'}: a draw of fewer seeds has "
            "less power, not a contrary result). The last verdict column pools every seed (the table above).\n\n")
    return head + markdown_table(["#", *names, "all seeds", "between draws"], rows)


def arch_ranking(study: dict, by_ref: dict) -> list[tuple[str, float]] | None:
    spec = study.get("architectures")
    if not spec:
        return None
    stage = spec["stages"][-1]
    scored = [(r, group_stat(by_ref.get(f"{r}/{stage}"), "fd_evaluator")) for r in spec["recipes"]]
    scored = [(r, s[0]) for r, s in scored if s is not None]
    # only runs measured with the first one's instruments (autoencoder, evaluator) rank together
    first = by_ref.get(f"{scored[0][0]}/{stage}") if scored else None
    scored = [(r, v) for r, v in scored
              if not instrument_mismatch([first, by_ref.get(f"{r}/{stage}")], "fd_evaluator")]
    return sorted(scored, key=lambda x: x[1]) or None


def method_paragraph(study: dict, seeds: list[int], several: bool) -> str:
    """REPORT.md's statement of the verdict method (interval, level, margin, pairing, what a seed is)."""
    margin = float(study.get("equivalence_margin", V.DEFAULT_MARGIN))
    trained = (f"Runs here are trained with training seeds {', '.join(map(str, seeds))}." if several else
               "Every run here is trained once (one training seed), so every verdict rests on sampling noise only "
               "and says so.")
    return (
        "**Method.** A *training seed* is one training run of a grid run (its own initial weights, data order "
        "and training noise; runs of the same seed share their random numbers); a *sampling seed* is one draw "
        f"of sampling noise from one trained model. {trained} A run's value at one training seed is its mean "
        "over its sampling seeds. Each claim item compares a baseline (the run the claim says is better) with a "
        "variant: Δ = variant − baseline with a two-sided 95% interval, a paired t interval on the per-seed "
        "differences (df = n − 1) when both runs have the same training seeds, a Welch t interval otherwise; "
        "with one training seed on a side, Δ ± 2 standard errors over the sampling seeds (marked † in the "
        "tables, \"1 training seed: sampling noise only\" in the verdicts: it understates run-to-run "
        "variation), and no interval where a side has a single sampling seed as well. No bootstrap (with a "
        "handful of seeds it is narrower than the t interval). The evidence shows the baseline's *advantage* "
        "(Δ signed so that > 0 reads as the claim). *supported*: the interval excludes 0 in the claimed "
        "direction; *contradicted*: it excludes 0 the other way; *equivalent*: the whole interval lies inside "
        "±margin, the margin fixed in the config before the runs (`study.equivalence_margin` = "
        f"{margin:g} × |baseline mean| unless an item sets its own `margin`); equivalence is checked first, so a "
        "difference that excludes 0 but lies inside the margin is *equivalent*, and it is never declared on "
        "sampling noise alone; anything else is *inconclusive*, with the training seeds per run that would "
        "resolve it at the observed variance and difference. A claim's items fall into parts (claim 7 asserts two "
        "things; the others have one). In each part the first item that can be tested is *primary* and decides "
        "the part; the others are *secondary* and reported: one decided against the primary makes the part "
        "\"inconclusive (items disagree)\", an undecided one does not decide. Primary items are the low-variance "
        "ones where the claim allows (`val_loss`, see the variance components below); parts combine as all must "
        "hold (claim 4, \"and/or\": one suffices), and parts all decided but different give *mixed*. `val_loss` "
        "is refused (not tested) between runs of different objectives, schedules or training time "
        "distributions (a schedule shift): its uniform time grid would favour the unshifted run. Nothing compares "
        "runs measured with different instruments: another autoencoder (or an unrecorded one: every metric) or "
        "other evaluator weights (evaluator metrics) makes an item *not tested*. Claim 6's "
        "compute item (from `study.efficiency` unless the config names one): training FLOPs, pre-training "
        "included, to reach the efficiency level; each seed's cost is known only between the snapshot before "
        "the level and the one at it, so its interval takes the censoring's worst case at each end (never "
        "*equivalent*); not tested where the records carry no FLOPs. Claim 8 tests each pair of the own "
        "papers' order (mdt < dit < unet): supported when a pair is reversed or tied. Claim 5's trade-off item "
        "summarises each guidance sweep as the best fd_evaluator at "
        "cond_accuracy ≥ a level (linear interpolation along the sweep) and compares the two sweeps like a "
        "metric; a sweep is scored on one sampling seed, so it needs training seeds for an interval.")
