"""Progress of a long loop where a person or a rule's log file can see it.

tqdm draws a bar on a terminal. Snakemake sends each job's stderr to a log file, where a bar is either silent
(`disable=None`) or a wall of carriage returns, so a job of minutes showed nothing until it ended. `progress` keeps
the bar on a terminal and elsewhere writes one line through the package logger every `every` seconds and one at
the end: `tail -f` on a rule's log shows how far the job is and how fast it goes.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")
log = logging.getLogger(__name__)


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             every: float = 30.0) -> Iterator[T]:
    """`items`, unchanged, with a bar on a terminal or a log line every `every` seconds (and at the end)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if sys.stderr.isatty():  # `ldm -q` silences the bar as it does the lines
        yield from tqdm(items, desc=desc, total=total, unit=unit, disable=not log.isEnabledFor(logging.INFO))
        return
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every:
            last = now
            log.info(progress_line(desc, done, total, unit, now - start))
    log.info(progress_line(desc, done, total, unit, time.monotonic() - start) + ", done")


def progress_line(desc: str, done: int, total: int | None, unit: str, seconds: float) -> str:
    """`prepare 64px: 1200/5000 img (24%), 35.1 img/s, 34 s`."""
    count = f"{done}/{total} {unit} ({100 * done / total:.0f}%)" if total else f"{done} {unit}"
    rate = f"{done / seconds:.1f} {unit}/s" if seconds > 0 else "-"
    return f"{desc}: {count}, {rate}, {seconds:.0f} s"
