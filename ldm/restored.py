"""What `ldm artifacts restore` put back after a `dvc pull`, read by the workflow at DAG-build time.

Snakemake rebuilds any missing file that a job of the DAG consumes, and a pull brings no prepared data or latents.
A job whose output was restored, and whose rule hash is still the one it was made with, therefore needs none of
its inputs that are not on disk (`Restored.inputs`, used by `unless_restored` in workflow/scenario.smk). Light: no
torch, since the Snakefile imports it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import validate
from .errors import ConfigError
from .provenance import atomic_write_json
from .spec import Scenario


@dataclass(frozen=True)
class Restored:
    """What `restore` put back, and the scenario it was made with (read by the workflow at DAG-build time)."""

    scenario: Scenario
    files: frozenset[str]

    @classmethod
    def of(cls, layout) -> "Restored | None":
        path = layout.restored_record
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
            return cls(Scenario(validate(record["config"], source=str(path))), frozenset(record["files"]))
        except (ValueError, KeyError, TypeError) as exc:  # ConfigError is a ValueError
            raise ConfigError(f"{path}: unreadable record of `ldm artifacts restore` ({exc}); delete it, or restore "
                              "again") from None

    @staticmethod
    def write(layout, config_as_written: dict, files) -> None:
        """The config as written, not as validated: read back by later code, it gets that code's defaults."""
        atomic_write_json(layout.restored_record, {"config": config_as_written, "files": sorted(files)})

    def inputs(self, output: str, unchanged: bool, wanted):
        """A job's inputs, less those not on disk when its output was restored and its rule hash is `unchanged`."""
        if output not in self.files or not unchanged:
            return wanted
        if isinstance(wanted, dict):
            return {k: v for k, v in ((k, self.inputs(output, unchanged, v)) for k, v in wanted.items()) if v}
        if isinstance(wanted, (list, tuple)):
            return [f for f in wanted if Path(str(f)).exists()]
        return wanted if Path(str(wanted)).exists() else []
