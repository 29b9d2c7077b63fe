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
    let cfg = Config {
        fence_writes: true,
        ..Config::default()
    };
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
