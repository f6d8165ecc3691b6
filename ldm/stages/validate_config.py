"""`ldm validate-config`: check a scenario or study config against the schema and list its runs."""
from __future__ import annotations

from pathlib import Path

import yaml

from ..config import load_config, study_scenarios
from ..errors import ConfigError
from ..spec import expand_runs


def run(args) -> None:
    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = yaml.safe_load(path.read_text())
    is_study = isinstance(raw, dict) and "scenarios" in raw  # config/paper.yaml: several scenarios
    scenarios = study_scenarios(raw, source=str(path)) if is_study else {"": load_config(path)}
    for name, config in scenarios.items():
        runs = [r.run_id for r in expand_runs(config)]
        label = f"{args.config}" + (f" scenario {name}" if name else "")
        print(f"{label}: ok ({len(runs)} runs: " + ", ".join(runs) + ")")
