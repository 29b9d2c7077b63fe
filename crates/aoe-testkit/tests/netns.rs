//! The testkit's guards against the real `ip`/`nsenter` tools. Needs root.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use aoe_testkit::{
    list_namespaces, parse_mac, process_alive, remove_stale_namespaces, require_root, wait_until,
    Bridge, End, Netns, VethPair,
};

#[test]
fn namespace_exists_until_dropped() {
    require_root();
    let ns = Netns::new("aoetk").unwrap();
    let name = ns.name().to_owned();
    assert!(name.starts_with(&format!("aoetk-{}-", std::process::id())));
    assert!(list_namespaces().unwrap().contains(&name));
    assert!(ns.path().exists());
    assert_eq!(ns.path().to_str().unwrap(), format!("/run/netns/{name}"));

    // Only lo, and it is up.
    let links = ns.ip(&["-o", "link", "show"]).unwrap();
    assert_eq!(links.lines().count(), 1, "{links}");
    assert!(links.contains("lo: <LOOPBACK,UP,LOWER_UP>"), "{links}");
    // IPv6 is off inside, so no router/neighbour solicitations accompany test traffic.
    if std::path::Path::new("/proc/sys/net/ipv6").exists() {
        let v = ns
            .run("cat", &["/proc/sys/net/ipv6/conf/default/disable_ipv6"])
            .unwrap();
        assert_eq!(v.trim(), "1");
    }

    drop(ns);
    assert!(!list_namespaces().unwrap().contains(&name));
    assert!(!std::path::Path::new(&format!("/run/netns/{name}")).exists());
}

#[test]
fn namespace_is_removed_when_a_test_panics() {
    require_root();
    let mut name = String::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let ns = Netns::new("aoetk").unwrap();
        name = ns.name().to_owned();
        panic!("test failure inside the namespace");
    }));
    assert!(result.is_err());
    assert!(!name.is_empty());
    assert!(!list_namespaces().unwrap().contains(&name));
}

#[test]
fn commands_run_inside_the_namespace() {
    require_root();
    let ns = Netns::new("aoetk").unwrap();
    // `ip link` run through nsenter sees only the namespace's interfaces.
    let out = ns.run("ip", &["-o", "link", "show"]).unwrap();
    assert_eq!(out.lines().count(), 1, "{out}");
    let err = ns.ip(&["link", "show", "dev", "nosuchif0"]).unwrap_err();
    assert!(err.to_string().contains("nosuchif0"), "{err}");
}

#[test]
fn veth_pair_with_jumbo_mtu() {
    require_root();
    let a = Netns::new("aoetk").unwrap();
    let b = Netns::new("aoetk").unwrap();
    let veth = VethPair::new(&a, &b, 9000).unwrap();
    assert!(veth.a_name().len() <= 15 && veth.b_name().len() <= 15);
    assert_eq!(veth.mtu(End::A).unwrap(), 9000);
    assert_eq!(veth.mtu(End::B).unwrap(), 9000);

    let line = a.ip(&["-o", "link", "show", "dev", veth.a_name()]).unwrap();
    assert!(line.contains(" mtu 9000 "), "{line}");
    assert!(line.contains(",UP,"), "{line}");
    let br = b
        .ip(&["-br", "link", "show", "dev", veth.b_name()])
        .unwrap();
    let mac = br.split_whitespace().nth(2).and_then(parse_mac);
    assert_eq!(mac, Some(veth.b_mac()), "{br}");
    assert_ne!(veth.a_mac(), veth.b_mac());
    assert_ne!(veth.a_mac(), [0; 6]);

    veth.set_mtu(1500).unwrap();
    assert_eq!(veth.mtu(End::A).unwrap(), 1500);
    veth.set_link(End::B, false).unwrap();
    let br = b
        .ip(&["-br", "link", "show", "dev", veth.b_name()])
        .unwrap();
    assert!(br.contains("DOWN"), "{br}");
    veth.set_link(End::B, true).unwrap();

    let a_name = veth.a_name().to_owned();
    drop(veth);
    assert!(a.ip(&["link", "show", "dev", &a_name]).is_err());
    assert_eq!(b.ip(&["-o", "link", "show"]).unwrap().lines().count(), 1);
}

