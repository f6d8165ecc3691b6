#!/usr/bin/env bash
# Optional, not part of CI (~4 min): how the signals SLURM sends before a time limit or on preemption reach
# a training process that runs under the SLURM executor plugin (sbatch -> snakemake jobstep -> srun ->
# snakemake -> bash -> trainer). Needs the cluster from start.sh. `scancel` sends the same signals that
# `--signal=...@T` would send at T seconds before the limit; `scontrol requeue` stands for preemption with
# requeue. Prints, per case: what the trainer saw, the job's final state, and whether Snakemake succeeded.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
WORK=${LDM_SLURM_SIGNAL_DIR:-$REPO/work/slurm-signal-check}

case_run() {  # case_run LABEL COMMAND... (the job id is appended to COMMAND)
    local label=$1; shift
    rm -rf "$WORK"; mkdir -p "$WORK"
    "$PY" -m snakemake --snakefile "$HERE/signal-check/Snakefile" --directory "$WORK" \
        --profile "$REPO/profiles/slurm-ci" --cores 1 >"$WORK/snakemake.log" 2>&1 &
    local smk=$! job=""
    for _ in $(seq 120); do grep -q '^start' "$WORK/out.txt.events" 2>/dev/null && break; sleep 0.5; done
    job=$(sed -nE 's/.*submitted with SLURM jobid ([0-9]+) .*/\1/p' "$WORK/snakemake.log" | head -1)
    [ -n "$job" ] || { echo "$label: no job started"; kill "$smk"; return 1; }
    "$@" "$job"
    wait "$smk"; local rc=$?
    local state; state=$(sacct --completion -j "$job" -n -P -o State,ExitCode | tail -1)
    echo "$label | trainer: $(paste -sd';' "$WORK/out.txt.events") | sacct: $state | snakemake rc=$rc"
}

case_run "--signal=TERM@T    (scancel -s TERM)   " scancel -s TERM
case_run "--signal=B:USR1@T  (scancel -b -s USR1)" scancel -b -s USR1
case_run "--signal=USR1@T    (scancel -s USR1)   " scancel -s USR1
case_run "preempt + requeue  (scontrol requeue)  " scontrol requeue
