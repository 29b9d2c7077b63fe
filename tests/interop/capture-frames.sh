#!/usr/bin/env bash
# capture-frames.sh - capture REAL AoE frames exchanged by third-party peers and
# write them as annotated hex test vectors (crates/aoe-wire/testdata/captures.txt).
#
# Peers: vblade (target); aoetools aoecfg, aoeping, aoe-sancheck (initiator side);
# optionally the Linux kernel aoe initiator in a qemu guest (KERNEL=1 runs a temp
# copy of /work/shared/rigs/kernel-aoe-peer.sh with a full-snaplen capture).
#
# Topology (all created here and deleted on exit; AoE never touches host NICs):
#
#   netns T: vblade on aoetgt0 <=veth=> netns R: relay <=veth=> netns I: aoeini0
#                                                                tshark + aoetools
#
# The relay (AF_PACKET, AoE ethertype only) forwards every frame byte for byte.
# Only while the `aoeping -S` steps run it sets IDENTIFY word 82 bit 0 ("SMART
# supported") in vblade's IDENTIFY responses: aoeping refuses to send any SMART
# command to a device that does not advertise SMART, and vblade does not. Those
# modified IDENTIFY responses are never written as vectors; the SMART requests
# (aoeping) and responses (vblade) are unmodified.
#
# Usage (root):  tests/interop/capture-frames.sh
# Environment:
#   MTU=1500            veth MTU
#   SHELF=7 SLOT=3      AoE address of vblade
#   OUT=path            vector file (default: <repo>/crates/aoe-wire/testdata/captures.txt)
#   KEEP_PCAP=path      keep the aoetools capture (pcapng) there
#   KERNEL=1            also run the kernel-initiator rig (qemu TCG guest, 2-5 min)
#   KERNEL_RIG=path     rig to copy (default /work/shared/rigs/kernel-aoe-peer.sh)
#   KERNEL_PCAP=path    use this existing full-snaplen kernel-vs-vblade capture
#   KEEP_KERNEL_PCAP=path  keep the kernel rig's capture there
#   KERNEL_CACHE=dir    the rig's default work dir; unpacked linux-image-* found
#                       there are reused (default ${TMPDIR:-/tmp}/kernel-aoe-peer)
set -uo pipefail

MTU=${MTU:-1500}
SHELF=${SHELF:-7}
SLOT=${SLOT:-3}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${OUT:-$REPO/crates/aoe-wire/testdata/captures.txt}
KERNEL=${KERNEL:-0}
KERNEL_RIG=${KERNEL_RIG:-/work/shared/rigs/kernel-aoe-peer.sh}
KERNEL_PCAP=${KERNEL_PCAP:-}
KERNEL_CACHE=${KERNEL_CACHE:-${TMPDIR:-/tmp}/kernel-aoe-peer}

# fixed, locally administered MACs and names, so regenerated vectors stay comparable
MAC_T=02:00:00:a0:e0:73     # vblade
MAC_I=02:00:00:a0:e0:01     # aoetools
HOSTNAME_T=aoecap           # hostname vblade sees (IDENTIFY serial "shelf.slot:host")
IF_T=aoetgt0 IF_I=aoeini0 IF_RT=aoerlt0 IF_RI=aoerli0   # per-namespace names

ID=$$
NS_T=aoecapT$ID NS_R=aoecapR$ID NS_I=aoecapI$ID
WORK=$(mktemp -d /tmp/aoecapture.XXXXXX)
PCAP=$WORK/aoetools.pcapng
STEPS=$WORK/steps.tsv
REWRITE_FLAG=$WORK/rewrite-identify
TSHARK_PID="" TARGET_PID="" RELAY_PID=""
# clean environment for the peers (aoecfg sends uninitialised stack bytes, which
# include its argv and could include environment strings)
CLEANENV=(env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C)

say() { printf '%s\n' "$*" >&2; }

