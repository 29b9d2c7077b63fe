//! Interop: the Linux kernel's own AoE initiator (`aoe.ko` from Debian's linux-image-6.1, in
//! a qemu/TCG guest) against `aoe serve`, at MTU 1500, 9000 and 65521 (a TAP's largest),
//! with vblade as the control.
//!
//! The work is done by `tests/interop/kernel-initiator.sh` (see its header): it builds the
//! guest, joins the guest's TAP and a veth to the target with a bridge inside a network
//! namespace of its own, and checks discovery, the payload size the MTU allows, whole-device
//! md5s and a 1 MiB O_DIRECT pattern write at an offset, in the guest and in the backing file.
//! Here we only run it and insist on PASS, printing its whole output otherwise.
//!
//! Needs root, qemu-system-x86, busybox-static (scripts/install-deps.sh), and the first run
//! downloads the kernel package into `${AOE_CACHE:-/var/tmp/aoe-test-cache}`.

use std::path::PathBuf;
use std::time::Duration;

use aoe_testkit::{require_root, require_tools, run_script};

/// The script's own hard timeout (`-T`); it cleans up and fails when it is hit.
const SCRIPT_TIMEOUT_S: u64 = 600;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/interop/kernel-initiator.sh")
}

/// Runs the script with `template` at `mtu`; panics with its output unless it passes.
fn run_kernel_initiator(template: &str, mtu: u32) {
    run_kernel_initiator_with(template, mtu, &[]);
}

/// [`run_kernel_initiator`] with `extra` options for the script (e.g. `-r POOL/IMAGE`).
fn run_kernel_initiator_with(template: &str, mtu: u32, extra: &[&str]) {
    require_root();
    let script = script();
    let mut args = vec!["-t", template, "-m"];
    let mtu = mtu.to_string();
    let timeout = SCRIPT_TIMEOUT_S.to_string();
    args.extend([mtu.as_str(), "-T", timeout.as_str()]);
    args.extend_from_slice(extra);
    let run = run_script(&script, &args, Duration::from_secs(SCRIPT_TIMEOUT_S));
    let took = run.took.as_secs_f32();
    assert!(
        run.passed(),
        "kernel initiator vs `{template}` at MTU {mtu}: {} after {took:.0}s\n{}",
        run.verdict(),
        run.output
    );
    eprintln!("kernel initiator vs `{template}` at MTU {mtu}: PASS in {took:.1}s");
}

fn aoe_serve_template() -> String {
    let aoe = env!("CARGO_BIN_EXE_aoe");
    assert!(!aoe.contains('\''), "binary path {aoe} contains a quote");
    format!("'{aoe}' serve {{SHELF}} {{SLOT}} {{IFACE}} {{FILE}}")
}

#[test]
fn kernel_initiator_aoe_serve_mtu_1500() {
    run_kernel_initiator(&aoe_serve_template(), 1500);
}

#[test]
fn kernel_initiator_aoe_serve_mtu_9000() {
    run_kernel_initiator(&aoe_serve_template(), 9000);
}

/// Issue 15, frames above MTU 9000: 65521 is the largest MTU a TAP device takes (tun.c:
/// `max_mtu = 65535 - ETH_HLEN`; `ip link set ... mtu 65535` on the guest's TAP fails with
/// "mtu greater than device maximum"), and the guest's virtio-net takes it too (no
/// `host_mtu` needed: without VIRTIO_NET_F_MTU its limit is 65535). The driver reads and
/// writes 127 sectors (65,024 bytes) a frame, the script checks that payload.
#[test]
fn kernel_initiator_aoe_serve_mtu_65521() {
    run_kernel_initiator(&aoe_serve_template(), 65521);
}

/// Session 18 made a reload (SIGHUP, `aoe serve --config`) keep write order across a reopen
/// of an export; this is the Linux driver writing through reloads. The script's `-R` mode:
/// the guest rewrites a 4 MiB region with `dd oflag=direct` in sector-stamped passes for at
/// least [`RELOAD_WRITE_S`] s, then once more with the final pass, while the host rewrites
/// the configuration and sends SIGHUP, one reload after another (each reopens the written
/// export, its buffer count changed; every second one adds or removes a second export). At
/// least 3 reloads must be done during the writes, and every sector of the region must hold
/// the final pass, read back in the guest (O_DIRECT) and in the host file after the target
/// stopped; the whole device's md5 too, in the guest and on the host.
#[test]
fn kernel_initiator_writes_through_reloads_mtu_1500() {
    let aoe = env!("CARGO_BIN_EXE_aoe");
    assert!(!aoe.contains('\''), "binary path {aoe} contains a quote");
    let template = format!("'{aoe}' serve --config {{CONFIG}}");
    let secs = RELOAD_WRITE_S.to_string();
    run_kernel_initiator_with(&template, 1500, &["-R", secs.as_str()]);
}

