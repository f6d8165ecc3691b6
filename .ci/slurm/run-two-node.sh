#!/usr/bin/env bash
# Multi-node training through the SLURM profile, for real: the smoke config with its pre-training stage on
# `resources: {nodes: 2}`, run by the README's `snakemake --profile slurm` on the two-node cluster that
# `LDM_SLURM_NODES=2 .ci/slurm/start.sh` made (nodes.sh). The train rule's command is then
# `srun --nodes 2 ... torchrun --nnodes 2 ... --rdzv_endpoint <first node>:29500` (ldm/config.py `launcher`).
# Checks that
#   - SLURM ran that job on both nodes (sacct's NodeList; srun starts one torchrun per node),
#   - its weights equal, byte for byte, those of the same run on one node with 2 processes (torchrun --standalone, as a
#     `gpus: 2` stage launches it).
# Writes "$RUN_DIR/result.env" (two_node_s=, sha=) for ci-step.sh.
#
# Env: LDM_SLURM_TWO_NODE_DIR (default <repo>/work/slurm-two-node; wiped first), PYTHON, CORES (2).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RUN_DIR=${LDM_SLURM_TWO_NODE_DIR:-$REPO/work/slurm-two-node}
PY=${PYTHON:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
CORES=${CORES:-2}
log() { echo "[slurm-two-node] $*" >&2; }
die() { log "FAIL: $*"; exit 1; }

[ "$(sinfo -h -o '%D' -p "${LDM_SLURM_PARTITION:-ci}" 2>/dev/null | head -1)" -ge 2 ] 2>/dev/null \
    || die "the partition has fewer than 2 nodes: run LDM_SLURM_NODES=2 .ci/slurm/start.sh first"

rm -rf "$RUN_DIR"
mkdir -p "$RUN_DIR"
cfg="$RUN_DIR/two-node.yaml"
# writes the config and prints the run and its checkpoint (relative to RUN_DIR)
read -r run checkpoint < <("$PY" - "$REPO/config/smoke.yaml" "$cfg" <<'EOF'
import sys, yaml
config = yaml.safe_load(open(sys.argv[1]))
config["name"] = "two_node"
config["recipes"] = {"dit": config["recipes"]["dit"]}
config["stages"] = {"pretrain": {**config["stages"]["pretrain"], "resources": {"nodes": 2, "cpus": 1}}}
yaml.safe_dump(config, open(sys.argv[2], "w"), sort_keys=False)
run = f"dit.synthetic.pretrain.{config['resolutions']['low']}"
print(run, f"{config['workdir']}/runs/{run}/final.safetensors")
EOF
)
target="$RUN_DIR/$checkpoint"

export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
export LDM_SLURM_ACCOUNT=${LDM_SLURM_ACCOUNT:-none} LDM_SLURM_PARTITION=${LDM_SLURM_PARTITION:-ci}
cd "$REPO"
smk_log="$RUN_DIR/snakemake.log"
t0=$SECONDS
"$PY" -m snakemake --snakefile "$REPO/Snakefile" --directory "$RUN_DIR" --profile slurm \
    --workflow-profile "$REPO/profiles/slurm-ci" --configfile "$cfg" --cores "$CORES" "$checkpoint" >"$smk_log" 2>&1 \
    || { tail -60 "$smk_log" >&2; die "snakemake failed (log: $smk_log)"; }
two_node_s=$((SECONDS - t0))

# --- 1. the train job ran on two nodes, one rank each -----------------------------------------------------
job=$(grep -B30 'has been submitted with SLURM jobid' "$smk_log" | awk '/^rule train:/ {f = 1} f && /submitted with SLURM jobid/ {
      sub(/.*SLURM jobid /, ""); print $1; exit}')
[ -n "$job" ] || die "no train job submitted (log: $smk_log)"
acct=$(sacct --completion -j "$job" -n -P -o JobID,NodeList,State,ExitCode | head -1)
log "train job: $acct"
IFS='|' read -r _ nodelist state exitcode <<<"$acct"
[ "$state" = COMPLETED ] && [ "$exitcode" = 0:0 ] || die "train job $job: $state $exitcode"
[ "$(scontrol show hostnames "$nodelist" | wc -l)" -eq 2 ] || die "train job $job ran on '$nodelist', not 2 nodes"
[ -s "$target" ] || die "missing $target"
mkdir -p "$RUN_DIR/two-node"
mv "$(dirname "$target")" "$RUN_DIR/two-node/$run"

# --- 2. the same run, one node, 2 processes ------------------------------------------------------------------
cd "$RUN_DIR"
"$PY" -m ldm.torchrun --standalone --nproc_per_node 2 -m ldm.cli train --config "$cfg" --run "$run" \
    --threads 1 >"$RUN_DIR/one-node.log" 2>&1 || { tail -30 "$RUN_DIR/one-node.log" >&2; die "the 1-node run failed"; }
sha_two=$(sha256sum <"$RUN_DIR/two-node/$run/final.safetensors" | cut -c1-16)
sha_one=$(sha256sum <"$target" | cut -c1-16)
if [ "$sha_two" != "$sha_one" ]; then
    "$PY" - "$RUN_DIR/two-node/$run/final.safetensors" "$target" <<'EOF' >&2 || true
import sys
from safetensors.torch import load_file
a, b = load_file(sys.argv[1]), load_file(sys.argv[2])
print("max |dw| 2 nodes x 1 vs 1 node x 2:", max((a[k].float() - b[k].float()).abs().max().item() for k in a))
EOF
    die "weights differ: 2 nodes x 1 rank $sha_two, 1 node x 2 ranks $sha_one"
fi
printf 'two_node_s=%s\nsha=%s\nnodelist=%s\n' "$two_node_s" "$sha_one" "$nodelist" >"$RUN_DIR/result.env"
log "OK: $run trained on $nodelist (srun + torchrun, gloo) in job $job; weights equal the 1-node x 2-rank run's (sha256 $sha_one...)"
