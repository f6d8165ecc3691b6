#!/usr/bin/env bash
# Start a real single-node SLURM (munged + slurmctld + slurmd) on this machine, without systemd, for the
# SLURM integration test. Idempotent: installs the Debian packages only when missing, reuses daemons that an
# earlier start.sh left running, and records in $LDM_SLURM_DIR/started exactly the daemons it started so
# that stop.sh stops those and nothing else (a munged someone else runs is reused, never stopped).
#
# Env: LDM_SLURM_DIR (state, logs, pid files; default /var/tmp/ldm-slurm-ci), LDM_SLURM_PARTITION (ci),
#      LDM_SLURM_WAIT (seconds to wait for the nodes to become idle; 60),
#      LDM_SLURM_NODES (1: the machine is the node; N > 1: nodes ldmci-n1..N, each a network namespace with
#      its own slurmd and address, the controller on the machine: nodes.sh).
# Exit codes: 0 nodes idle; 3 not installable here (no apt and no slurm: the caller may skip); other: error.
set -euo pipefail

D=${LDM_SLURM_DIR:-/var/tmp/ldm-slurm-ci}
PARTITION=${LDM_SLURM_PARTITION:-ci}
WAIT=${LDM_SLURM_WAIT:-60}
NODES=${LDM_SLURM_NODES:-1}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF=/etc/slurm/slurm.conf
MARK="# written by ldm-recipes .ci/slurm/start.sh"
log() { echo "[slurm-start] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Daemons and apt need root. CI may run as a plain user with passwordless sudo.
if [ "$(id -u)" = 0 ]; then SUDO=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO=(sudo -n)
else SUDO=(false-no-root)
fi
as_root() { "${SUDO[@]}" "$@"; }

have_slurm() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null \
               && command -v munged >/dev/null && command -v sacct >/dev/null; }

# --- 1. packages -----------------------------------------------------------------------------------------
if ! have_slurm; then
    if ! command -v apt-get >/dev/null || [ "${SUDO[0]:-}" = false-no-root ]; then
        log "SLURM is not installed and apt-get is not usable here (no apt-get or not root/sudo)"
        exit 3
    fi
    log "installing slurm-wlm + munge via apt (about 10 s)"
    t0=$SECONDS
    # `apt-get update` only when the package lists do not know slurm (fresh images ship without lists).
    if ! apt-cache show slurmctld >/dev/null 2>&1; then as_root apt-get update -q >/dev/null; fi
    # (The packages' postinst does not start the daemons: there is no slurm.conf yet.)
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurm-wlm slurmctld slurmd slurm-client munge >"${TMPDIR:-/tmp}/ldm-slurm-apt.log" 2>&1 \
        || { tail -20 "${TMPDIR:-/tmp}/ldm-slurm-apt.log" >&2; die "apt-get install failed"; }
    log "installed in $((SECONDS - t0)) s"
fi
[ "${SUDO[0]:-}" = false-no-root ] && die "SLURM daemons must be started as root (or with passwordless sudo)"

as_root mkdir -p "$D"/{state/ctld,state/d,log,run}
as_root chmod 755 "$D"
started="$D/started"   # one daemon name per line, appended as they are started here
as_root touch "$started"

alive() {  # alive NAME PIDFILE: the pid file names a live process whose command is NAME
    local pid
    pid=$(as_root cat "$2" 2>/dev/null) || return 1
    [ -n "$pid" ] && [ "$(ps -o comm= -p "$pid" 2>/dev/null)" = "$1" ]
}

# --- 2. munge -------------------------------------------------------------------------------------------
# `munge -n | unmunge` proves a working munged; pgrep alone can match a zombie (FIELD-NOTES).
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running: reusing it"
else
    [ -s /etc/munge/munge.key ] || as_root runuser -u munge -- mungekey --create 2>/dev/null \
        || as_root /usr/sbin/create-munge-key -f 2>/dev/null || die "no /etc/munge/munge.key"
    # /run is a tmpfs: without systemd's RuntimeDirectory= nobody creates /run/munge.
    as_root install -d -o munge -g munge -m 0755 /run/munge
    as_root runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged did not come up"
    echo "munged /run/munge/munged.pid" | as_root tee -a "$started" >/dev/null
    log "started munged"
fi

# --- 3. slurm.conf ---------------------------------------------------------------------------------------
# Client commands (sinfo, sbatch, and the srun that the plugin's job step calls inside each job) look for
# /etc/slurm/slurm.conf: SLURM_CONF does not reach srun because the jobstep executor strips SLURM_* vars.
# So the config must live there; never overwrite one this script did not write (a real cluster's).
if as_root test -e "$CONF" && ! as_root grep -qF "$MARK" "$CONF"; then
    die "$CONF exists and was not written by this script: refusing to touch a real SLURM installation"
fi
node=$(hostname -s)
# One node: the machine, everything on the loopback. More: every node a namespace on a bridge, the controller at
# the bridge's address (nodes.sh); the marker file tells stop.sh to take the network down again.
. "$HERE/nodes.sh"
if [ "$NODES" -gt 1 ]; then
    as_root bash -c ". '$HERE/nodes.sh' && nodes_up $NODES" || die "could not make the nodes' namespaces"
    as_root touch "$D/nodes-up"
    addr=$LDM_NODES_NET.1
    names=$(for i in $(seq 1 "$NODES"); do node_name "$i"; done)
else
    addr=127.0.0.1
    names=$node