/// How long the guest of [`kernel_initiator_writes_through_reloads_mtu_1500`] keeps writing
/// while the host reloads.
const RELOAD_WRITE_S: u64 = 20;

/// Audit (s22): the Linux driver writing to an export whose file system fills. The script's
/// `-F` mode: the backing file on a tmpfs of its own, the pattern region a hole and 256 KiB
/// left free; the guest writes the pattern 64 KiB at a time with `dd oflag=direct`: the
/// writes that fit are acknowledged and read back as written, the one that finds no space
/// fails in the guest (the target's ENOSPC is an ATA error, never an acknowledgement); then
/// the host frees the space and the whole pattern is written again, and every check of the
/// script holds (whole-device md5s in the guest and in the file). Passed at once with
/// `aoe serve`, `-d`, `-s` and `--config` (TCG, ~20 s each on a quiet machine).
#[test]
fn kernel_initiator_full_disk_fails_the_write_then_recovers_mtu_1500() {
    run_kernel_initiator_with(&aoe_serve_template(), 1500, &["-F"]);
}

/// Audit (s22), the fourth audit's Left item: the Linux driver against a target restarted
/// smaller. The script's `-S` mode: after its checks the host stops `aoe serve`, cuts the
/// file by 8 MiB and starts it again; the guest's idle device must take the new size (from
/// the target's announcement: the driver re-IDENTIFYs a device that is not open on a
/// config answer, `aoecmd_cfg_rsp`), read its new last sector, and read whole as the file
/// holds it.
#[test]
fn kernel_initiator_target_restarted_smaller_mtu_1500() {
    run_kernel_initiator_with(&aoe_serve_template(), 1500, &["-S"]);
}

/// Audit (s22): `aoe serve` stopped (SIGSTOP) for longer than the driver's `aoe_deadsecs`
/// under a write, then continued. The script's `-P` mode: the driver loaded with
/// `aoe_deadsecs=10`; the guest's write of zeros over the region fails with EIO and the
/// device goes down; after SIGCONT the target runs what it had queued, the guest
/// rediscovers the device and writes the pattern, and every check holds: none of the stale
/// zeros landed over it.
#[test]
fn kernel_initiator_target_stopped_past_deadsecs_mtu_1500() {
    run_kernel_initiator_with(&aoe_serve_template(), 1500, &["-P"]);
}

/// Sixteenth audit (s33): the target's veth pair deleted and made again (a new index and a
/// new MAC) while the guest streams its pattern writes. The script's `-N recreate` mode:
/// `aoe serve` must take the new interface (its old socket is unbound for good) and
/// announce itself from the new MAC, and the driver moves its frames to the new target MAC;
/// no write may fail and every check holds. Base (503bd55): the target never answered on
/// the new link and the guest's write stalled past its step's 60 s budget.
#[test]
fn kernel_initiator_target_veth_made_again_mid_stream_mtu_1500() {
    run_kernel_initiator_with(&aoe_serve_template(), 1500, &["-N", "recreate"]);
}

/// Sixteenth audit (s33): the target's interface given a new MAC address while the guest
/// streams its pattern writes (`-N mac`): `aoe serve` answers from the new address and
/// announces it, and the driver moves its frames to the new target MAC (168 retransmits
/// in the first run). A pin, not a regression test: base passes too (0 retransmits), since
/// a veth hands frames for its old address to packet sockets and base answered from that
/// address; on a NIC that filters by address base would answer nothing.
#[test]
fn kernel_initiator_target_mac_changed_mid_stream_mtu_1500() {
    run_kernel_initiator_with(&aoe_serve_template(), 1500, &["-N", "mac"]);
}

