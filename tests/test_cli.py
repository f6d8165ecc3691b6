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


def test_threads_bound_the_blas_pools_of_numpy_and_scipy_too():
    """`--threads n` reaches the BLAS of numpy and of scipy (a library of its own, loaded later): the FIDs' float64
    linear algebra changes in its last bits with their thread count, so by hand and under Snakemake must agree."""
    import json
    import os
    import subprocess
    import sys

    from ldm.cli import THREAD_VARIABLES

    def blas_pools(call: str) -> list[int]:
        probe = (f"from ldm.cli import _threads; {call}; import numpy, scipy.linalg, json; "
                 "from threadpoolctl import threadpool_info; "
                 "print(json.dumps([(i['internal_api'], i['num_threads']) for i in threadpool_info()]))")
        env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
        pools = json.loads(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                          check=True).stdout)
        return [n for api, n in pools if api in ("openblas", "mkl")]

    bounded = blas_pools("_threads(1)")
    assert len(bounded) >= 2 and set(bounded) == {1}  # numpy's and scipy's own OpenBLAS
    if (os.cpu_count() or 1) > 1:  # the control: left alone, they take every core
        assert max(blas_pools("pass")) > 1


def test_stage_modules_leave_the_heavy_libraries_to_the_jobs_that_use_them():
    """clean-fid (torchvision, torch._dynamo), diffusers and DVCLive cost 1-7 CPU-s of import each, paid per job:
    importing a stage must not load them; the code that uses them imports them (Inception FIDs, the VAE, trackers)."""
    import json
    import subprocess
    import sys

    probe = ("import sys, json, ldm.stages.train, ldm.stages.sample, ldm.stages.evaluate, ldm.stages.reference_stats; "
             "print(json.dumps(sorted(m for m in ('cleanfid', 'torchvision', 'diffusers', 'dvclive') if m in sys.modules)))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert loaded == []
