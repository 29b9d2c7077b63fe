#!/usr/bin/env bash
# perf-split.sh - where each CPU-ms of a MiB moved goes, per process, from a whole-machine
# profile (`perf record -a -g`, cpu-clock: each sample's period is nanoseconds of a CPU).
#
# Usage: scripts/bench/perf-split.sh FILE.data MIB [NAME=PID ...]
#   FILE.data  a `perf record -a -g` file (bench-initiator.sh PERFALL=dir writes one per transfer)
#   MIB        the MiB the transfer moved (the script's SIZE_MB)
#   NAME=PID   label the threads of process PID as NAME (e.g. initiator=123 target=456);
#              other processes are labelled by their command name, numbers at its end
#              dropped (`lto cgu.12` -> `lto cgu.#`)
#
# Prints, per process over 0.05 CPU-ms per MiB: user and kernel CPU-ms per MiB (kernel time
# includes the softirq work done in its context: on a veth the sender delivers each frame
# into the receiver's socket), then the same time by what it was spent on, classified by the
# sample's call chain (first matching rule): the delivery into a packet socket's ring
# (`tpacket_rcv`, its copy apart), the rest of the veth's transmit and receive path, waking
# a client through a Unix socket (`unix_write_space`, a reply's `sock_def_readable`), Unix
# and TCP socket receives and sends (copies apart), skb allocation and freeing, the rest of
# a packet socket's send, FUSE, file writes and reads (copies apart), file seeks, poll and
# sleeps, page faults, user space. The last line sums the named processes (NAME=PID) and
# the clients (dd, nbdcopy, nbdkit, fuser threads): the path's CPU-ms per MiB.
#
# Needs perf and python3.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,22p' "$0" >&2; exit 2; }
data=$1 mib=$2; shift 2
perf script -i "$data" -F comm,pid,period,ip,sym,dso 2>/dev/null | python3 -c '
import sys, re, collections
mib = float(sys.argv[1])
names = dict(a.split("=", 1)[::-1] for a in sys.argv[2:])
COPY = {"_copy_to_iter", "_copy_from_iter", "__pi_memcpy", "memcpy_orig", "rep_movs_alternative",
        "copy_folio_from_iter_atomic", "skb_copy_bits", "memcpy", "__memmove_avx_unaligned_erms"}
RULES = [
    ("delivery into a packet ring (tpacket_rcv)", {"tpacket_rcv", "packet_rcv"}, True),
    ("veth transmit and receive, the rest", {"veth_xmit", "__dev_queue_xmit", "__dev_direct_xmit",
        "net_rx_action", "process_backlog", "enqueue_to_backlog", "netif_rx_internal"}, False),
    ("waking a client (Unix socket)", {"unix_write_space"}, False),
    ("Unix socket receive", {"unix_stream_recvmsg", "unix_stream_read_generic"}, True),
    ("Unix socket send", {"unix_stream_sendmsg"}, True),
    ("TCP send", {"tcp_sendmsg", "tcp_sendmsg_locked"}, True),
    ("TCP receive", {"tcp_recvmsg", "tcp_recvmsg_locked"}, True),
    ("skb allocation", {"sock_alloc_send_pskb", "alloc_skb_with_frags", "__alloc_skb", "kmalloc_reserve"}, False),
    ("skb free", {"consume_skb", "kfree_skb_reason", "skb_release_data", "sk_skb_reason_drop"}, False),
    ("packet socket send", {"packet_sendmsg"}, True),
    ("FUSE", {"fuse_dev_do_read", "fuse_dev_do_write", "fuse_direct_io", "fuse_dev_read", "fuse_dev_write",
        "fuse_uring_cmd", "fuse_copy_args"}, True),
    ("file write", {"vfs_write", "vfs_writev", "do_pwritev", "shmem_file_write_iter", "generic_perform_write"}, True),
    ("file read", {"vfs_read", "shmem_file_read_iter", "filemap_read"}, True),
    ("file seek (SEEK_DATA, SEEK_HOLE)", {"mapping_seek_hole_data", "ksys_lseek"}, False),
    ("poll, sleep, context switch", {"do_sys_poll", "do_epoll_wait", "schedule", "__schedule",
        "finish_task_switch.isra.0", "io_cqring_wait"}, False),
    ("other socket system calls", {"__sys_sendmmsg", "__sys_sendto", "__sys_recvfrom", "__sys_sendmsg",
        "__sys_recvmsg", "__sys_recvmmsg"}, False),
    ("page faults", {"exc_page_fault", "handle_mm_fault"}, False),
]
def category(chain, user):
    s = set(chain)
    if "sock_def_readable" in s and "unix_stream_sendmsg" in s:
        return "waking a client (Unix socket)"
    for name, syms, copies in RULES:
        if s & syms:
            return name + ((": copy" if chain[0] in COPY else ": the rest") if copies else "")
    return "user space" if user else "kernel, other"
tot = collections.defaultdict(collections.Counter)
kern = collections.Counter()
cur = None; chain = []; user = False
def flush():
    if cur is not None and chain:
        c = category(chain, user)
        tot[cur[0]][c] += cur[1]
        if not user: kern[cur[0]] += cur[1]
for ln in sys.stdin:
    ln = ln.rstrip("\n")
    if not ln.strip():
        flush(); cur = None; chain = []; continue
    if not ln[0].isspace():
        flush(); chain = []
        p = ln.split()
        try:
            comm, pid, period = " ".join(p[:-2]), p[-2], int(p[-1])
        except (ValueError, IndexError):
            cur = None; continue
        if pid in names:
            label = "%s (%s)" % (names[pid], re.sub(r"-\d+$", "-#", comm))
        else:
            label = re.sub(r"\d+$", "#", comm)
        cur = (label, period); continue
    f = ln.strip().split(None, 1)
    rest = f[1] if len(f) > 1 else "?"
    if not chain:
        user = "kernel" not in rest
    chain.append(rest.rsplit(" (", 1)[0].split("+0x")[0])
flush()
ms = lambda v: v / 1e6 / mib
path = 0
named = r"dd$|nbdcopy$|nbdkit$|fuser-#$" + "".join("|%s \\(" % re.escape(n) for n in names.values())
for c in sorted(tot, key=lambda c: -sum(tot[c].values())):
    t = sum(tot[c].values())
    if re.match(named, c):
        path += t
    if ms(t) < 0.05:
        continue
    print("%-24s %6.3f CPU-ms/MiB: user %.3f, kernel %.3f" % (c, ms(t), ms(t - kern[c]), ms(kern[c])))
    for k, v in tot[c].most_common():
        if ms(v) >= 0.005:
            print("    %6.3f %5.1f%%  %s" % (ms(v), 100 * v / t, k))
print("path (named processes and clients): %.3f CPU-ms/MiB" % ms(path))
' "$mib" "$@"
