"""`ldm validate-config`: check a scenario or study config and list its runs, before anything is computed:
the schema and cross-field rules (`ldm.config`), then every run's model built on the meta device
(`ldm.preflight`: sizes, options, patch grid)."""
from __future__ import annotations

from ..config import read_yaml, study_scenarios, validate
from ..preflight import check_models
from ..spec import Scenario


def run(args) -> None:
    raw = read_yaml(args.config)
    is_study = "scenarios" in raw  # config/paper.yaml: several scenarios
    scenarios = study_scenarios(raw, source=str(args.config)) if is_study else {"": validate(raw, str(args.config))}
    for name, config in scenarios.items():
        scenario = Scenario(config)
        check_models(scenario)
        label = f"{args.config}" + (f" scenario {name}" if name else "")
        print(f"{label}: ok ({len(scenario.runs)} runs: " + ", ".join(scenario.runs) + ")")