stop() { # pid signal
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null || return 0
    kill "-$2" "$1" 2>/dev/null
    for _ in $(seq 30); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null
    wait "$1" 2>/dev/null
    return 0
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM HUP
    set +e
    stop "$TARGET_PID" TERM
    stop "$RELAY_PID" TERM
    stop "$TSHARK_PID" INT
    # anything still inside OUR namespaces was started by us
    for ns in "$NS_T" "$NS_R" "$NS_I"; do
        if ip netns list 2>/dev/null | grep -qw "$ns"; then
            for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
            ip netns del "$ns"
        fi
    done
    rm -rf "$WORK"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

[ "$(id -u)" = 0 ] || { say "must run as root"; exit 1; }
for t in ip vblade aoecfg aoeping tshark python3 unshare timeout; do
    command -v $t >/dev/null || { say "missing tool: $t"; exit 1; }
done

# ---------------------------------------------------------------- network
for ns in "$NS_T" "$NS_R" "$NS_I"; do ip netns add "$ns" || exit 1; done
ip link add "$IF_T" netns "$NS_T" mtu "$MTU" address "$MAC_T" type veth \
    peer name "$IF_RT" netns "$NS_R" mtu "$MTU" || exit 1
ip link add "$IF_I" netns "$NS_I" mtu "$MTU" address "$MAC_I" type veth \
    peer name "$IF_RI" netns "$NS_R" mtu "$MTU" || exit 1
for ns in "$NS_T" "$NS_R" "$NS_I"; do
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 \
        net.ipv6.conf.default.disable_ipv6=1 >/dev/null 2>&1
    ip -n "$ns" link set lo up
done
ip -n "$NS_R" link set "$IF_RT" promisc on up && ip -n "$NS_R" link set "$IF_RI" promisc on up \
    && ip -n "$NS_T" link set "$IF_T" up && ip -n "$NS_I" link set "$IF_I" up || exit 1

# ---------------------------------------------------------------- relay
cat >"$WORK/relay.py" <<'PY'
import os, select, socket, sys
ETH_P_AOE = 0x88A2
tgt_if, ini_if, flag = sys.argv[1:4]
def sock(ifname):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_AOE))
    s.bind((ifname, ETH_P_AOE))
    return s
tgt, ini = sock(tgt_if), sock(ini_if)
identify_tags = set()
print("relay up", flush=True)
while True:
    for s in select.select([tgt, ini], [], [])[0]:
        data, addr = s.recvfrom(65536)
        if addr[2] == socket.PACKET_OUTGOING:
            continue
        if len(data) >= 28 and data[19] == 0:            # AoE ATA
            tag = data[20:24]
            resp = data[14] & 0x08
            if s is ini and not resp and data[27] == 0xEC:
                identify_tags.add(tag)
            elif (s is tgt and resp and tag in identify_tags and len(data) >= 36 + 512
                  and os.path.exists(flag)):
                data = bytearray(data)
                data[36 + 164] |= 0x01                    # word 82 bit 0: SMART supported
                print("rewrote IDENTIFY response tag", tag.hex(), flush=True)
        (ini if s is tgt else tgt).send(data)
PY
ip netns exec "$NS_R" python3 -u "$WORK/relay.py" "$IF_RT" "$IF_RI" "$REWRITE_FLAG" >"$WORK/relay.log" 2>&1 &
RELAY_PID=$!
for _ in $(seq 50); do grep -q "relay up" "$WORK/relay.log" && break; sleep 0.1; done
grep -q "relay up" "$WORK/relay.log" || { cat "$WORK/relay.log" >&2; exit 1; }

# ---------------------------------------------------------------- capture (initiator side)
ip netns exec "$NS_I" tshark -n -q -s 0 -i "$IF_I" -f "ether proto 0x88a2" -w "$PCAP" \
    >"$WORK/tshark.log" 2>&1 &
TSHARK_PID=$!                  # ip netns exec execs tshark: this is tshark's PID
for _ in $(seq 100); do grep -q "Capturing on" "$WORK/tshark.log" && break; sleep 0.1; done
grep -q "Capturing on" "$WORK/tshark.log" || { cat "$WORK/tshark.log" >&2; exit 1; }

# steps.tsv: t_start t_end tool variant command   (frames are attributed to steps by time)
now() { date +%s.%N; }
step() { # tool variant cmd...
    local tool=$1 variant=$2; shift 2
    local t0; t0=$(now)
    say "\$ $*"
    timeout -k 2 20 ip netns exec "$NS_I" "${CLEANENV[@]}" "$@" </dev/null 2>&1 \
        | sed 's/^/    /' | head -12 >&2
    sleep 0.3
    printf '%s\t%s\t%s\t%s\t%s\n' "$t0" "$(now)" "$tool" "$variant" "$*" >>"$STEPS"
    sleep 0.2
}

