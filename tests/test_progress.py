"""Progress lines reach a rule's log file (stderr not a terminal): one per interval and one at the end."""
import logging

from ldm.progress import progress, progress_line


def test_off_a_terminal_progress_logs_lines_and_passes_items_through(caplog):
    with caplog.at_level(logging.INFO, logger="ldm.progress"):
        out = list(progress(range(5), "train-vae", unit="step", every=0.0))
    assert out == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6 and lines[-1].endswith(", done")
    assert lines[0].startswith("train-vae: 1/5 step (20%), ") and lines[-1].startswith("train-vae: 5/5 step (100%), ")


def test_a_long_interval_logs_only_the_end_and_an_unsized_iterable_counts_without_total(caplog):
    with caplog.at_level(logging.INFO, logger="ldm.progress"):
        assert sum(progress(iter([1, 2, 3]), "prepare 64px", unit="img", every=3600)) == 6
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["prepare 64px: 3 img"]


def test_the_line_says_count_share_rate_and_time():
    assert progress_line("encode r64", 1200, 5000, "img", 34.2) == "encode r64: 1200/5000 img (24%), 35.1 img/s, 34 s"
