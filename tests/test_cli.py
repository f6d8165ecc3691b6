"""The `ldm` command itself: its version, and the package's log lines reaching whatever stderr is current."""
import logging

import pytest

from ldm.cli import main
from ldm.provenance import code_version


def test_version_names_the_package_and_the_code(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"ldm 0.1.0 (code {code_version()})"


def test_package_log_lines_reach_the_current_stderr(capsys):
    main(["recipes", "--arch", "dit", "--json"])  # any command: it configures the package logger once
    capsys.readouterr()
    logging.getLogger("ldm.stages.encode").info("encoded %s (%d rows)", "shard-00000", 4)
    logging.getLogger("ldm.stages.encode").debug("not shown")
    err = capsys.readouterr().err
    assert err.endswith("ldm.stages.encode: encoded shard-00000 (4 rows)\n") and "not shown" not in err


@pytest.mark.parametrize("flag, shown", [("--quiet", {"warning"}), (None, {"info", "warning"}),
                                         ("--verbose", {"debug", "info", "warning"})])
def test_verbose_and_quiet_set_what_the_package_logs(capsys, flag, shown):
    main(([flag] if flag else []) + ["recipes", "--arch", "dit", "--json"])
    capsys.readouterr()
    log = logging.getLogger("ldm.stages.encode")
    for level in ("debug", "info", "warning"):
        getattr(log, level)("line at %s", level)
    err = capsys.readouterr().err
    assert {level for level in ("debug", "info", "warning") if f"line at {level}" in err} == shown
