#!/usr/bin/env bash
# Start a real single-node SLURM (munged + slurmctld + slurmd) on this machine, without systemd, for the
# SLURM integration test. Idempotent: installs the Debian packages only when missing, reuses daemons that an
# earlier start.sh left running, and records in $LDM_SLURM_DIR/started exactly the daemons it started so
# that stop.sh stops those and nothing else (a munged someone else runs is reused, never stopped).
#
# Env: LDM_SLURM_DIR (state, logs, pid files; default /var/tmp/ldm-slurm-ci), LDM_SLURM_PARTITION (ci),
#      LDM_SLURM_WAIT (seconds to wait for the node to become idle; 60).
# Exit codes: 0 node idle; 3 not installable here (no apt and no slurm: the caller may skip); other: error.
set -euo pipefail

D=${LDM_SLURM_DIR:-/var/tmp/ldm-slurm-ci}
PARTITION=${LDM_SLURM_PARTITION:-ci}
WAIT=${LDM_SLURM_WAIT:-60}
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
# The node line comes from slurmd -C (real CPUs, sockets, cores, RealMemory): a node declaring more
# memory or CPUs than slurmd detects is set DRAIN ("Low RealMemory").
hw=$(slurmd -C | head -1 | sed -E 's/^NodeName=[^ ]+ //; s/ UpTime=.*//')
conf=$(cat <<EOF
$MARK (on $(hostname), for the SLURM integration test)
ClusterName=ldmci
SlurmctldHost=$node(127.0.0.1)
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
SlurmdSpoolDir=$D/state/d
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=$node NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
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
start_daemon() {  # start_daemon NAME PIDFILE ARGS...
    local name=$1 pidfile=$2; shift 2
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
    as_root "/usr/sbin/$name" "$@"
    for _ in $(seq 100); do alive "$name" "$pidfile" && break; sleep 0.1; done
    alive "$name" "$pidfile" || { as_root tail -20 "$D/log/$name.log" >&2 || true; die "$name did not start"; }
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
start_daemon slurmd "$D/run/slurmd.pid" -N "$node"

# --- 5. wait for the node ---------------------------------------------------------------------------------
t0=$SECONDS
until [ "$(sinfo -h -n "$node" -p "$PARTITION" -o '%T' 2>/dev/null)" = idle ]; do
    if [ $((SECONDS - t0)) -ge "$WAIT" ]; then
        sinfo -N -l >&2 || true
        as_root tail -15 "$D/log/slurmctld.log" "$D/log/slurmd.log" >&2 || true
        die "node $node not idle after ${WAIT} s"
    fi
    state=$(sinfo -h -n "$node" -o '%T' 2>/dev/null || true)
    # A drained/down node left over from an earlier run (e.g. it was killed mid-job) is resumed once.
    case "$state" in drain*|down*) as_root scontrol update NodeName="$node" State=RESUME 2>/dev/null || true ;; esac
    sleep 0.5
done
log "node $node idle in partition $PARTITION ($(sinfo -h -n "$node" -o '%c CPUs, %m MB'); waited $((SECONDS - t0)) s)"