/// Eighteenth audit (s35): the target's interface renamed (`kitgt` to `kitgtR`) for 4 s and
/// back while the guest streams its pattern writes (the script's `-N rename`; the guest
/// writes for 16 s and the host checks the rename was done before the last write). The
/// interface keeps its index and MAC, and `aoe serve`'s socket follows the index: no write
/// may fail, no "I/O error" may be in the guest's dmesg, and every check holds. A guard, not
/// a regression test: the base (44c48b4) passes it (281 writes, 6 retransmits); vblade
/// passes it too (222 writes, no retransmit: its socket is bound by index as well).
#[test]
fn kernel_initiator_target_interface_renamed_mid_stream_mtu_1500() {
    run_kernel_initiator_with(&aoe_serve_template(), 1500, &["-N", "rename"]);
}

/// Eighteenth audit (s35): the target's interface moved to another network namespace for
/// 4 s and back (`-N netns`) while the guest streams its writes: moving out unregisters it
/// (the kernel unbinds the packet socket for good) and it comes back with the same index
/// and MAC. `aoe serve` must open it again and answer; the driver retransmits meanwhile:
/// no write may fail, no "I/O error" in the guest's dmesg, every check holds. Passes on the
/// base (44c48b4, session 34's fix: 143 writes, 60 retransmits); fails on the code before
/// that fix (`/tmp/aoe-s34-base`: "step pattern_write took more than its budget of 60 s":
/// the target never answers again). vblade, the control, exits ("read network: Network is
/// down") and the run fails with "target died during the run".
#[test]
fn kernel_initiator_target_interface_moved_to_another_namespace_and_back_mid_stream_mtu_1500() {
    run_kernel_initiator_with(&aoe_serve_template(), 1500, &["-N", "netns"]);
}

/// Eighteenth audit (s35), multipath with the Linux driver (the script's `-M`): the guest
/// has two NICs on two bridges, and one `aoe serve --config` serves the export on an
/// interface on each, so the driver sees one device with two targets (two MACs, an `aoetgt`
/// each with one interface in its `ifs[]`; checked in its debugfs before the writes).
/// `-M target`: the target's second interface is set down for 12 s (past the driver's
/// `HARD_SCORN_SECS`, 10: it scorns the silent target and moves its frames to the other)
/// while the guest streams its writes, then up (`aoe serve` sees both link events and
/// announces itself there again). No write may fail, no "I/O error" in the guest's dmesg,
/// every check holds, and the driver must use the second path again: from 10 s after its
/// return to the end of the writes, at least a quarter as many frames on the target's
/// second interface as on its first. A guard: the base (44c48b4) passes, as it does with two
/// `aoe serve` processes on one file (one per interface) and with the guest's second tap
/// cut instead (`-M tap`), and two vblades pass `-M tap` (docs/TEST-AUDIT.md, session 35).
#[test]
fn kernel_initiator_multipath_target_interface_down_12s_one_aoe_serve_on_both_mtu_1500() {
    let aoe = env!("CARGO_BIN_EXE_aoe");
    assert!(!aoe.contains('\''), "binary path {aoe} contains a quote");
    let template = format!("'{aoe}' serve --config {{CONFIG}}");
    run_kernel_initiator_with(&template, 1500, &["-M", "target"]);
}

/// `-M shared`: both of the guest's NICs on one bridge with the target's one interface, so
/// the driver has one target (one MAC) with both NICs in its `ifs[]` (checked in its
/// debugfs); the guest's second tap is cut for 12 s under the writes, then back. The
/// assertions of the test above, the frames counted on the guest's two taps. A guard: the
/// base passes (the driver kept eth1 in the target's `ifs[]` and sent as many frames on it
/// as on eth0 in the first 10 s back).
#[test]
fn kernel_initiator_multipath_one_target_through_two_guest_nics_one_cut_12s_mtu_1500() {
    run_kernel_initiator_with(&aoe_serve_template(), 1500, &["-M", "shared"]);
}

/// Ninth audit (s26): the Linux driver at the ends of LBA28 and 32-bit sector numbers on a
/// disk past 2 TiB. The script's `-L` mode: a sparse backing file of 2^32 + 16387 sectors
/// (8 MiB of random data, then a hole); the guest sees its size, writes 16 sectors of the
/// pattern with `dd oflag=direct` across sector 2^28, across 2^32 and ending at the last
/// sector, reads each back past the page cache, and a write past the end fails; the host
/// finds each piece at its offset in the file and no data anywhere else past the first
/// 8 MiB. Passed at once with `aoe serve` (23 s) and vblade (`-L 2^28 + 1000`, MTU 1500).
#[test]
fn kernel_initiator_large_sparse_disk_ends_mtu_9000() {
    let sectors = ((1u64 << 32) + 16387).to_string();
    run_kernel_initiator_with(&aoe_serve_template(), 9000, &["-z", "8", "-L", &sectors]);
}

