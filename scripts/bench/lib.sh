# scripts/bench/lib.sh - the namespace, veth and target setup shared by bench-compare.sh and
# bench-initiator.sh. Sourced, not run.
#
# Two private network namespaces joined by a veth pair (never the host's interfaces), a
# target started alone in one of them, programs run in the other. The caller:
#   - calls bench_names PREFIX (namespaces aoe<PREFIX>T$$ / aoe<PREFIX>I$$, interfaces
#     <PREFIX>T$$ / <PREFIX>I$$) and sets IP_T, IP_I (the addresses nbdkit's TCP runs over);
#   - sets AOE (an absolute path), WORK (a private directory), SHELF, SLOT and FILE (the
#     backing file), and may set TGT_PIN / GEN_PIN (command prefixes, e.g. taskset -c 0);
#   - removes the namespaces on exit with bench_unlink. stop_pid PID (below: TERM, up to 5 s,
#     QUIT, KILL) may be redefined after sourcing this file.
# The whole-path scripts (bench-initiator.sh, bench/fio.sh, bench/read-timeline.sh) also use
# bench_workspace, start_initiator, start_nbdkit and stop_all below, with ROOT and SOCK (the initiator's mount point and NBD socket), INIT_PID,
# TARGET_PID and KIT_PID (nbdkit's), and INIT_AOE / INIT_ARGS (the initiator's binary, default
# AOE, and extra arguments).

GEN_PIN=() TGT_PIN=()

bench_names() { # prefix
    NS_T=aoe${1}T$$ NS_I=aoe${1}I$$ IF_T=${1}T$$ IF_I=${1}I$$
}

# Both namespaces anew, the veth pair between them with this MTU, addresses, links up.
bench_link() { # mtu
    bench_unlink
    ip netns add "$NS_T"; ip netns add "$NS_I"
    ip link add "$IF_T" netns "$NS_T" mtu "$1" type veth peer name "$IF_I" netns "$NS_I" mtu "$1"
    for ns in "$NS_T" "$NS_I"; do
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 >/dev/null 2>&1 || true
        ip -n "$ns" link set lo up
    done
    ip -n "$NS_T" addr add "$IP_T/24" dev "$IF_T"; ip -n "$NS_I" addr add "$IP_I/24" dev "$IF_I"
    ip -n "$NS_T" link set "$IF_T" up; ip -n "$NS_I" link set "$IF_I" up
}

# Deleting a namespace deletes its end of the veth pair.
bench_unlink() {
    ip netns del "$NS_T" 2>/dev/null || true
    ip netns del "$NS_I" 2>/dev/null || true
}

# nsenter --net only (not `ip netns exec`, which makes a private mount namespace, so the
# initiator's FUSE mount would be invisible here).
in_t() { nsenter --net="/run/netns/$NS_T" -- "${TGT_PIN[@]}" "$@"; }
in_i() { nsenter --net="/run/netns/$NS_I" -- "${GEN_PIN[@]}" "$@"; }
# In the background, so that $! is the program's own PID (nsenter and taskset exec).
bg_t() { nsenter --net="/run/netns/$NS_T" -- "${TGT_PIN[@]}" "$@" & }
bg_i() { nsenter --net="/run/netns/$NS_I" -- "${GEN_PIN[@]}" "$@" & }
bench() { in_i "$AOE" bench "$IF_I" "$@"; }

# user+system ticks of a process (fields 14 and 15 of /proc/PID/stat, after the comm field).
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
# The middle line of numbers on stdin (the lower middle for an even count).
median() { sort -g | awk '{ a[NR] = $0 } END { print a[int((NR + 1) / 2)] }'; }

