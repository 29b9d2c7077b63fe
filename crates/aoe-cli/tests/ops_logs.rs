//! Issue 12, logs: a target that dies under a read made 448 `retransmit` lines in 10 s in
//! `aoe initiator`'s log. The log now carries at most a line per kind a second with the
//! count suppressed, and every retransmission is accounted for (logged or counted), while
//! the `err` stream keeps every line, as the Linux driver's `err` device does.

mod common;

use std::time::Duration;

use aoe_testkit::wait_until;
use common::*;

/// `(lines, retransmissions, suppressed)`: INFO log lines about retransmissions, those of
/// them that are one (the others are summaries of a burst), and the counts they carry.
fn info_retransmits(log: &str) -> (usize, usize, usize) {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("INFO") && l.contains("retransmit e"))
        .collect();
    let suppressed = lines
        .iter()
        .filter_map(|l| {
            let (_, r) = l.rsplit_once(" (")?;
            r.contains("similar line")
                .then(|| r.split_whitespace().next()?.parse::<usize>().ok())?
        })
        .sum();
    let logged = lines.iter().filter(|l| l.contains("oldtag=")).count();
    (lines.len(), logged, suppressed)
}

/// Every retransmission, as the engine logs each at DEBUG (the rig runs with
/// `AOE_LOG=debug`).
fn all_retransmits(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("DEBUG") && l.contains("retransmit e") && l.contains("oldtag="))
        .count()
}

#[test]
fn a_dead_target_makes_a_retransmit_line_a_second_with_counts_not_one_per_frame() {
    let mut rig = Rig::start(
        Target::AoeServe,
        1500,
        InitOpts {
            deadsecs: Some(6),
            ..Default::default()
        },
    );
    let dev = rig.dev();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || {
            // Reads of 1 MiB until one fails (the target is killed meanwhile).
            for n in 0u64.. {
                read_at(&dev, (n % 32) << 20, 1 << 20)?;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok::<(), std::io::Error>(())
        })
    };
    // The reads are going: the next one has frames outstanding when the target dies.
    assert!(
        wait_until(Duration::from_secs(30), || done
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2),
        "the reads did not start{}",
        rig.logs()
    );
    rig.kill_target();
    let t0 = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(30), || rig
            .state()
            .is_some_and(|s| s.starts_with("down"))),
        "not down after the target died: {:?}{}",
        rig.state(),
        rig.logs()
    );
    let r = reader.join().expect("reader");
    assert!(r.is_err(), "the read succeeded with the target gone");
    // The last burst's count comes out in a line of its own once its second has passed.
    let mut seen = (0, 0, 0, 0);
    let accounted = wait_until(Duration::from_secs(10), || {
        let log = rig.initiator_log();
        let (lines, logged, suppressed) = info_retransmits(&log);
        seen = (lines, logged, suppressed, all_retransmits(&log));
        logged + suppressed == seen.3
    });
    let secs = t0.elapsed().as_secs() as usize + 3;
    let (lines, logged, suppressed, all) = seen;
    eprintln!(
        "{all} retransmissions in {:.1} s: {lines} log lines, {suppressed} counted in them",
        t0.elapsed().as_secs_f64()
    );
    assert!(
        accounted,
        "{all} retransmissions, {logged} logged + {suppressed} suppressed{}",
        rig.logs()
    );
    assert!(all > lines, "no storm to limit: {all} retransmissions");
    // One path, two kinds (timeouts, fast retransmits): at most two lines a second, and
    // the summaries.
    assert!(
        lines <= 2 * secs + 2,
        "{lines} retransmit lines in {secs} s ({all} retransmissions){}",
        rig.logs()
    );
    rig.finish();
}
