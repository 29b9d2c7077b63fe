//! Late copies of writes (issue 14, integrity): W1's first copy is delayed in the network
//! past its retransmission, the copy (a fresh tag) is answered and W1 completes, the
//! application writes W2 to the same sectors. If W2 went out at once, W1's original could
//! still arrive after it and be executed: the target cannot tell it from a new write (its
//! tag is not W2's, nor the copy's), and W2, acknowledged, would be lost. So W2 waits until
//! every copy of W1 is answered or presumed gone (`Engine::fences`); other I/O goes on.

use super::*;

fn tag_of(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[20..24].try_into().unwrap())
}

fn is_write(frame: &[u8]) -> bool {
    frame[27] == 0x34 || frame[27] == 0x30
}

/// W1 to LBA 0: its first copy goes unanswered (delayed in the network), the timer sends a
/// second with a fresh tag, which is answered: W1 completes. Returns the engine, the time,
/// and W1's first frame (still "in the network").
fn w1_completed_on_its_copy() -> (Engine, Instant, Vec<u8>) {
    w1_completed_on_its_copy_with(Config {
        fence_writes: true,
        ..Config::default()
    })
}

fn w1_completed_on_its_copy_with(cfg: Config) -> (Engine, Instant, Vec<u8>) {
    let (mut e, t0) = up_engine_with(cfg, 1000, true);
    e.submit(
        t0,
        DEV,
        BlockOp::Write {
            lba: 0,
            data: vec![0xaa; 512],
        },
    )
    .unwrap();
    let tx = drain(&mut e, t0);
    assert_eq!(tx.len(), 1);
    let original = tx[0].1.clone();
    let deadline = e.poll_timeout().unwrap();
    e.handle_timeout(deadline);
    let tx = drain(&mut e, deadline);
    let copy = tx
        .iter()
        .find(|(_, f)| is_write(f) && req_lba(f) == 0)
        .expect("W1 retransmitted")
        .1
        .clone();
    assert_ne!(tag_of(&copy), tag_of(&original));
    let now = deadline + ms(1);
    e.handle_frame(now, 0, &ata_rsp(&copy, TMAC, status::DRDY, 0, &[]));
    assert_eq!(completions(&mut e), vec![Ok(None)], "W1 completed");
    (e, now, original)
}

/// Regression: before the fences W2 went out at once, and W1's delayed original, executed
/// after it, put W1's data back (the test saw the W2 frame in the first drain).
#[test]
fn overlapping_write_waits_while_an_earlier_copy_may_still_arrive() {
    let (mut e, now, original) = w1_completed_on_its_copy();
    // A read of W1's sectors does not wait for the fence: a late copy of W1 writes what it
    // reads anyway.
    e.submit(now, DEV, BlockOp::Read { lba: 0, sectors: 1 })
        .unwrap();
    e.submit(
        now,
        DEV,
        BlockOp::Write {
            lba: 0,
            data: vec![0xbb; 1024],
        },
    )
    .unwrap();
    // Non-overlapping I/O queued behind W2 is not held up.
    e.submit(
        now,
        DEV,
        BlockOp::Write {
            lba: 10,
            data: vec![0xcc; 512],
        },
    )
    .unwrap();
    let tx = drain(&mut e, now);
    assert!(
        !tx.iter().any(|(_, f)| is_write(f) && req_lba(f) == 0),
        "W2 sent while W1's original may still arrive"
    );
    assert!(tx.iter().any(|(_, f)| is_write(f) && req_lba(f) == 10));
    assert!(tx.iter().any(|(_, f)| !is_write(f) && req_lba(f) == 0));
    assert_eq!(e.stats().writes_fenced, 1);
    // The original arrives after all and is answered: it can no longer land later, so W2
    // goes out now, long before the original would be presumed gone.
    e.handle_frame(now, 0, &ata_rsp(&original, TMAC, status::DRDY, 0, &[]));
    let tx = drain(&mut e, now);
    assert!(
        tx.iter().any(|(_, f)| is_write(f) && req_lba(f) == 0),
        "W2 sent once the original was answered"
    );
}

