"""Live training curves through the field's trackers, beside `log.jsonl` (the record resume and tests read).

`tracking:` in the config lists them (offline; nothing leaves the machine):
- `dvclive` (default): `runs/<run>/dvclive/`, DVC's own format. While a job trains,
  `dvc plots show work/<scenario>/runs/<run>/dvclive/plots/metrics` (or VS Code's DVC extension) draws its loss,
  grad norm, lr and images/s so far.
- `tensorboard`: `runs/<run>/tensorboard/` (`tensorboard --logdir work/<scenario>/runs`); needs the tensorboard
  package (`pip install -e '.[tracking]'`).
`ldm evaluate` adds every metric of every evaluated snapshot (`log_snapshot_metrics`: `runs/<run>/dvclive-eval/`,
and `eval/` in TensorBoard). A resumed run must not show the steps it lost: TensorBoard purges events past the resume step itself; the DVCLive
folder is rebuilt from `log.jsonl`, which the trainer has already trimmed to the resumed snapshot.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import ConfigError

TRACKERS = ("dvclive", "tensorboard")
#: the `log.jsonl` fields that are curves (the others say how the step was run)
CURVES = ("loss", "grad_norm", "lr", "images_per_s")


class Trackers:
    """The trackers a config names, for one run on its main process; `log(record)` per `log.jsonl` record."""

    def __init__(self, names: list[str], run_dir: Path, log_path: Path, resume_step: int = 0):
        unknown = sorted(set(names) - set(TRACKERS))
        if unknown:
            raise ConfigError(f"tracking: unknown tracker(s) {unknown}; valid: {', '.join(TRACKERS)}")
        self._live = self._board = None
        if "dvclive" in names:
            from dvclive import Live

            folder = run_dir / "dvclive"
            shutil.rmtree(folder, ignore_errors=True)  # rebuilt from the (trimmed) log: no lost steps shown
            self._live = Live(dir=str(folder), save_dvc_exp=False, dvcyaml=None, report=None, monitor_system=False)
            if log_path.is_file():
                for line in log_path.read_text().splitlines():
                    if line.strip():
                        self._write_live(json.loads(line))
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ConfigError("tracking: tensorboard needs the tensorboard package "
                                  "(pip install -e '.[tracking]')") from exc
            self._board = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step or None)

    def _write_live(self, record: dict) -> None:
        self._live.step = int(record["step"])
        for name in CURVES:
            if name in record:
                self._live.log_metric(f"train/{name}", float(record[name]))
        self._live.make_summary()

    def log(self, record: dict) -> None:
        if self._live is not None:
            self._write_live(record)
        if self._board is not None:
            for name in CURVES:
                if name in record:
                    self._board.add_scalar(f"train/{name}", float(record[name]), int(record["step"]))
            self._board.flush()  # a running job is watched: write now, not at exit

    def close(self) -> None:
        if self._live is not None:
            self._live.end()
        if self._board is not None:
            self._board.close()


def log_snapshot_metrics(names: list[str], run_dir: Path, curve: list[dict]) -> None:
    """Every metric of every evaluated snapshot (`ldm evaluate`'s curve) to the same trackers, beside the training
    curves: `runs/<run>/dvclive-eval/` (its own folder: the training one is rebuilt on resume) and the run's
    TensorBoard folder under `eval/`. Rewritten whole on each evaluation, so a re-evaluation leaves no stale point."""
    points = [(int(p["step"]), {k: float(v) for k, v in p.items() if k != "step" and not k.endswith("_std")
                                and k != "num_seeds" and isinstance(v, (int, float))}) for p in curve]
    if "dvclive" in names:
        from dvclive import Live

        folder = run_dir / "dvclive-eval"
        shutil.rmtree(folder, ignore_errors=True)
        with Live(dir=str(folder), save_dvc_exp=False, dvcyaml=None, report=None, monitor_system=False) as live:
            for step, values in points:
                live.step = step
                for name, value in values.items():
                    live.log_metric(f"eval/{name}", value)
                live.make_summary()
    if "tensorboard" in names:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=str(run_dir / "tensorboard")) as board:
            for step, values in points:
                for name, value in values.items():
                    board.add_scalar(f"eval/{name}", value, step)