#[test]
fn named_veth_and_bridge() {
    require_root();
    let hub = Netns::new("aoetk").unwrap();
    let h1 = Netns::new("aoetk").unwrap();
    let h2 = Netns::new("aoetk").unwrap();
    let l1 = VethPair::new_named(&h1, "eth0", &hub, "p1", 1500).unwrap();
    let l2 = VethPair::new_named(&h2, "eth0", &hub, "p2", 1500).unwrap();
    let br = Bridge::new(&hub).unwrap();
    br.add_port(l1.b_name()).unwrap();
    br.add_port(l2.b_name()).unwrap();
    let ports = hub
        .ip(&["-o", "link", "show", "master", br.name()])
        .unwrap();
    assert!(ports.contains(" p1@"), "{ports}");
    assert!(ports.contains(" p2@"), "{ports}");
    assert!(VethPair::new_named(&h1, "bad name", &hub, "p3", 1500).is_err());
}

#[test]
fn ns_child_stops_with_sigterm() {
    require_root();
    let ns = Netns::new("aoetk").unwrap();
    let mut sleep = Command::new("sleep");
    sleep.arg("100");
    let mut child = ns.spawn(&sleep).unwrap();
    assert!(child.is_running());
    let pid = child.pid();
    assert!(
        wait_until(Duration::from_secs(5), || ns.pids().unwrap().contains(&pid)),
        "sleep is not inside {}",
        ns.name()
    );
    // Ended by the SIGTERM (signal 15), not by the SIGKILL that follows stop()'s 5 s
    // grace: that is what a time bound here stood for, and a stalled machine could break
    // the bound without the SIGTERM failing.
    let status = child.stop().unwrap();
    assert_eq!(status.signal(), Some(15), "{status:?}");
    assert!(!child.is_running());
    // Stopping again just reports the status.
    assert_eq!(child.stop().unwrap(), status);
}

#[test]
fn ns_child_that_ignores_sigterm_is_killed() {
    require_root();
    let ns = Netns::new("aoetk").unwrap();
    let mut cmd = ns.command("sh");
    cmd.args(["-c", "trap '' TERM; echo ready; exec sleep 100"]);
    let mut child = aoe_testkit::NsChild::spawn_command(cmd).unwrap();
    assert!(wait_until(Duration::from_secs(5), || child
        .output_so_far()
        .contains("ready")));
    let status = child.stop().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
}

#[test]
fn ns_child_output_env_and_exit_code() {
    require_root();
    let ns = Netns::new("aoetk").unwrap();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "echo out $AOE_TK_X; pwd; echo err >&2; exit 3"])
        .env("AOE_TK_X", "42")
        .current_dir("/");
    let mut child = ns.spawn(&cmd).unwrap();
    let status = child
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("sh exits");
    assert_eq!(status.code(), Some(3));
    let out = child.output_so_far();
    assert!(out.contains("out 42\n"), "{out}");
    assert!(out.contains("/\n"), "{out}");
    assert!(out.contains("err\n"), "{out}");
}

#[test]
fn dropping_a_namespace_kills_processes_left_inside() {
    require_root();
    let ns = Netns::new("aoetk").unwrap();
    let mut cmd = ns.command("sleep");
    cmd.arg("100");
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    assert!(wait_until(Duration::from_secs(5), || ns
        .pids()
        .unwrap()
        .contains(&pid)));
    drop(ns);
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "{status:?}");
}