#[test]
fn overlapping_write_goes_once_the_earlier_copy_is_presumed_gone() {
    let (mut e, now, original) = w1_completed_on_its_copy();
    e.submit(
        now,
        DEV,
        BlockOp::Write {
            lba: 0,
            data: vec![0xbb; 512],
        },
    )
    .unwrap();
    assert!(!drain(&mut e, now)
        .iter()
        .any(|(_, f)| is_write(f) && req_lba(f) == 0));
    // The timer wakes for the fence's end: a second (SILENT_HOLD) or the RTO after the
    // original was sent, whichever is longer.
    let mut t = now;
    let mut sent = false;
    for _ in 0..100 {
        let Some(at) = e.poll_timeout() else { break };
        t = at.max(t);
        e.handle_timeout(t);
        if drain(&mut e, t)
            .iter()
            .any(|(_, f)| is_write(f) && req_lba(f) == 0 && tag_of(f) != tag_of(&original))
        {
            sent = true;
            break;
        }
    }
    assert!(sent, "W2 never sent");
    let waited = t - now;
    assert!(
        waited >= ms(800) && waited <= ms(1500),
        "W2 waited {waited:?} for a copy presumed gone a second after it was sent"
    );
}

/// Overlapping ops keep their order behind a held-back write: a read of the sectors W2
/// covers, submitted after it, does not overtake it (it would read what W2 replaces).
#[test]
fn ops_overlapping_a_held_back_write_wait_behind_it() {
    let (mut e, now, _original) = w1_completed_on_its_copy();
    e.submit(
        now,
        DEV,
        BlockOp::Write {
            lba: 0,
            data: vec![0xbb; 4 * 512],
        },
    )
    .unwrap();
    // Sector 3 is W2's, not W1's: only the order keeps this read behind W2.
    e.submit(now, DEV, BlockOp::Read { lba: 3, sectors: 1 })
        .unwrap();
    let tx = drain(&mut e, now);
    assert!(!tx.iter().any(|(_, f)| req_lba(f) <= 3), "{}", tx.len());
}

/// Runs the engine's timer (answering nothing) until a write to LBA 0 other than
/// `original` goes out; returns when, or `None` if the timer stops or runs past `limit`.
fn timer_until_write_at_0(
    e: &mut Engine,
    from: Instant,
    original: &[u8],
    limit: Instant,
) -> Option<Instant> {
    let mut t = from;
    for _ in 0..1000 {
        let at = e.poll_timeout()?;
        t = at.max(t);
        if t > limit {
            return None;
        }
        e.handle_timeout(t);
        if drain(e, t)
            .iter()
            .any(|(_, f)| is_write(f) && req_lba(f) == 0 && tag_of(f) != tag_of(original))
        {
            return Some(t);
        }
    }
    None
}