# ---------------------------------------------------------------- target
FILE=$WORK/backing.img
truncate -s 1M "$FILE"          # sparse, 2048 sectors
t0=$(now)
# own UTS namespace: IDENTIFY's serial number contains the hostname
ip netns exec "$NS_T" "${CLEANENV[@]}" unshare --uts sh -c \
    "hostname $HOSTNAME_T && exec vblade $SHELF $SLOT $IF_T $FILE" >"$WORK/vblade.log" 2>&1 &
TARGET_PID=$!                  # ip netns exec, env, unshare and sh all exec: vblade's PID
sleep 1.5
kill -0 "$TARGET_PID" 2>/dev/null || { cat "$WORK/vblade.log" >&2; say "vblade died"; exit 1; }
printf '%s\t%s\t%s\t%s\t%s\n' "$t0" "$(now)" vblade startup "vblade $SHELF $SLOT $IF_T <1 MiB sparse file>" >>"$STEPS"

# ---------------------------------------------------------------- aoetools
# aoetools ignore received frames < 60 bytes, so strings are >= 28 bytes long
CFG=aoe-capture-config-string-one-0123456789
CFG2=aoe-capture-config-string-two-0123456789
CFG3=aoe-capture-config-string-forced-0123456789
A=("$SHELF" "$SLOT" "$IF_I")
step aoecfg empty    aoecfg -t 1 -c read "${A[@]}"     # empty string: vblade answers with a 32-byte runt
step aoecfg ""       aoecfg -t 1 -c set -s "$CFG" "${A[@]}"
step aoecfg ""       aoecfg -t 1 -c read "${A[@]}"
step aoecfg nonempty aoecfg -t 1 -c set -s "$CFG2" "${A[@]}"    # error 4
step aoecfg ""       aoecfg -t 1 -c test -s "$CFG" "${A[@]}"
step aoecfg nomatch  aoecfg -t 1 -c test -s "$CFG2" "${A[@]}"   # no answer
step aoecfg ""       aoecfg -t 1 -c prefix -s "aoe-capture-config-string-o" "${A[@]}"
step aoecfg nomatch  aoecfg -t 1 -c prefix -s "aoe-capture-config-string-t" "${A[@]}"
step aoecfg ""       aoecfg -t 1 -c fset -s "$CFG3" "${A[@]}"
step aoecfg broadcast aoecfg -t 1 "$IF_I"                # shelf 0xffff slot 0xff
step aoeping ""      aoeping -v -s 3 "${A[@]}"
step aoeping ""      aoeping -i -s 3 "${A[@]}"
step aoeping ""      aoeping -I -s 3 "${A[@]}"
touch "$REWRITE_FLAG"
for sc in return_status read_data enable; do
    step aoeping "smart" aoeping -S "$sc" -s 3 "${A[@]}"
done
rm -f "$REWRITE_FLAG"
if command -v aoe-sancheck >/dev/null; then
    step aoe-sancheck "" aoe-sancheck -v
fi

sleep 0.5
stop "$TSHARK_PID" INT; TSHARK_PID=""
[ -s "$PCAP" ] || { say "no capture"; cat "$WORK/tshark.log" >&2; exit 1; }
[ -n "${KEEP_PCAP:-}" ] && cp "$PCAP" "$KEEP_PCAP"
say "relay: $(grep -c rewrote "$WORK/relay.log") IDENTIFY responses modified during the SMART steps"