/// Eleventh audit (s28): `aoe serve -d` over a file on ext4 on a loop device with 4096-byte
/// logical sectors (the script's `-X`), the file 2^28 + 1003 sectors long (`-L`), so its
/// last three sectors lie in a partial 4 KiB block. The guest writes 16 sectors of the
/// pattern across 2^28 and ending at the last sector and reads each back past the page
/// cache. On the code before, every request touching the partial block got an ATA error
/// (the guest: `aoe: ata error cmd=34h stat=41h`, `I/O error, dev etherd/e1.1, sector
/// 268436456`; FAIL "-L: 16 sectors at 268436443 read back as ..."); 17-20 s.
#[test]
fn kernel_initiator_direct_export_on_4kn_ending_in_a_partial_block_mtu_9000() {
    let aoe = env!("CARGO_BIN_EXE_aoe");
    assert!(!aoe.contains('\''), "binary path {aoe} contains a quote");
    let template = format!("'{aoe}' serve -d {{SHELF}} {{SLOT}} {{IFACE}} {{FILE}}");
    let sectors = ((1u64 << 28) + 1003).to_string();
    run_kernel_initiator_with(&template, 9000, &["-z", "8", "-L", &sectors, "-X"]);
}

/// Twelfth audit (s29): the Linux driver and our initiator on one export (the script's
/// `-I`): `aoe serve -d` over a file on ext4 on a 4096-byte-sector loop (`-X`, so the guest's
/// and ours' 512-byte writes are read-modify-written), ours on its own bridge port. The
/// host writes a second 1 MiB pattern through ours in 64 KiB O_DIRECT pieces, each
/// fsynced, while the guest writes its own pattern over and over; then one sector written
/// by ours, by the guest (synced) and by ours again: each must read, through the other
/// initiator and in the file, as the one acknowledged last; and ours reads the guest's
/// pattern. A pin, not a regression test: the base build (1994e57) passes it too (by hand,
/// with `-d -X`; buffered, `-s`, MTU 9000 and vblade as the target pass as well); ~30 s.
#[test]
fn kernel_initiator_beside_our_initiator_direct_export_on_4kn_mtu_1500() {
    let aoe = env!("CARGO_BIN_EXE_aoe");
    assert!(!aoe.contains('\''), "binary path {aoe} contains a quote");
    let template = format!("'{aoe}' serve -d {{SHELF}} {{SLOT}} {{IFACE}} {{FILE}}");
    run_kernel_initiator_with(&template, 1500, &["-X", "-I", aoe]);
}

/// The control: if this fails too, suspect the rig (or the kernel), not `aoe serve`.
#[test]
fn kernel_initiator_vblade_mtu_1500_control() {
    require_tools(&[("vblade", "vblade")]);
    run_kernel_initiator("vblade {SHELF} {SLOT} {IFACE} {FILE}", 1500);
}

/// Issue 13: the kernel driver against an RBD-backed export (`aoe serve ... rbd:rbd/ki`).
/// The script's `-r` mode starts a one-node Ceph cluster in its namespace, puts the random
/// data in with `rbd import` (the guest's whole-device md5 must match it), and checks the
/// pattern the guest wrote, and the whole image after it, in `rbd export` instead of a
/// backing file. Then the host grows the image with `rbd resize` and the guest's driver must
/// see the new size (from the target's announcement, or else after a write to
/// /dev/etherd/revalidate; the guest's console says which). Needs the `rbd` feature and the
/// Ceph packages (scripts/install-deps.sh).
#[cfg(feature = "rbd")]
#[test]
fn kernel_initiator_aoe_serve_rbd_mtu_1500() {
    let aoe = env!("CARGO_BIN_EXE_aoe");
    assert!(!aoe.contains('\''), "binary path {aoe} contains a quote");
    let template = format!(
        "'{aoe}' serve --ceph-conf {{CEPH_CONF}} --client-id admin \
         --keyring {{CEPH_KEYRING}} {{SHELF}} {{SLOT}} {{IFACE}} {{FILE}}"
    );
    run_kernel_initiator_with(&template, 1500, &["-r", "rbd/ki"]);
}

