# lib.sh - sourced by the qemu/TCG guest scripts (kernel-initiator.sh, power-loss.sh): what
# both need to clean up after themselves.
#
#   stop PID               SIGTERM, up to 5 s, then SIGKILL; PID may be -PGID. Only for ids
#                          the caller started.
#   sweep_netns PREFIX     deletes the namespaces PREFIX-PID of earlier runs whose PID is
#                          gone (runs SIGKILLed before their cleanup ran); running ones stay.
#   drop_netns NS          kills what is still running in the caller's own namespace NS
#                          (all of it was started by the caller) and deletes NS, if it exists.

stop() {
    kill -TERM -- "$1" 2>/dev/null || return 0
    local i
    for i in $(seq 50); do kill -0 -- "$1" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL -- "$1" 2>/dev/null
    return 0
}

sweep_netns() {
    local old
    for old in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$1-[0-9]*\$"); do
        [ -d "/proc/${old#"$1"-}" ] || ip netns del "$old" 2>/dev/null
    done
    return 0
}

drop_netns() {
    local p
    [ -e "/run/netns/$1" ] || return 0
    for p in $(ip netns pids "$1" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
    ip netns del "$1" 2>/dev/null
    return 0
}