# ---------------------------------------------------------------- kernel initiator (optional)
KNOTE=""
if [ "$KERNEL" = 1 ] && [ -z "$KERNEL_PCAP" ]; then
    # temp copy of the rig with a full-snaplen capture, private work dir
    RIG=$WORK/kernel-aoe-peer.sh KWD=$WORK/kernel
    mkdir -p "$KWD"
    sed 's/ -s 128 / -s 0 /g' "$KERNEL_RIG" >"$RIG"
    grep -q ' -s 0 ' "$RIG" || { say "could not patch the rig's snaplen"; exit 1; }
    for k in "$KERNEL_CACHE"/linux-image-*; do [ -e "$k/.done" ] && ln -s "$k" "$KWD/"; done
    say "running the kernel rig (qemu TCG guest; takes minutes)"
    if WORKDIR=$KWD MTU=$MTU SIZE_MB=4 PAT_OFF_MB=1 PAT_LEN_MB=1 CAPTURE=1 \
        bash "$RIG" -c >"$WORK/kernel-rig.log" 2>&1; then
        KERNEL_PCAP=$KWD/last-aoe.pcap
    else
        say "kernel rig failed:"; tail -30 "$WORK/kernel-rig.log" >&2
        [ -s "$KWD/last-aoe.pcap" ] && KERNEL_PCAP=$KWD/last-aoe.pcap
    fi
    [ -n "${KEEP_KERNEL_PCAP:-}" ] && [ -n "$KERNEL_PCAP" ] && cp "$KERNEL_PCAP" "$KEEP_KERNEL_PCAP"
    KREL=$(tr -d '\r' <"$WORK/kernel-rig.log" | sed -n 's/.*RIG:KERNEL //p' | tail -1)
    KNOTE="Linux ${KREL:-?} aoe initiator (qemu guest) vs vblade: kernel-aoe-peer.sh with tshark -s 0 on its bridge, 4 MiB random backing file"
elif [ -n "$KERNEL_PCAP" ]; then
    KNOTE="Linux aoe initiator (qemu guest) vs vblade: $(basename "$KERNEL_PCAP") from kernel-aoe-peer.sh with tshark -s 0"
fi

# ---------------------------------------------------------------- vectors
V_VBLADE=$(dpkg-query -W -f '${Version}' vblade 2>/dev/null || echo '?')
V_AOETOOLS=$(dpkg-query -W -f '${Version}' aoetools 2>/dev/null || echo '?')
V_TSHARK=$(tshark --version 2>/dev/null | head -1 | awk '{print $3}')
HEADER="# Frames captured on $(date -u +%Y-%m-%d) with tests/interop/capture-frames.sh (vblade $V_VBLADE, aoetools $V_AOETOOLS, tshark $V_TSHARK), MTU $MTU."
mkdir -p "$(dirname "$OUT")"

cat >"$WORK/vectors.py" <<'PY'
import json, subprocess, sys

pcap, steps_file, kpcap, header, knote = sys.argv[1:6]

FIELDS = ["frame.number", "frame.time_epoch", "frame.len", "eth.dst", "eth.src",
          "aoe.version", "aoe.response", "aoe.flags_error", "aoe.error", "aoe.major",
          "aoe.minor", "aoe.cmd", "aoe.tag", "aoe.aflags.e", "aoe.aflags.d",
          "aoe.aflags.a", "aoe.aflags.w", "aoe.err_feature", "aoe.sector_count",
          "aoe.ata.cmd", "aoe.ata.status", "aoe.lba"]
ATA_CMDS = {0x20: "read", 0x24: "read_ext", 0x30: "write", 0x34: "write_ext",
            0xEC: "identify", 0xB0: "smart", 0xE7: "flush", 0xEA: "flush_ext",
            0xE5: "check_power_mode"}
SMART = {0xD0: "read_data", 0xD4: "offline_immediate", 0xD5: "read_log",
         0xD6: "write_log", 0xD8: "enable", 0xD9: "disable", 0xDA: "return_status"}
CCMDS = {0: "read", 1: "test", 2: "prefix", 3: "set", 4: "fset"}

def tshark(args):
    return subprocess.run(["tshark", "-n", "-r"] + args, check=True,
                          capture_output=True, text=True).stdout

def fields(path):
    args = [path, "-T", "fields", "-E", "separator=\t", "-E", "occurrence=f"]
    for f in FIELDS:
        args += ["-e", f]
    rows = []
    for line in tshark(args).splitlines():
        rows.append(dict(zip(FIELDS, line.split("\t"))))
    return rows

def raw_frames(path, numbers):
    out = {}
    nums = sorted(numbers)
    for i in range(0, len(nums), 200):
        flt = "frame.number in {%s}" % ",".join(str(n) for n in nums[i:i + 200])
        for p in json.loads(tshark([path, "-Y", flt, "-T", "json", "-x"])):
            layers = p["_source"]["layers"]
            out[int(layers["frame"]["frame.number"])] = bytes.fromhex(layers["frame_raw"][0])
    return out

def be(b):
    return int.from_bytes(b, "big")

def mac(b):
    return ":".join("%02x" % x for x in b)