#[test]
fn stale_namespaces_of_dead_processes_are_removed() {
    require_root();
    // pid_max is at most 2^22, so this process cannot exist.
    let stale = "aoetkstale-99999999-0";
    let live = format!("aoetkstale-{}-0", std::process::id());
    for name in [stale, live.as_str()] {
        let ok = Command::new("ip")
            .args(["netns", "add", name])
            .status()
            .unwrap();
        assert!(ok.success());
    }
    let removed = remove_stale_namespaces("aoetkstale").unwrap();
    let names = list_namespaces().unwrap();
    // Clean up the live one before asserting, so a failure leaves nothing behind.
    for name in [live.as_str(), stale] {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(std::process::Stdio::null())
            .status();
    }
    assert_eq!(removed, vec![stale.to_owned()]);
    assert!(!names.iter().any(|n| n == stale));
    assert!(names.contains(&live));
}

/// Set in the environment of the copy of this test binary that
/// [`a_killed_test_process_leaves_no_process`] starts and kills.
const HOLDER_ENV: &str = "AOE_NETNS_TEST_HOLDER";

/// A test process killed by a signal (a run stopped by hand or by a time-out) never drops its
/// [`Netns`], so the `aoe serve` it started inside stays running, orphaned, holding its files
/// and the namespace (session 19 found them after killed runs). The next
/// [`remove_stale_namespaces`] of the same prefix (every [`Netns::new`] calls it) must end
/// them, not only delete the name. Here a copy of this test binary makes a namespace, starts
/// two processes in it (one ignores SIGTERM) and is SIGKILLed; after the cleanup neither may
/// run. On the code before (only `ip netns del`): both still running.
#[test]
fn a_killed_test_process_leaves_no_process() {
    use std::process::Stdio;

    use aoe_testkit::killed::{hold, KilledCopy};

    const PREFIX: &str = "aoetkkill";
    require_root();
    if std::env::var_os(HOLDER_ENV).is_some() {
        // The holder: a namespace with two processes in it, say which, wait to be killed.
        let ns = Netns::new(PREFIX).unwrap();
        let mut pids = Vec::new();
        for script in ["exec sleep 600", "trap '' TERM; exec sleep 600"] {
            // Never waited for: they stand for the orphaned daemons, outliving this holder;
            // the test that starts the holder checks that the cleanup ends them.
            #[allow(clippy::zombie_processes)]
            let child = ns
                .command("sh")
                .args(["-c", script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap();
            pids.push(child.id());
        }
        // Both have run their script (trap set) once they are sleep, inside the namespace.
        assert!(wait_until(Duration::from_secs(10), || {
            let inside = ns.pids().unwrap();
            pids.iter().all(|p| {
                inside.contains(p)
                    && std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "sleep")
            })
        }));
        let mut words = vec![ns.name().to_owned()];
        words.extend(pids.iter().map(u32::to_string));
        hold(&words);
    }
    // Dropping `holder` SIGKILLs it and its processes and deletes the namespace, so that a
    // failure here leaks nothing either.
    let (mut holder, words) =
        KilledCopy::spawn("a_killed_test_process_leaves_no_process", HOLDER_ENV, "1").unwrap();
    let [name, pids @ ..] = words.as_slice() else {
        panic!("the holder said nothing");
    };
    let name = name.clone();
    let pids: Vec<u32> = pids.iter().map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), 2, "{words:?}");
    for &p in &pids {
        holder.also_kill(p);
    }
    let ns = name.clone();
    holder.on_drop(move || {
        let _ = Command::new("ip")
            .args(["netns", "del", &ns])
            .stderr(Stdio::null())
            .status();
    });
    holder.kill().unwrap();
    // The orphans outlive their test process, as an orphaned aoe serve does.
    assert!(
        pids.iter().all(|&p| process_alive(p)),
        "{pids:?} exited with the holder"
    );

    let removed = remove_stale_namespaces(PREFIX).unwrap();
    assert!(removed.contains(&name), "{name} not removed: {removed:?}");
    assert!(!list_namespaces().unwrap().contains(&name));
    let running: Vec<u32> = pids.iter().copied().filter(|&p| process_alive(p)).collect();
    assert!(
        running.is_empty(),
        "processes {running:?} of the killed test process still run after the cleanup of {name}"
    );
}