# A target's command words, one per line: built in for `aoe` (aoe serve) and vblade, else
# from TARGET_CMD_<name>='cmd ... {shelf} {slot} {netif} {file}'. Fails for an unknown name.
target_cmd() { # name
    local name=$1 tmpl
    case $name in
        aoe) tmpl="$AOE serve {shelf} {slot} {netif} {file}" ;;
        vblade) tmpl="vblade {shelf} {slot} {netif} {file}" ;;
        *) local var="TARGET_CMD_$name"; tmpl=${!var:-} ;;
    esac
    [ -n "$tmpl" ] || return 1
    tmpl=${tmpl//\{shelf\}/$SHELF}; tmpl=${tmpl//\{slot\}/$SLOT}
    tmpl=${tmpl//\{netif\}/$IF_T}; tmpl=${tmpl//\{file\}/$FILE}
    printf '%s\n' $tmpl
}

# Starts a target in its namespace (log in $WORK/target.log) and waits until it answers a
# one-request read; sets TARGET_PID. Returns 1, the target stopped and its log shown, if it
# never answers.
start_target() { # name
    local -a cmd
    target_cmd "$1" >/dev/null || {
        echo "$(basename "$0"): no command for target $1 (set TARGET_CMD_$1)" >&2; return 1; }
    mapfile -t cmd < <(target_cmd "$1")
    bg_t "${cmd[@]}" >"$WORK/target.log" 2>&1
    TARGET_PID=$!
    for _ in $(seq 1 50); do
        bench --target "$SHELF.$SLOT" --size 512 >/dev/null 2>&1 && return 0
        kill -0 "$TARGET_PID" 2>/dev/null || break
        sleep 0.2
    done
    echo "$(basename "$0"): $1 did not answer; its log:" >&2; sed 's/^/    /' "$WORK/target.log" >&2
    stop_pid "$TARGET_PID"; TARGET_PID=""
    return 1
}

stop_pid() { # pid
    local p=$1
    [ -n "$p" ] && kill -0 "$p" 2>/dev/null || return 0
    kill -TERM "$p" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -QUIT "$p" 2>/dev/null || true
    sleep 0.2
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
}
stop_all() {
    stop_pid "$INIT_PID"; INIT_PID=""
    fusermount3 -u -z "$ROOT" 2>/dev/null || true
    stop_pid "$TARGET_PID"; TARGET_PID=""
    stop_pid "$KIT_PID"; KIT_PID=""
}

# The whole-path scripts' set-up (bench-initiator.sh, bench/fio.sh, bench/read-timeline.sh):
# bench_names PREFIX, the backing file FILE (/dev/shm/aoe-NAME-PID.img), a private WORK
# directory with ROOT and SOCK in it, no process started yet, and a trap that on exit (Ctrl-C
# included) stops everything started, runs the script's own `cleanup_more` if it defines
# one, removes the namespaces, FILE and WORK.
bench_workspace() { # prefix name
    TAG=$$
    bench_names "$1"
    FILE=/dev/shm/aoe-$2-$TAG.img
    WORK=$(mktemp -d "/tmp/aoe-$2.XXXXXX")
    ROOT=$WORK/root SOCK=$WORK/nbd.sock
    TARGET_PID="" INIT_PID="" KIT_PID=""
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM HUP
}
bench_cleanup() {
    set +e
    stop_all
    [ "$(type -t cleanup_more)" = function ] && cleanup_more
    bench_unlink
    rm -f "$FILE"
    rm -rf "$WORK"
}

# Runs a command while `perf ARGS` runs beside it (started first, given 0.3 s to attach,
# stopped with SIGINT once the command is done, and waited for); its output is discarded.
beside_perf() { # perf-args... -- cmd...
    local -a args=()
    while [ "$1" != -- ]; do args+=("$1"); shift; done
    shift
    perf "${args[@]}" >/dev/null 2>&1 &
    local pp=$!
    sleep 0.3
    "$@"
    kill -INT "$pp"
    wait "$pp" 2>/dev/null || true
}

load() { cut -d' ' -f1 /proc/loadavg; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }

# Starts `aoe initiator` (INIT_AOE, default AOE) with FUSE at ROOT and NBD at SOCK in the
# initiator's namespace and waits for the target's device file and the socket; sets INIT_PID.
start_initiator() {
    mkdir -p "$ROOT"
    # shellcheck disable=SC2086
    nsenter --net="/run/netns/$NS_I" -- "${INIT_AOE:-$AOE}" initiator --root "$ROOT" --iflist "$IF_I" \
        --nbd "$SOCK" ${INIT_ARGS:-} >"$WORK/init.log" 2>&1 &
    INIT_PID=$!
    for _ in $(seq 1 100); do
        [ -e "$ROOT/e$SHELF.$SLOT" ] && [ -S "$SOCK" ] && return 0
        sleep 0.1
    done
    sed 's/^/    /' "$WORK/init.log" >&2; die "the initiator found no device"
}

# Starts nbdkit's file plugin on FILE in the target's namespace, listening on IP_T:10809 (log
# in $WORK/nbdkit.log), with NBDKIT_ARGS (extra nbdkit flags, e.g. "-t 4"), and waits until it
# answers; sets KIT_PID.
start_nbdkit() {
    # shellcheck disable=SC2086 # NBDKIT_ARGS: flags, split on purpose
    nsenter --net="/run/netns/$NS_T" -- nbdkit -f ${NBDKIT_ARGS:-} -i "$IP_T" -p 10809 file "$FILE" >"$WORK/nbdkit.log" 2>&1 &
    KIT_PID=$!
    for _ in $(seq 1 50); do in_i nbdinfo --size "nbd://$IP_T:10809" >/dev/null 2>&1 && return 0; sleep 0.1; done
    sed 's/^/    /' "$WORK/nbdkit.log" >&2; die "nbdkit did not answer"
}

# Wake-ups of the whole machine during a command (WAKES=dir in bench-initiator.sh): records
# sched:sched_waking (waker = the task on the CPU, wakee and its CPU from the event), the
# rescheduling and function-call IPIs each CPU takes, and softirq entry/exit (to tell a wake-up
# made in softirq context from one made by the task it interrupted), `perf record -a` with no
# call graphs into dir/name.data, then prints `wakes_report`. What it costs: one trace record
# (~100 bytes) per event, some 2-6 a frame at MTU 9000; written by perf on either CPU.
# WAKES_PIDS: the processes of this rig whose threads count as the path's (the initiator's,
# the target's); threads of other processes named aoe* (another rig on the machine) are
# counted as "other".
wakes_during() { # dir name mib cmd...
    local dir=$1 name=$2 mib=$3; shift 3
    mkdir -p "$dir"
    wakes_tids >"$dir/$name.tids"
    beside_perf record -q -a -m 1024 -e sched:sched_waking -e irq_vectors:reschedule_entry \
        -e irq_vectors:call_function_single_entry -e irq_vectors:call_function_entry \
        -e irq:softirq_entry -e irq:softirq_exit -o "$dir/$name.data" -- "$@"
    wakes_tids >>"$dir/$name.tids"
    wakes_report "$dir/$name.data" "$name" "$mib" "$dir/$name.tids" >&2
}
wakes_tids() { # the threads of WAKES_PIDS, one a line
    local p
    for p in ${WAKES_PIDS:-}; do ls "/proc/$p/task" 2>/dev/null || true; done
}
# Per MiB moved: the path's wake-ups, those of a task on another CPU than the waker's
# (cross-CPU), the IPIs taken (whole machine), and the waker -> wakee pairs (thread names, digits of kernel threads' names
# dropped; "[softirq]" after a waker that was in softirq context at the time, "x" for a
# cross-CPU pair), largest first, down to 0.05 a MiB. Pairs in which neither side is a party
# of the path (aoe, dd, nbdcopy, nbdkit, fuse, the kernel's own threads and idle) are summed
# as "other" (builds beside the benchmark), as are threads named aoe* not in the tids file
# (another rig's initiator or target).
wakes_report() { # perf.data name mib [tids-file]
    perf script -i "$1" -F comm,tid,cpu,event,trace 2>/dev/null | awk -v n="$2" -v mib="$3" -v tids="${4:-}" '
        BEGIN { if (tids != "") while ((getline t < tids) > 0) ours[t] = 1 }
        function norm(c, tid) { sub(/\/[0-9:u]+$/, "", c); sub(/-[0-9]+$/, "", c)
            if (tids != "" && c ~ /^aoe/ && !(tid in ours)) c = "other-" c
            return c }
        function party(c) { return c ~ /^(aoe|nbd|dd$|fuse|kworker|ksoftirqd|swapper|migration|rcu|kthreadd|perf$|ip$|nsenter$)/ }
        {
            # "comm tid [cpu] event: trace"; comm may hold spaces.
            for (i = 1; i <= NF; i++) if ($i ~ /^\[[0-9]+\]$/) break
            if (i > NF) next
            cpu = substr($i, 2, length($i) - 2) + 0; ev = $(i + 1)
            comm = $1; for (j = 2; j < i - 1; j++) comm = comm " " $j
            if (ev == "irq:softirq_entry:") { soft[cpu]++; next }
            if (ev == "irq:softirq_exit:") { if (soft[cpu] > 0) soft[cpu]--; next }
            if (ev == "irq_vectors:reschedule_entry:") { resched[cpu]++; ipi++; next }
            if (ev ~ /call_function/) { cfs[cpu]++; ipi++; next }
            if (ev != "sched:sched_waking:") next
            wc = ""; tc = -1; wt = ""
            for (j = i + 2; j <= NF; j++) {
                if ($j ~ /^comm=/) { wc = substr($j, 6); k = j + 1
                    while (k <= NF && $k !~ /^pid=/) { wc = wc " " $k; k++ } }
                if ($j ~ /^pid=/) wt = substr($j, 5)
                if ($j ~ /^target_cpu=/) tc = substr($j, 12) + 0
            }
            wn = norm(comm, $(i - 1)); e = norm(wc, wt)
            w = wn (soft[cpu] > 0 ? "[softirq]" : "")
            x = (tc != cpu) ? " x" : ""
            if (!party(wn) && !party(e)) { other++; next }
            total++; if (x != "") cross++
            pair[w " -> " e x]++
        }
        END {
            printf "wakes %s: %.1f wake-ups/MiB (%.1f cross-CPU), %.1f IPIs/MiB", n, total / mib, cross / mib, ipi / mib
            for (c in resched) printf ", cpu%d resched %.1f", c, resched[c] / mib
            for (c in cfs) printf ", cpu%d call-function %.1f", c, cfs[c] / mib
            printf "; other tasks %.1f/MiB\n", other / mib
            m = 0; for (p in pair) { keys[++m] = p }
            for (a = 1; a <= m; a++) for (b = a + 1; b <= m; b++)
                if (pair[keys[b]] > pair[keys[a]]) { t = keys[a]; keys[a] = keys[b]; keys[b] = t }
            for (a = 1; a <= m; a++) if (pair[keys[a]] / mib >= 0.05)
                printf "wakes %s:   %6.2f/MiB  %s\n", n, pair[keys[a]] / mib, keys[a]
        }'
}

# Memory churn during a command (FAULTS=dir in bench-initiator.sh): for the initiator and the
# target (FAULTS_PIDS="init target"), `perf stat` of page faults (minor, major), the memory
# system calls that map, unmap, advise or move the heap (mmap, munmap, madvise, brk, mremap)
# and CPU time, the whole machine's page allocations (all, from the buddy lists, per-CPU
# list drains: `perf stat -a`), and the machine's steal time from /proc/stat (a vCPU runnable while the host
# runs something else). Beside it, `perf record -g` of the first process's (the initiator's)
# page faults (every one, with its data address: -d), the same system calls, and its page
# allocations (kmem:mm_page_alloc, made in its context: socket buffers it sends, pages it
# faults in) into dir/name.data, and its address map at the end into dir/name.maps. Prints
# per MiB moved one line per process, the steal, and the initiator's page allocations by
# order (and how many distinct blocks: memory the socket's buffers spread over) and its
# faults by mapping (`faults_report`). Costs little: faults and these system
# calls are a few per MiB; page allocations a few hundred (one record each, with its stack).
faults_during() { # dir name mib cmd...
    local dir=$1 name=$2 mib=$3; shift 3
    local -a p=(${FAULTS_PIDS:-})
    local ev=page-faults,minor-faults,major-faults,task-clock
    ev+=,syscalls:sys_enter_mmap,syscalls:sys_enter_munmap,syscalls:sys_enter_madvise
    ev+=,syscalls:sys_enter_brk,syscalls:sys_enter_mremap
    mkdir -p "$dir"
    grep '^cpu ' /proc/stat >"$dir/$name.stat0"
    faults_reporting >"$dir/$name.pr0"
    # The recording first: attaching to every thread with call graphs takes longest.
    beside_perf record -q -g -d -c 1 -e page-faults -e syscalls:sys_enter_mmap \
        -e syscalls:sys_enter_munmap -e syscalls:sys_enter_madvise -e syscalls:sys_enter_brk \
        -e kmem:mm_page_alloc -e syscalls:sys_enter_sendmsg -e syscalls:sys_enter_writev \
        -p "${p[0]}" -o "$dir/$name.data" -- \
        beside_perf stat -x, -a -e kmem:mm_page_alloc,kmem:mm_page_alloc_zone_locked,kmem:mm_page_pcpu_drain \
        -o "$dir/$name.a.stat" -- \
        beside_perf stat -x, -e "$ev" -p "${p[1]}" -o "$dir/$name.t.stat" -- \
        beside_perf stat -x, -e "$ev" -p "${p[0]}" -o "$dir/$name.i.stat" -- \
        faults_then_maps "${p[0]}" "$dir/$name.maps" "$@"
    faults_reporting >"$dir/$name.pr1"
    grep '^cpu ' /proc/stat >"$dir/$name.stat1"
    faults_report "$dir" "$name" "$mib" >&2
}
# The guest's free page reporting (a VM's balloon hands free blocks of 2^order pages to the
# host, which takes them back; touching one again faults in the host, unseen by the guest):
# "KiB reported, passes" from the reporting module's counters where this kernel has them.
faults_reporting() {
    local d=/sys/module/page_reporting/parameters
    [ -r "$d/reported_kib" ] && echo "$(cat "$d/reported_kib") $(cat "$d/passes" 2>/dev/null || echo 0)" || echo "0 0"
}
# The command, then the process's address map while it still runs.
faults_then_maps() { # pid file cmd...
    local pid=$1 out=$2; shift 2
    "$@"
    cat "/proc/$pid/maps" >"$out" 2>/dev/null || true
}
faults_report() { # dir name mib
    local dir=$1 name=$2 mib=$3 who f
    for who in i t; do
        f="$dir/$name.$who.stat"
        [ -s "$f" ] || continue
        awk -F, -v mib="$mib" -v n="$name" -v w="$([ $who = i ] && echo initiator || echo target)" '
            $1 ~ /^[0-9.]+$/ { v[$3] = $1 }
            END { printf "faults %s %s: %.2f faults/MiB (%.2f minor, %.2f major); per MiB mmap %.3f munmap %.3f madvise %.3f brk %.3f mremap %.3f; %.2f CPU-ms/MiB\n",
                  n, w, v["page-faults"] / mib, v["minor-faults"] / mib, v["major-faults"] / mib,
                  v["syscalls:sys_enter_mmap"] / mib, v["syscalls:sys_enter_munmap"] / mib,
                  v["syscalls:sys_enter_madvise"] / mib, v["syscalls:sys_enter_brk"] / mib,
                  v["syscalls:sys_enter_mremap"] / mib, v["task-clock"] / mib }' "$f"
    done
    # The whole machine's page allocations, those that took the zone lock (the per-CPU
    # lists empty: pages from the buddy lists, where freed blocks merge and get reported to
    # the host) and the pages drained from the per-CPU lists back to them.
    [ -s "$dir/$name.a.stat" ] && awk -F, -v mib="$mib" -v n="$name" '$1 ~ /^[0-9.]+$/ { v[$3] = $1 }
        END { printf "faults %s machine: page allocations %.1f/MiB, from the buddy lists %.1f/MiB, per-CPU drains %.1f/MiB\n",
              n, v["kmem:mm_page_alloc"] / mib, v["kmem:mm_page_alloc_zone_locked"] / mib, v["kmem:mm_page_pcpu_drain"] / mib }' "$dir/$name.a.stat"
    # /proc/stat's cpu line: user nice system idle iowait irq softirq steal.
    paste -d' ' "$dir/$name.stat0" "$dir/$name.stat1" | awk -v hz="$HZ" -v mib="$mib" -v n="$name" '
        { printf "faults %s: steal %.3f CPU-ms/MiB (whole machine)", n, ($20 - $9) / hz * 1000 / mib }'
    paste -d' ' "$dir/$name.pr0" "$dir/$name.pr1" | awk '{ printf "; free page reporting: %d KiB in %d passes\n", $3 - $1, $4 - $2 }'
    [ -s "$dir/$name.data" ] || return 0
    # Page allocations in the initiator's context by order, and its faults by the mapping
    # their address falls in (heap, stack, a file, or an anonymous mapping by its size).
    perf script -i "$dir/$name.data" -F comm,event 2>/dev/null | awk -v mib="$mib" -v n="$name" '
        $NF ~ /sys_enter_(sendmsg|writev):$/ { c = $1; for (i = 2; i < NF; i++) c = c " " $i
            e = $NF; sub(/^syscalls:sys_enter_/, "", e); sub(/:$/, "", e); k[c " " e]++ }
        END { printf "faults %s initiator send calls/MiB by thread:", n
              for (x in k) printf " %s %.2f;", x, k[x] / mib; printf "\n" }'
    perf script -i "$dir/$name.data" -F event,addr,trace 2>/dev/null | awk -v mib="$mib" -v n="$name" -v maps="$dir/$name.maps" '
        function hex(s,   i, c, v) { v = 0; s = tolower(s); sub(/^0x/, "", s)
            for (i = 1; i <= length(s); i++) { c = index("0123456789abcdef", substr(s, i, 1)) - 1; v = v * 16 + c }
            return v }
        BEGIN { while ((getline l < maps) > 0) { split(l, f, " "); split(f[1], r, "-"); m++
                lo[m] = hex(r[1]); hi[m] = hex(r[2]); nm[m] = f[6] != "" ? f[6] : sprintf("anon %d KiB", (hi[m] - lo[m]) / 1024) } }
        /mm_page_alloc/ { o = ""; for (i = 1; i <= NF; i++) { if ($i ~ /^order=/) o = substr($i, 7); if ($i ~ /^pfn=/) pfn = $i }
            order[o]++; if (!((o, pfn) in seen)) { seen[o, pfn] = 1; distinct[o]++ }; next }
        /page-faults/ { a = -1; for (i = 1; i <= NF; i++) if ($i ~ /^[0-9a-f]+$/ && length($i) >= 4) { a = hex($i); break }
            w = "unmapped at the end"; for (k = 1; k <= m; k++) if (a >= lo[k] && a < hi[k]) { w = nm[k]; break }
            where[w]++; next }
        END { printf "faults %s initiator page allocations/MiB by order:", n
              for (o in order) printf " %s: %.2f (%d distinct blocks, %.1f MiB)", o, order[o] / mib, distinct[o], distinct[o] * 4 * 2 ^ o / 1024; printf "\n"
              for (w in where) printf "faults %s initiator faults/MiB in %s: %.2f\n", n, w, where[w] / mib }'
}