def decode_raw(d):
    r = {"dst": mac(d[0:6]), "src": mac(d[6:12]), "ver": d[14] >> 4, "flags": d[14] & 15,
         "err": d[15], "major": be(d[16:18]), "minor": d[18], "cmd": d[19], "tag": be(d[20:24])}
    if r["cmd"] == 0 and len(d) >= 36:
        r.update(aflags=d[24], errfeat=d[25], scnt=d[26], cmdstat=d[27],
                 lba=int.from_bytes(d[28:34], "little"), datalen=len(d) - 36)
    elif r["cmd"] == 1 and len(d) >= 32:
        n = be(d[30:32])
        r.update(bufcnt=be(d[24:26]), fw=be(d[26:28]), scnt=d[28], aoever=d[29] >> 4,
                 ccmd=d[29] & 15, cfglen=n, cfg=d[32:32 + n])
    return r

def num(s):
    if s in (None, ""):
        return None
    if s in ("True", "False"):
        return int(s == "True")
    return int(s, 0)

def from_tshark(t):
    """values as decoded by Wireshark's AoE dissector (None where it has none)"""
    v = {"ver": num(t.get("aoe.version")), "err": num(t.get("aoe.error")),
         "major": num(t.get("aoe.major")), "minor": num(t.get("aoe.minor")),
         "cmd": num(t.get("aoe.cmd")), "tag": num(t.get("aoe.tag")),
         "dst": t.get("eth.dst") or None, "src": t.get("eth.src") or None}
    rsp, efl = num(t.get("aoe.response")), num(t.get("aoe.flags_error"))
    v["flags"] = None if rsp is None or efl is None else (8 * rsp + 4 * efl)
    # tshark 4.0 shows only some AFlags bits (E, W; D and A only for some
    # commands), so aflags itself is taken from the raw byte and the bits
    # tshark does show are cross-checked
    v["aflag_bits"] = {m: num(t.get("aoe.aflags." + b))
                       for b, m in (("e", 0x40), ("d", 0x10), ("a", 0x02), ("w", 0x01))}
    v["errfeat"] = num(t.get("aoe.err_feature"))
    v["scnt"] = num(t.get("aoe.sector_count"))
    v["lba"] = num(t.get("aoe.lba"))
    if rsp == 1:
        v["cmdstat"] = num(t.get("aoe.ata.status"))
    elif rsp == 0:
        v["cmdstat"] = num(t.get("aoe.ata.cmd"))
    return v

HEX = {"flags", "aflags", "errfeat", "cmdstat", "major", "minor", "fw", "lba"}
def fmt(k, v):
    if k == "tag":
        return "0x%08x" % v
    if k == "major":
        return "0x%04x" % v
    if k == "minor":
        return "0x%02x" % v
    if k == "fw":
        return "0x%04x" % v
    if k in HEX:
        return "0x%x" % v
    if k == "cfg":
        if all(0x20 <= c < 0x7F and c not in (0x22, 0x5C) for c in v):
            return '"%s"' % v.decode()
        return "0x" + v.hex()
    return str(v)

def load_steps():
    steps = []
    with open(steps_file) as f:
        for line in f:
            t0, t1, tool, variant, cmd = line.rstrip("\n").split("\t")
            steps.append((float(t0), float(t1), tool, variant, cmd))
    return steps

entries, names = [], {}

