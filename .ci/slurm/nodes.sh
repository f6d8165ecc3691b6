#!/usr/bin/env bash
# Several SLURM nodes on this one machine, for the multi-node test: node i is a network namespace `ldmci-n<i>` with
# an address of its own on a bridge (10.77.0.1x; the controller stays on the machine, at 10.77.0.1), where a
# slurmd runs under the node's hostname (a UTS namespace). srun then really starts one task per node, and
# torchrun's rendezvous and gloo really cross interfaces between hosts. Sourced by start.sh / stop.sh (functions
# only; needs root). Mounts are shared: the jobs see the same files, /sys and cgroups as the machine.
#   nodes_up N       bridge ldmci0 (10.77.0.1/24), namespaces ldmci-n1..N (10.77.0.1i), /etc/hosts entries
#   nodes_down       removes what nodes_up made (idempotent)
#   node_exec I CMD  runs CMD in node I's namespaces

LDM_NODES_BRIDGE=ldmci0
LDM_NODES_NET=10.77.0
LDM_NODES_HOSTS_MARK="# ldm-recipes .ci/slurm multi-node test"

node_name() { echo "ldmci-n$1"; }
node_addr() { echo "$LDM_NODES_NET.$((10 + $1))"; }

nodes_up() {
    local n=$1 i ns
    ip link show "$LDM_NODES_BRIDGE" >/dev/null 2>&1 || ip link add "$LDM_NODES_BRIDGE" type bridge
    ip addr show dev "$LDM_NODES_BRIDGE" | grep -q "$LDM_NODES_NET.1/" \
        || ip addr add "$LDM_NODES_NET.1/24" dev "$LDM_NODES_BRIDGE"
    ip link set "$LDM_NODES_BRIDGE" up
    for i in $(seq 1 "$n"); do
        ns=$(node_name "$i")
        if ! ip netns list | grep -qw "$ns"; then
            ip netns add "$ns"
            ip link add "veth-n$i" type veth peer name eth0 netns "$ns"
            ip link set "veth-n$i" master "$LDM_NODES_BRIDGE" up
            ip netns exec "$ns" ip addr add "$(node_addr "$i")/24" dev eth0
            ip netns exec "$ns" ip link set lo up
            ip netns exec "$ns" ip link set eth0 up
            # the machine's own addresses (its hostname, the controller) are reached through the bridge
            ip netns exec "$ns" ip route add default via "$LDM_NODES_NET.1"
        fi
        # node names must resolve everywhere: srun, torchrun's rendezvous and gloo look them up
        grep -q "^$(node_addr "$i") $ns " /etc/hosts \
            || echo "$(node_addr "$i") $ns $LDM_NODES_HOSTS_MARK" >>/etc/hosts
    done
}

node_exec() {  # node_exec I CMD...: CMD in node I's network namespace, under hostname ldmci-n<I>
    local ns; ns=$(node_name "$1"); shift
    # nsenter, not `ip netns exec`: that one also remounts /sys, hiding the cgroup tree slurmd needs
    nsenter --net="/run/netns/$ns" unshare --uts sh -c 'hostname "$0" && exec "$@"' "$ns" "$@"
}

nodes_down() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^ldmci-n'); do
        ip netns del "$ns" || true   # also removes the veth pair
    done
    ip link show "$LDM_NODES_BRIDGE" >/dev/null 2>&1 && ip link del "$LDM_NODES_BRIDGE"
    if grep -qF "$LDM_NODES_HOSTS_MARK" /etc/hosts; then
        # /etc/hosts is often a bind mount (containers): rewrite it in place, never replace the file
        local kept; kept=$(grep -vF "$LDM_NODES_HOSTS_MARK" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
    return 0
}
