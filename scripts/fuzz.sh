#!/usr/bin/env bash
# fuzz.sh [SECONDS] [TARGET...] - build the cargo-fuzz targets in fuzz/ with libFuzzer
# coverage instrumentation on the stable toolchain (no sanitizer, so no nightly needed) and run
# each for SECONDS (default 60). Exit non-zero on a crash; the crashing input is kept in
# fuzz/artifacts/TARGET/. With cargo-fuzz and nightly, `cargo fuzz run TARGET` works too.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}; shift || true
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(parse_frame target_engine initiator_engine partition nbd_handshake nbd_transmission nbd_incoming)
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/fuzz/target}
# An explicit --target keeps the instrumentation flags away from build scripts.
host=$(rustc -vV | sed -n "s/^host: //p")
cargo build --release --manifest-path fuzz/Cargo.toml --bins -q --target "$host"
for t in "${targets[@]}"; do
    corpus=fuzz/corpus/$t; mkdir -p "$corpus" "fuzz/artifacts/$t"
    # Seed the frame corpus from the captured frames in the wire crate's test data.
    if { [ "$t" = parse_frame ] || [ "$t" = target_engine ]; } && [ -f crates/aoe-wire/testdata/captures.txt ] && [ -z "$(ls -A "$corpus")" ]; then
        python3 - "$corpus" "$t" <<'PY'
import sys, os, re
out, target = sys.argv[1], sys.argv[2]
frames, cur = [], []
for line in open("crates/aoe-wire/testdata/captures.txt"):
    line = line.strip()
    if line.startswith("=="):
        if cur: frames.append(bytes(cur))
        cur = []
    elif line and not line.startswith("#") and re.fullmatch(r"([0-9a-fA-F]{2}\s*)+", line):
        cur += [int(x, 16) for x in line.split()]
if cur: frames.append(bytes(cur))
for i, f in enumerate(frames):
    data = f if target == "parse_frame" else len(f).to_bytes(2, "big") + f
    open(os.path.join(out, "capture-%03d" % i), "wb").write(data)
PY
    fi
    # Seed the partition corpus with a DOS table and a GPT (flags, device size, then the
    # sectors; flag bit 0 has the target write the GPT's CRCs).
    if [ "$t" = partition ] && [ -z "$(ls -A "$corpus")" ]; then
        python3 - "$corpus" <<'PY'
import sys, os, struct
out = sys.argv[1]
def mbr(slots):
    s = bytearray(34 * 512)
    for i, (kind, start, n) in enumerate(slots):
        s[446 + 16 * i + 4] = kind
        s[446 + 16 * i + 8:446 + 16 * i + 16] = struct.pack("<II", start, n)
    s[510:512] = b"\x55\xaa"
    return s
cap = 1 << 20
dos = mbr([(0x83, 2048, 4096), (0, 0, 0), (0x05, 8192, 100), (0x83, 6144, 2048)])
gpt = mbr([(0xee, 1, 0xffffffff)])
gpt[512:600] = struct.pack("<8sIIII QQQQ16s QII", b"EFI PART", 0x10000, 92, 0, 0,
                           1, cap - 1, 34, cap - 34, b"\0" * 16, 2, 128, 128)
for i, (first, last) in enumerate([(2048, 4095), (4096, cap - 34)]):
    e = 1024 + 128 * i
    gpt[e] = 0xaf
    gpt[e + 32:e + 48] = struct.pack("<QQ", first, last)
for name, flags, img in (("dos", 0, dos), ("gpt", 1, gpt)):
    open(os.path.join(out, name), "wb").write(bytes([flags]) + struct.pack("<Q", cap) + bytes(img))
PY
    fi
    # Seed the NBD corpora: a handshake (flags, LIST, INFO, GO on e7.3) and a session
    # (structured, 64 MiB: a read, a write with its payload, a flush, a disconnect); the
    # stream cutter's: pieces of 7 bytes, payloads up to 1 KiB kept, a kept and a skipped write.
    if { [ "$t" = nbd_handshake ] || [ "$t" = nbd_transmission ] || [ "$t" = nbd_incoming ]; } \
        && [ -z "$(ls -A "$corpus")" ]; then
        python3 - "$corpus" "$t" <<'PY'
import sys, os, struct
out, target = sys.argv[1], sys.argv[2]
IHAVEOPT, REQ = 0x49484156454F5054, 0x25609513
def opt(o, d=b""): return struct.pack(">QII", IHAVEOPT, o, len(d)) + d
def info(name): return struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 1)
def req(kind, off, n, flags=0, cookie=7): return struct.pack(">IHHQQI", REQ, flags, kind, cookie, off, n)
if target == "nbd_handshake":
    data = struct.pack(">I", 3) + opt(3) + opt(8) + opt(6, info(b"e7.3")) + opt(7, info(b"e7.3"))
elif target == "nbd_incoming":
    data = bytes([6, 2]) + req(0, 4096, 1024) + req(1, 0, 512, 1) + b"\xab" * 512 \
        + req(1, 0, 2048) + b"\xcd" * 2048 + req(3, 0, 0) + req(2, 0, 0)
else:
    data = bytes([0x05]) + struct.pack(">Q", 64 << 20) + req(0, 4096, 1024) \
        + req(1, 0, 512, 1) + b"\xab" * 512 + req(3, 0, 0) + req(2, 0, 0)
open(os.path.join(out, "seed"), "wb").write(data)
PY
    fi
    # Inputs that once failed (fuzz/regressions/TARGET-*) must pass before fuzzing.
    regressions=(fuzz/regressions/"$t"-*)
    if [ -e "${regressions[0]}" ]; then
        echo "fuzz: $t regressions: ${regressions[*]}"
        if ! out=$("$CARGO_TARGET_DIR/$host/release/$t" "${regressions[@]}" 2>&1); then
            echo "$out" | grep -v '^ *[0-9]*: \|^ *at ' | tail -n 20
            echo "fuzz: $t: a regression input fails" >&2
            exit 1
        fi
    fi
    echo "fuzz: $t for ${secs}s"
    "$CARGO_TARGET_DIR/$host/release/$t" -max_total_time="$secs" -print_final_stats=1 \
        -artifact_prefix="fuzz/artifacts/$t/" "$corpus" 2>&1 | tail -n 4
done