def process(path, steps, label):
    rows = fields(path)
    last_req = {}           # tag -> (kind, atacmd)
    # pre-select with tshark's fields only (the kernel capture has ~50k frames):
    # per step, the first 2 frames of each (cmd, direction, error, ATA cmd,
    # feature, broadcast, length) class, plus the request each kept response answers
    chosen, seen, req_row = [], {}, {}
    for t in rows:
        n, ts = int(t["frame.number"]), float(t["frame.time_epoch"])
        step = None
        for s in steps:
            if s[0] <= ts <= s[1] + 0.05:
                step = s
        if step is None:
            continue
        key = (step, t["aoe.cmd"], t["aoe.response"], t["aoe.flags_error"], t["aoe.error"],
               t["aoe.ata.cmd"], t["aoe.ata.cmd"] == "0xb0" and t["aoe.err_feature"],
               t["aoe.major"], t["frame.len"], t["aoe.version"])
        if t["aoe.response"] in ("0", "False"):
            req_row[t["aoe.tag"]] = (n, t, step)
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > 2:
            continue
        if t["aoe.response"] not in ("0", "False") and t["aoe.tag"] in req_row:
            chosen.append(req_row[t["aoe.tag"]])
        chosen.append((n, t, step))
    chosen = sorted({c[0]: c for c in chosen}.values(), key=lambda c: c[0])
    raws = raw_frames(path, [c[0] for c in chosen])
    for n, t, (t0, t1, tool, variant, cmd) in chosen:
        d = raws[n]
        r = decode_raw(d)
        resp = bool(r["flags"] & 8)
        tag = r["tag"]
        kind = None
        if r["cmd"] == 1 and "ccmd" in r:
            if not resp:
                kind = "config_" + CCMDS.get(r["ccmd"], "ccmd%d" % r["ccmd"])
                if r["major"] == 0xFFFF and r["minor"] == 0xFF:
                    kind += "_broadcast"
                last_req[tag] = (kind.replace("_broadcast", ""), None, d)
            else:
                req = last_req.get(tag)
                if req is None:
                    kind = "config_announcement"
                else:
                    kind = req[0]
                    if r["cfglen"] == 0:
                        kind += "_empty"
                    if r["flags"] & 4:
                        kind += "_error%d" % r["err"]
        elif r["cmd"] == 0 and "aflags" in r:
            if not resp:
                kind = "ata_" + ATA_CMDS.get(r["cmdstat"], "cmd%02x" % r["cmdstat"])
                if r["cmdstat"] == 0xB0:
                    kind += "_" + SMART.get(r["errfeat"], "feature%02x" % r["errfeat"])
                last_req[tag] = (kind, r["cmdstat"], d)
            else:
                req = last_req.get(tag)
                kind = req[0] if req else "ata_unsolicited"
                if r["cmdstat"] & 0x01:
                    kind += "_abort"
                if r["flags"] & 4:
                    kind += "_error%d" % r["err"]
        else:
            kind = "cmd%d" % r["cmd"]
        if resp:
            name = kind + "_response_vblade" if kind != "config_announcement" else "config_announcement_vblade"
            if variant == "smart" and kind.startswith("ata_identify"):
                continue        # modified by the relay (SMART bit), never a vector
        else:
            name = kind + "_request_" + tool.replace("-", "")
        base = name
        if base in names:
            if not resp and variant and variant != "smart" and kind.startswith("config"):
                name = base + "_" + variant
            elif not resp and "identify" in kind and len(d) not in names[base]:
                name = base + "_len%d" % len(d)
        if name in names:
            continue
        names.setdefault(base, set()).add(len(d))
        names.setdefault(name, set()).add(len(d))

        tv = from_tshark(t)
        keys = ["dst", "src", "ver", "flags", "err", "major", "minor", "cmd", "tag"]
        if "aflags" in r:
            keys += ["aflags", "errfeat", "scnt", "cmdstat", "lba", "datalen"]
        elif "ccmd" in r:
            keys += ["bufcnt", "fw", "scnt", "aoever", "ccmd", "cfglen", "cfg"]
        vals, src_t, src_r, notes = [], [], [], []
        for k in keys:
            tvv = tv.get(k)
            if tvv is not None:
                if tvv != r[k]:
                    notes.append("tshark %s=%s but raw bytes give %s" % (k, fmt(k, tvv), fmt(k, r[k])))
                vals.append("%s=%s" % (k, fmt(k, tvv)))
                src_t.append(k)
            else:
                vals.append("%s=%s" % (k, fmt(k, r[k])))
                src_r.append(k)
        if "aflags" in r:
            checked = []
            for m, b in tv["aflag_bits"].items():
                if b is None:
                    continue
                checked.append({0x40: "E", 0x10: "D", 0x02: "A", 0x01: "W"}[m])
                if bool(r["aflags"] & m) != bool(b):
                    notes.append("tshark aflags bit 0x%x=%d but raw aflags=0x%x" % (m, b, r["aflags"]))
            if checked:
                src_r[src_r.index("aflags")] = "aflags(bits %s match tshark)" % "".join(checked)
        vals.append("len=%d" % len(d))
        src_r.append("len")
        # observations
        if len(d) < 60:
            notes.append("runt: %d bytes, shorter than the 60-byte Ethernet minimum (not padded)" % len(d))
        if r["flags"] & 3:
            notes.append("flags MBZ bits set: 0x%x" % (r["flags"] & 3))
        if r["ver"] != 1:
            notes.append("AoE version nibble is %d, not 1 (tshark stops dissecting)" % r["ver"])
        if "aflags" in r and r["aflags"] & 0xAC:
            notes.append("aflags MBZ bits set: 0x%x" % (r["aflags"] & 0xAC))
        if "ccmd" in r:
            end = 32 + r["cfglen"]
            if end < len(d):
                tail = d[end:]
                what = "all zero" if not any(tail) else "NOT zero (uninitialised sender memory)"
                notes.append("%d bytes after the config string (%s)" % (len(tail), what))
            elif end > len(d):
                notes.append("cfglen %d exceeds the frame" % r["cfglen"])
        req = last_req.get(tag) if resp else None
        if "aflags" in r and resp and 0 < r["datalen"] < 512:
            note = "%d bytes after the ATA header although no data is returned" % r["datalen"]
            if req and req[2][36:len(d)] == d[36:]:
                note += "; they equal the request's bytes %d..%d" % (36, len(d) - 1)
                if r["flags"] & 8 and req[2][36:len(d)] and len(d) == 60:
                    note += " (vblade answers in the request buffer with a fixed 60-byte length)"
            note += " (all zero)" if not any(d[36:]) else " (not zero)"
            notes.append(note)
        if "aflags" in r and r["datalen"] and not (r["aflags"] & 1) and not resp:
            what = "all zero" if not any(d[36:]) else "not zero"
            notes.append("%d data bytes on a non-write request (%s)" % (r["datalen"], what))
        direction = ("vblade -> %s" % ("initiator" if tool != "linux" else "Linux initiator")) if resp \
            else ("%s -> %s" % (tool if tool != "linux" else "Linux initiator", "vblade"))
        if r["dst"] == "ff:ff:ff:ff:ff:ff":
            direction += " (dst ff:ff:ff:ff:ff:ff)"
        origin = "vblade startup" if name == "config_announcement_vblade" else cmd
        e = ["== " + name,
             "# from: %s, %s [%s frame %d]" % (origin, direction, label, n)]
        if name == "config_announcement_vblade":
            e.append("# note: unsolicited Query Config response broadcast by vblade when it starts")
        if variant == "smart" and not resp:
            e.append("# note: sent after the relay set IDENTIFY word 82 bit 0 (aoeping checks it); frame unmodified")
        for note in notes:
            e.append("# note: " + note)
        e.append("# expect: " + " ".join(vals))
        e.append("# decoded-by: tshark %s; raw bytes %s" % (",".join(src_t), ",".join(src_r)))
        for i in range(0, len(d), 16):
            e.append(" ".join("%02x" % b for b in d[i:i + 16]))
        entries.append("\n".join(e))

