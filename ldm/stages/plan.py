"""`ldm plan CONFIG`: what a scenario or study costs before it runs (`ldm.plan`): FLOPs and accelerator hours
per rule and in total, the three costliest jobs, and the jobs that cannot finish within their runtime."""
from __future__ import annotations

from tabulate import tabulate

from ..config import read_yaml, study_scenarios, validate
from ..errors import UserError
from ..plan import DEFAULT_MFU, DEFAULT_PEAK_FLOPS, measured_mfu, plan_jobs, profile_attempts, summarise
from ..spec import Scenario


def _images(args, name: str, config: dict) -> int | None:
    """The dataset size of a scenario: `--images NAME=N` (or `--images N` for every scenario), else the
    synthetic generator's count; None (encode not costed) for real data without one."""
    for item in args.images or []:
        key, _, value = item.rpartition("=")
        if key in ("", name):
            try:
                return int(value)
            except ValueError:
                raise UserError(f"--images {item!r}: expected N or SCENARIO=N") from None
    if config["dataset"]["source"] == "synthetic":
        return int(config["dataset"]["synthetic"]["num_images"])
    return None


def run(args) -> None:
    raw = read_yaml(args.config)
    scenarios = study_scenarios(raw, source=str(args.config)) if "scenarios" in raw else {"": validate(raw, args.config)}
    measured = measured_mfu()
    mfu, source = (args.mfu, "--mfu") if args.mfu is not None else measured or (DEFAULT_MFU, "assumed (no GPU measurement)")
    peak = args.peak_tflops * 1e12
    attempts = args.attempts if args.attempts is not None else profile_attempts()
    print(f"MFU {mfu:.3g}: {source}; a resumable job (train, sample) may take {attempts} allocation(s) of its runtime")
    grand = 0.0
    for name, config in scenarios.items():
        images = _images(args, name or config["name"], config)
        summary = summarise(plan_jobs(Scenario(config), images), peak, mfu, attempts)
        label = f"{args.config}" + (f" scenario {name}" if name else "")
        print(f"{label}: {summary['total']['jobs']} costed jobs, {summary['total']['flops']:.3g} FLOPs, "
              f"{summary['total']['hours']:,.3g} accelerator-hours at {args.peak_tflops:g} TFLOP/s peak x MFU {mfu:g}"
              + ("" if images else " (encode not costed: give --images)"))
        rows = [[rule, r["jobs"], f"{r['flops']:.3g}", f"{r['hours']:,.3g}",
                 f"{100 * r['flops'] / summary['total']['flops']:.1f}%"] for rule, r in summary["rules"].items()]
        print(tabulate(rows, headers=["rule", "jobs", "FLOPs", "accelerator-hours", "share"]))
        print("costliest jobs: " + "; ".join(f"{j.rule} {j.name} {j.hours(peak, mfu):,.3g} h"
                                             for j in summary["costliest"]))
        for j in summary["resumed"]:
            print(f"RESUMES: {j.rule} {j.name} needs {j.hours(peak, mfu):,.1f} accelerator-hours = "
                  f"{j.allocations(peak, mfu)} allocations of {max(j.gpus, 1)} x {j.runtime_h:g} h (of {attempts})")
        for j in summary["too_long"]:
            within = f" in {attempts if j.resumable else 1} allocation(s)"
            print(f"DOES NOT FIT: {j.rule} {j.name} needs {j.hours(peak, mfu):,.1f} accelerator-hours, its resources "
                  f"give {max(j.gpus, 1)} x {j.runtime_h:g} h{within}")
        grand += summary["total"]["hours"]
    if len(scenarios) > 1:
        print(f"total: {grand:,.3g} accelerator-hours")
