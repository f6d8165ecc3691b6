#!/usr/bin/env bash
# Stop exactly the daemons that .ci/slurm/start.sh started (listed in $LDM_SLURM_DIR/started, each with the
# pid file it wrote), newest first: slurmd, slurmctld, then munged. A daemon that start.sh found already
# running is not in the list and keeps running. Safe to call twice or when nothing was started.
set -uo pipefail

D=${LDM_SLURM_DIR:-/var/tmp/ldm-slurm-ci}
started="$D/started"
log() { echo "[slurm-stop] $*" >&2; }
if [ "$(id -u)" = 0 ]; then SUDO=(); else SUDO=(sudo -n); fi

[ -e "$started" ] || [ -e "$D/nodes-up" ] || { log "nothing recorded in $started: nothing to stop"; exit 0; }

rc=0
# tac: stop in reverse start order (slurmd before slurmctld before munged: each needs the next).
while read -r name pidfile; do
    [ -n "$name" ] || continue
    pid=$("${SUDO[@]}" cat "$pidfile" 2>/dev/null || true)
    # Only signal the pid if it still is that daemon: a stale pid file must not kill a reused pid.
    if [ -z "$pid" ] || [ "$(ps -o comm= -p "$pid" 2>/dev/null)" != "$name" ]; then
        log "$name: not running"
        continue
    fi
    "${SUDO[@]}" kill -TERM "$pid"
    # ps, not kill -0: as a sudo user kill -0 on a root daemon fails with EPERM while it still runs.
    for _ in $(seq 100); do ps -p "$pid" >/dev/null || break; sleep 0.1; done
    if ps -p "$pid" >/dev/null; then
        log "$name (pid $pid) ignored SIGTERM for 10 s: SIGKILL"
        "${SUDO[@]}" kill -KILL "$pid" || rc=1
    fi
    log "stopped $name (pid $pid)"
done < <("${SUDO[@]}" tac "$started")
"${SUDO[@]}" rm -f "$started"
# the extra nodes' namespaces, bridge and /etc/hosts lines (start.sh with LDM_SLURM_NODES > 1)
if "${SUDO[@]}" test -e "$D/nodes-up"; then
    "${SUDO[@]}" bash -c ". '$(dirname "${BASH_SOURCE[0]}")/nodes.sh' && nodes_down" && "${SUDO[@]}" rm -f "$D/nodes-up" \
        && log "removed the extra nodes' namespaces" || rc=1
fi
exit $rc