/// `aoe serve` on an RBD image with the Ceph options of the script's `-r` mode.
#[cfg(feature = "rbd")]
fn aoe_serve_rbd_template() -> String {
    let aoe = env!("CARGO_BIN_EXE_aoe");
    assert!(!aoe.contains('\''), "binary path {aoe} contains a quote");
    format!(
        "'{aoe}' serve --ceph-conf {{CEPH_CONF}} --client-id admin \
         --keyring {{CEPH_KEYRING}} {{SHELF}} {{SLOT}} {{IFACE}} {{FILE}}"
    )
}

/// Session 27, gateways of one RBD image handing over under the Linux driver (the script's
/// `-H`, see its header). `replace`: gateway A is SIGKILLed while the guest streams 64 KiB
/// O_DIRECT writes and gateway B (same image and shelf.slot, its own MAC on the bridge) is
/// started at once; B breaks the dead A's lock and announces itself, the driver adds it as
/// a second target of e1.1 and moves the frames A leaves unanswered to it: no write fails,
/// and `rbd export` holds every one.
#[cfg(feature = "rbd")]
#[test]
fn kernel_initiator_rbd_gateway_replaced_mid_stream_mtu_1500() {
    run_kernel_initiator_with(
        &aoe_serve_rbd_template(),
        1500,
        &["-r", "rbd/ki", "-H", "replace"],
    );
}

/// `-H move`: B is started while A serves the guest's stream. B breaks A's lock (A is
/// blocklisted), A fences itself and stops answering for the export, B's duplicate probe
/// waits until A is silent and announces; the driver moves to B with no error to the
/// guest's writer (before session 27 A answered with ATA errors: the guest's dd failed with
/// EIO while B served), and `rbd export` holds every write.
#[cfg(feature = "rbd")]
#[test]
fn kernel_initiator_rbd_gateway_moved_while_serving_mtu_1500() {
    run_kernel_initiator_with(
        &aoe_serve_rbd_template(),
        1500,
        &["-r", "rbd/ki", "-H", "move"],
    );
}

/// `-H idle`: B is started beside an idle A before the guest boots (A has no write to be
/// refused and notices through its watch); the guest finds the device through B alone, its
/// writes and every check hold, and the reservation made through A holds on B.
#[cfg(feature = "rbd")]
#[test]
fn kernel_initiator_rbd_gateway_moved_while_idle_mtu_1500() {
    run_kernel_initiator_with(
        &aoe_serve_rbd_template(),
        1500,
        &["-r", "rbd/ki", "-H", "idle"],
    );
}

/// `-H alone`: B breaks A's lock but serves another address, so nobody serves the guest's
/// once A is fenced: a write fails (EIO once `aoe_deadsecs`, 10 s here, ran out: an error,
/// not a hang); A restarted takes the lock back, the guest rediscovers the device and its
/// pattern write and every check holds.
#[cfg(feature = "rbd")]
#[test]
fn kernel_initiator_rbd_fenced_gateway_alone_fails_the_write_mtu_1500() {
    run_kernel_initiator_with(
        &aoe_serve_rbd_template(),
        1500,
        &["-r", "rbd/ki", "-H", "alone"],
    );
}

/// Seventh audit (docs/TEST-AUDIT.md), the bad range the fifth and sixth audits left: the
/// Linux driver against `aoe serve -d` on a file whose sectors 4099-4103 cannot be read. The
/// script's `-B` mode serves the file through nbdfuse and nbdkit's eval plugin (reads
/// overlapping the range fail with EIO); the guest reads each sector from 4096 to 4106
/// alone (O_DIRECT, `tests/interop/rd512.c`, built with gcc): exactly the bad ones must
/// fail (ATA error, EIO), the others read as the file holds them, and the rest of the script's checks hold with the pages of
/// the bad sectors left out of the whole-device md5s. On 092a751 sectors 4096-4098 failed
/// too: the direct export read the 4 KiB block around each request (FUSE reports no
/// `STATX_DIOALIGN`). 8 MiB at MTU 9000, as each request to the eval plugin is a shell.
#[test]
fn kernel_initiator_bad_range_fails_exactly_its_sectors_mtu_9000() {
    require_tools(&[
        ("nbdkit", "nbdkit"),
        ("nbdfuse", "libnbd-bin"),
        ("gcc", "gcc"),
    ]);
    let aoe = env!("CARGO_BIN_EXE_aoe");
    assert!(!aoe.contains('\''), "binary path {aoe} contains a quote");
    let template = format!("'{aoe}' serve -d {{SHELF}} {{SLOT}} {{IFACE}} {{FILE}}");
    run_kernel_initiator_with(&template, 9000, &["-B", "4099:5", "-z", "8"]);
}
