#!/usr/bin/env bash
# CI step for the SLURM integration test: start a two-node SLURM on this machine (each node a network namespace:
# nodes.sh), run the smoke DAG through Snakemake's SLURM executor, then a training stage on `nodes: 2`
# (run-two-node.sh), and always stop what this step started (trap), also on failure or Ctrl-C.
# Prints one summary line last:  "SLURM integration: OK, N jobs via sbatch, ..., total T s".
#
# Skips (exit 0, with a message) only when SLURM cannot be installed here: no apt-get (or no root/sudo for
# it) AND SLURM is not installed. Every other problem fails the step.
# Env: see start.sh / run-smoke.sh (LDM_SLURM_DIR, LDM_SLURM_SMOKE_DIR, PYTHON, CORES).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
D=${LDM_SLURM_DIR:-/var/tmp/ldm-slurm-ci}
T0=$(date +%s)
say() { echo "[slurm-ci] $*" >&2; }

# One integration test at a time per machine: the daemons' ports (6817/6818) and /etc/slurm are global.
mkdir -p "$(dirname "$D")"
exec 9>"$D.lock"
flock -w 900 9 || { say "FAIL: another SLURM integration test held $D.lock for 15 min"; exit 1; }

# shellcheck disable=SC2154  # jobs, runs, snakemake_s: sourced from result.env
stop() {
    rc=$?
    "$HERE/stop.sh" || { say "stop.sh failed"; [ $rc -ne 0 ] || rc=1; }
    total=$(( $(date +%s) - T0 ))
    if [ $rc -eq 0 ]; then
        # shellcheck disable=SC1090  # result.env (jobs=, snakemake_s=, runs=) is written by run-smoke.sh
        . "${LDM_SLURM_SMOKE_DIR:-$HERE/../../work/slurm-smoke}/result.env"
        # shellcheck disable=SC1090  # two_node_s=, sha=, nodelist= from run-two-node.sh
        . "${LDM_SLURM_TWO_NODE_DIR:-$HERE/../../work/slurm-two-node}/result.env"
        echo "SLURM integration: OK, $jobs jobs via sbatch (sacct: all COMPLETED), $runs runs, snakemake ${snakemake_s} s;" \
             "2-node training on $nodelist equals 1 node x 2 ranks (sha256 $sha...), ${two_node_s} s; total ${total} s"
    else
        echo "SLURM integration: FAILED (exit $rc) after ${total} s; daemon logs: $D/log"
    fi
    exit $rc
}

set +e
LDM_SLURM_NODES=${LDM_SLURM_NODES:-2} "$HERE/start.sh"
rc=$?
set -e
if [ $rc -eq 3 ]; then
    echo "SLURM integration: SKIPPED (apt-get unavailable and SLURM not installed)"
    exit 0
fi
trap stop EXIT        # from here on, whatever happens, stop what start.sh started
trap 'exit 130' INT TERM
[ $rc -eq 0 ] || exit $rc
"$HERE/run-smoke.sh"
"$HERE/run-two-node.sh"