process(pcap, load_steps(), "aoetools.pcapng")
if kpcap:
    process(kpcap, [(0.0, 1e12, "linux", "", "Linux aoe driver (guest: discovery, blkdev reads, dd writes)")],
            "kernel.pcap")

print(header)
if knote:
    print("# Kernel frames: " + knote + ".")
print("""# Format: '== name' starts an entry; '# from:' tool, direction, source capture and frame number;
# '# note:' observations; '# expect:' decoded fields as key=value (0x.. = hex, else decimal; cfg is
# a quoted string or 0x-hex; datalen = bytes after the 36-byte ATA header incl. any padding;
# len = frame length without FCS); '# decoded-by:' which keys come from Wireshark's AoE dissector
# (aoe.* fields) and which were decoded from the raw bytes (tshark 4.0 does not dissect Query Config
# arguments nor frames whose version nibble is not 1); then all bytes of the frame, 16 per line.
# MACs: vblade 02:00:00:a0:e0:73, aoetools 02:00:00:a0:e0:01 (kernel run: see the frames).""")
for e in entries:
    print()
    print(e)
PY
python3 "$WORK/vectors.py" "$PCAP" "$STEPS" "${KERNEL_PCAP:-}" "$HEADER" "$KNOTE" >"$OUT.tmp" \
    && mv "$OUT.tmp" "$OUT" || { rm -f "$OUT.tmp"; say "vector generation failed"; exit 1; }
say "wrote $OUT ($(grep -c '^== ' "$OUT") frames)"
