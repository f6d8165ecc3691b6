#!/usr/bin/env bash
# Run the smoke DAG (config/smoke.yaml) through Snakemake's SLURM executor on the cluster that
# .ci/slurm/start.sh started, then prove that it really went through SLURM:
#   - every job Snakemake did not run locally was submitted with sbatch (the plugin logs its SLURM job id),
#   - SLURM's own job-completion records (`sacct --completion`) list each of those ids COMPLETED, exit 0:0,
#   - the smoke outputs exist (every run's checkpoint and metrics, the summary), and a dry rerun has nothing
#     left to do.
# It runs in its own directory (--directory), so its .snakemake lock and outputs never meet another
# checkout user's `work/smoke` run. The command is the README's, `snakemake --profile slurm` from the repository
# root, with the test cluster's differences layered on top (--workflow-profile profiles/slurm-ci).
# Writes "$RUN_DIR/result.env" (jobs=, snakemake_s=) for ci-step.sh.
#
# Env: LDM_SLURM_SMOKE_DIR (default <repo>/work/slurm-smoke; wiped first), PYTHON (default <repo>/.venv),
#      CORES (2).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RUN_DIR=${LDM_SLURM_SMOKE_DIR:-$REPO/work/slurm-smoke}
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
CORES=${CORES:-2}
log() { echo "[slurm-smoke] $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

node_state=$(sinfo -h -o '%T' 2>/dev/null | head -1 || true)
case "$node_state" in idle|mixed|allocated) ;; *) die "no usable SLURM node (sinfo: '${node_state}'); run .ci/slurm/start.sh first" ;; esac

# The SLURM jobs run `{sys.executable} -m ldm.cli` and `python -m snakemake` from this interpreter: it must
# be the one where the package is installed, at a path slurmd's jobs can see (same machine here).
"$PY" -c 'import ldm, snakemake_executor_plugin_slurm' || die "$PY lacks ldm or the SLURM plugin"

rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
# what a user exports for the slurm profile (no accounting here: slurm-ci passes --slurm-no-account)
export LDM_SLURM_ACCOUNT=${LDM_SLURM_ACCOUNT:-none} LDM_SLURM_PARTITION=${LDM_SLURM_PARTITION:-ci}
cd "$REPO"  # Snakemake finds the profile named `slurm` in the working directory
smk_log="$RUN_DIR/snakemake.log"
t0=$(date +%s.%N)
set +e
"$PY" -m snakemake --snakefile "$REPO/Snakefile" --directory "$RUN_DIR" --profile slurm \
    --workflow-profile "$REPO/profiles/slurm-ci" --configfile "$REPO/config/smoke.yaml" --cores "$CORES" >"$smk_log" 2>&1
rc=$?
set -e
t1=$(date +%s.%N)
wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')
if [ $rc -ne 0 ]; then
    tail -60 "$smk_log" >&2
    die "snakemake exited $rc after ${wall} s (full log: $smk_log)"
fi
log "snakemake finished in ${wall} s"

# --- 1. what Snakemake submitted -------------------------------------------------------------------------
# Planned jobs: the "total" row of Snakemake's job-stats table; local ones print "localrule NAME:".
total=$(awk '$1 == "total" && $2 ~ /^[0-9]+$/ { print $2; exit }' "$smk_log")
local_jobs=$(grep -c '^localrule ' "$smk_log" || true)
expected=$((total - local_jobs))
mapfile -t ids < <(sed -nE 's/.*has been submitted with SLURM jobid ([0-9]+) .*/\1/p' "$smk_log" | sort -un)
[ "$expected" -gt 0 ] || die "Snakemake planned no SLURM jobs (total=$total local=$local_jobs)"
[ "${#ids[@]}" -eq "$expected" ] || die "${#ids[@]} jobs submitted via sbatch, expected $expected"

# --- 2. what SLURM says ran ----------------------------------------------------------------------------
# jobcomp/filetxt records are written when a job ends; `sacct --completion` reads them (no slurmdbd).
idlist=$(IFS=,; echo "${ids[*]}")
acct=$(sacct --completion -j "$idlist" -n -P -o JobID,JobName,Partition,NodeList,State,ExitCode)
printf '%s\n' "$acct" | sed 's/^/[slurm-smoke] sacct: /' >&2
completed=$(printf '%s\n' "$acct" | awk -F'|' '$5 == "COMPLETED" && $6 == "0:0"' | cut -d'|' -f1 | sort -un | wc -l)
[ "$completed" -eq "$expected" ] || die "sacct lists $completed of $expected jobs COMPLETED with exit 0:0"
# The plugin names every job of one workflow run with the run's uuid: all ids belong to this run.
names=$(printf '%s\n' "$acct" | cut -d'|' -f2 | sort -u | wc -l)
[ "$names" -eq 1 ] || die "the sacct records carry $names job names, expected one (this run's uuid)"

# --- 3. the smoke outputs ----------------------------------------------------------------------------------
W="$RUN_DIR/$("$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["workdir"])' "$REPO/config/smoke.yaml")"
R="$RUN_DIR/$("$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["results"])' "$REPO/config/smoke.yaml")"
[ -s "$R/summary.json" ] || die "missing $R/summary.json"
mapfile -t runs < <("$PY" -c 'import json, sys; print("\n".join(json.load(open(sys.argv[1]))))' "$R/summary.json")
[ "${#runs[@]}" -ge 1 ] || die "summary.json lists no runs"
for run in "${runs[@]}"; do
    [ -s "$W/runs/$run/final.safetensors" ] || die "missing checkpoint of $run"
    [ -s "$R/metrics/$run.json" ] || die "missing metrics of $run"
done
[ -s "$R/tables/runs.md" ] || die "missing $R/tables/runs.md"

# A second dry run must find nothing to do (outputs complete, metadata consistent).
dry=$("$PY" -m snakemake --snakefile "$REPO/Snakefile" --directory "$RUN_DIR" --profile slurm \
      --workflow-profile "$REPO/profiles/slurm-ci" --configfile "$REPO/config/smoke.yaml" --cores "$CORES" -n 2>&1) || { echo "$dry" >&2; die "dry rerun failed"; }
grep -q 'Nothing to be done' <<<"$dry" || { echo "$dry" | tail -30 >&2; die "a rerun would still run jobs"; }

printf 'jobs=%s\nsnakemake_s=%s\nruns=%s\n' "$expected" "$wall" "${#runs[@]}" >"$RUN_DIR/result.env"
log "OK: $expected jobs submitted with sbatch and COMPLETED per sacct (job ids ${ids[0]}-${ids[-1]}), ${#runs[@]} runs' checkpoints + metrics present, snakemake ${wall} s"