/// A fence outlives its device going down: a copy sent before it may still reach the
/// target, and a write after the device is found again must wait for it as any other.
/// Regression: the fences were dropped with the device's I/O, so W2, written once the
/// device was back up, went out at once while W1's original could still land (the test saw
/// W2 in the first drain after the submit).
#[test]
fn a_fence_outlives_its_device_going_down() {
    let (mut e, now, original) = w1_completed_on_its_copy_with(Config {
        fence_writes: true,
        deadsecs: ms(300),
        ..Config::default()
    });
    let sent = now - ms(1);
    // A read nobody answers takes the device down after deadsecs.
    e.submit(
        now,
        DEV,
        BlockOp::Read {
            lba: 50,
            sectors: 1,
        },
    )
    .unwrap();
    drain(&mut e, now);
    let mut t = now;
    while !events(&mut e).contains(&Event::DeviceDown(DEV)) {
        t = e
            .poll_timeout()
            .expect("a timer while the read is out")
            .max(t);
        assert!(t < now + ms(600), "device never went down");
        e.handle_timeout(t);
        drain(&mut e, t);
    }
    // Found again: config answer, IDENTIFY, up.
    e.handle_frame(t, 0, &config_rsp(TMAC, DEV, 16, 2, 0));
    let tx = drain(&mut e, t);
    let ident = tx.iter().find(|(_, f)| f[27] == 0xec).expect("IDENTIFY");
    e.handle_frame(t, 0, &identify_rsp(&ident.1, 1000));
    assert!(events(&mut e).contains(&Event::DeviceUp(DEV)));
    assert!(
        t < sent + ms(900),
        "up again while W1's original may still land"
    );
    e.submit(
        t,
        DEV,
        BlockOp::Write {
            lba: 0,
            data: vec![0xbb; 512],
        },
    )
    .unwrap();
    assert!(
        !drain(&mut e, t)
            .iter()
            .any(|(_, f)| is_write(f) && req_lba(f) == 0),
        "W2 sent while W1's original, sent before the device went down, may still arrive"
    );
    // And the timer wakes for the fence's end: W2 goes a second after W1's original.
    let at = timer_until_write_at_0(&mut e, t, &original, t + ms(2000)).expect("W2 never sent");
    assert!(
        at >= sent + ms(950) && at <= sent + ms(1100),
        "W2 sent {:?} after W1's original",
        at - sent
    );
}

/// Overlapping writes queued together go one after another, each as soon as every copy of
/// the one before is answered or presumed gone: when each loses its first copy (a path
/// that drops it), each waits one fence (a second) and no more. This is what the
/// `initiator_engine` fuzz target's kept input (fuzz/regressions/
/// initiator_engine-s8-fence-liveness) does: seven overlapping writes over a path whose
/// MTU shrank drop every first copy, so the last completes seven seconds on; the fence's
/// wake-ups are all there (no stall), and the fuzz target's liveness check allows a wait
/// per fenced write since.
#[test]
fn overlapping_writes_each_wait_one_fence_for_a_lost_copy() {
    let (mut e, t0) = up_engine_with(
        Config {
            fence_writes: true,
            ..Config::default()
        },
        1000,
        true,
    );
    for i in 0..4u8 {
        e.submit(
            t0,
            DEV,
            BlockOp::Write {
                lba: 0,
                data: vec![i; 512],
            },
        )
        .unwrap();
    }
    let mut t = t0;
    let mut last_done = t0;
    let mut done = 0;
    let mut first_copies = std::collections::BTreeSet::new();
    let mut out: Vec<Vec<u8>> = drain(&mut e, t).into_iter().map(|x| x.1).collect();
    for _ in 0..200 {
        for f in std::mem::take(&mut out) {
            if !is_write(&f) {
                continue;
            }
            // The first copy of each write (by its data byte) is lost; the rest answered.
            if first_copies.insert(f[36]) {
                continue;
            }
            e.handle_frame(t, 0, &ata_rsp(&f, TMAC, status::DRDY, 0, &[]));
        }
        let n = completions(&mut e).len();
        if n > 0 {
            assert!(
                t - last_done <= ms(1100),
                "write {done} took {:?} after the one before",
                t - last_done
            );
            done += n;
            last_done = t;
        }
        if done == 4 {
            break;
        }
        out = drain(&mut e, t).into_iter().map(|x| x.1).collect();
        if out.is_empty() {
            t = e.poll_timeout().expect("a timer while writes wait").max(t);
            e.handle_timeout(t);
            out = drain(&mut e, t).into_iter().map(|x| x.1).collect();
        }
    }
    assert_eq!(done, 4);
    assert_eq!(e.stats().writes_fenced, 3);
    assert!(t - t0 >= ms(2900), "three waits of a second: {:?}", t - t0);
}