fi
# Node lines come from slurmd -C (real CPUs, sockets, cores, RealMemory): a node declaring more
# memory or CPUs than slurmd detects is set DRAIN ("Low RealMemory").
hw=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ UpTime=.*//')
node_lines=$(i=0; for n in $names; do
    i=$((i + 1)); [ "$NODES" -gt 1 ] && a=$(node_addr $i) || a=$addr
    echo "NodeName=$n NodeAddr=$a $hw State=UNKNOWN"
done)
nodes=$(echo $names | tr ' ' ,)
conf=$(cat <<EOF
$MARK (on $(hostname), for the SLURM integration test)
ClusterName=ldmci
SlurmctldHost=$node($addr)
# slurmctld runs as root (it owns $D); jobs still run as the submitting user.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
# No systemd, no cgroup delegation in containers: track processes through /proc and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
SwitchType=switch/none
# No slurmdbd: job records go to a text file that 'sacct --completion' reads. The plugin's own status
# checks must use squeue then (profiles/slurm-ci), and squeue sees a finished job for MinJobAge seconds.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
MinJobAge=300
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
ReturnToService=2
# Short timeouts: a test node should register and report fast.
SlurmctldTimeout=30
SlurmdTimeout=60
KillWait=30
StateSaveLocation=$D/state/ctld
# %n: the node's name, so that several slurmd on one machine keep apart
SlurmdSpoolDir=$D/state/d-%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
$node_lines
PartitionName=$PARTITION Nodes=$nodes Default=YES MaxTime=INFINITE State=UP
EOF
)
as_root mkdir -p /etc/slurm
if ! as_root test -e "$CONF" || [ "$(as_root cat "$CONF")" != "$conf" ]; then
    printf '%s\n' "$conf" | as_root tee "$CONF" >/dev/null
    conf_changed=1
else
    conf_changed=0
fi

# --- 4. slurmctld, slurmd --------------------------------------------------------------------------------
start_daemon() {  # start_daemon NAME PIDFILE [node_exec I] ARGS...: with node_exec I, inside node I (nodes.sh)
    local name=$1 pidfile=$2 in_node=(); shift 2
    [ "${1:-}" = node_exec ] && { in_node=(bash -c ". '$HERE/nodes.sh' && node_exec \"\$@\"" _ "$2"); shift 2; }
    if alive "$name" "$pidfile"; then
        if [ "$conf_changed" = 1 ]; then
            log "$name running with an old config: reconfiguring"; as_root scontrol reconfigure || true
        else
            log "$name already running (pid $(as_root cat "$pidfile")): reusing it"
        fi
        return
    fi
    if [ "$name" = slurmctld ] && ss -ltn 2>/dev/null | grep -q ':6817 '; then
        die "port 6817 is taken by another slurmctld: stop it first"
    fi
    # Both daemonize; the pid file is written by the daemon itself.
    as_root "${in_node[@]}" "/usr/sbin/$name" "$@"
    for _ in $(seq 100); do alive "$name" "$pidfile" && break; sleep 0.1; done
    alive "$name" "$pidfile" || { as_root tail -20 "$D/log/$name"*.log >&2 || true; die "$name did not start"; }
    echo "$name $pidfile" | as_root tee -a "$started" >/dev/null
    log "started $name (pid $(as_root cat "$pidfile"))"
}
fresh=0; alive slurmctld "$D/run/slurmctld.pid" || fresh=1
if [ "$fresh" = 1 ]; then
    # A fresh controller clears old job state (-c) so that job ids restart and no stale job is requeued;
    # keep the previous completion records aside so this run's `sacct --completion` holds only its jobs.
    as_root sh -c "[ ! -e '$D/log/jobcomp.txt' ] || mv '$D/log/jobcomp.txt' '$D/log/jobcomp.prev.txt'"
fi
start_daemon slurmctld "$D/run/slurmctld.pid" -c
if [ "$NODES" -gt 1 ]; then
    for i in $(seq 1 "$NODES"); do
        as_root mkdir -p "$D/state/d-$(node_name "$i")"
        start_daemon slurmd "$D/run/slurmd-$(node_name "$i").pid" node_exec "$i" -N "$(node_name "$i")"
    done
else
    as_root mkdir -p "$D/state/d-$node"
    start_daemon slurmd "$D/run/slurmd-$node.pid" -N "$node"
fi

# --- 5. wait for the nodes --------------------------------------------------------------------------------
t0=$SECONDS
for n in ${nodes//,/ }; do
    until [ "$(sinfo -h -n "$n" -p "$PARTITION" -o '%T' 2>/dev/null)" = idle ]; do
        if [ $((SECONDS - t0)) -ge "$WAIT" ]; then
            sinfo -N -l >&2 || true
            as_root tail -15 "$D/log/slurmctld.log" "$D/log/slurmd-$n.log" >&2 || true
            die "node $n not idle after ${WAIT} s"
        fi
        state=$(sinfo -h -n "$n" -o '%T' 2>/dev/null || true)
        # A drained/down node left over from an earlier run (e.g. it was killed mid-job) is resumed once.
        case "$state" in drain*|down*) as_root scontrol update NodeName="$n" State=RESUME 2>/dev/null || true ;; esac
        sleep 0.5
    done
done
log "nodes $nodes idle in partition $PARTITION ($(sinfo -h -n "${nodes%%,*}" -o '%c CPUs, %m MB') each; waited $((SECONDS - t0)) s)"
