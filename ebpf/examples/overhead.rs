//! Measures the inspector's overhead on syscall-heavy commands (as root):
//! `cargo run --release --example overhead [RUNS]`
//!
//! Each command runs RUNS times (default 5) in a cgroup v2 leaf three ways, interleaved: without
//! the BPF programs, with them and the cgroup watched, and with them but the cgroup not watched
//! (the cost for every other process on the host). Prints the medians.

mod common;

use std::fs;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sandtree_ebpf::{verdict, Inspector, SandboxConfig};

const COMMANDS: [&str; 3] = [
    "find / -xdev 2>/dev/null | wc -l",
    "tar cf - /usr 2>/dev/null | wc -c",
    "dd if=/dev/zero of=/dev/null bs=1 count=1000000 2>/dev/null",
];

fn run_in(cgroup: &Path, cmd: &str) -> Duration {
    let mut c = common::sh_in(cgroup, cmd);
    c.stdout(Stdio::null());
    let t = Instant::now();
    let st = c.status().expect("sh");
    let d = t.elapsed();
    assert!(st.success(), "{cmd}: {st}");
    d
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let (watched, id) = common::leaf(&format!("sandtree-overhead-w-{}", std::process::id()));
    let (other, _) = common::leaf(&format!("sandtree-overhead-o-{}", std::process::id()));

    for cmd in COMMANDS {
        run_in(&watched, cmd); // warm the page cache
        let (mut off, mut on, mut host) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            off.push(run_in(&watched, cmd));
            let insp = Inspector::load().unwrap_or_else(|e| panic!("{e}"));
            insp.watch(id, SandboxConfig::default()).expect("watch");
            on.push(run_in(&watched, cmd));
            host.push(run_in(&other, cmd));
            let e = insp.end_turn(id, &|_| false).expect("end_turn");
            assert_eq!(verdict(&e).0, sandtree_ebpf::VerdictKind::None, "{e:#?}");
            insp.unwatch(id).expect("unwatch");
        }
        let (off, on, host) = (median(off), median(on), median(host));
        let pct = |d: Duration| (d.as_secs_f64() / off.as_secs_f64() - 1.0) * 100.0;
        println!(
            "{cmd}\n  without programs {off:?}; watched {on:?} ({:+.1}%); attached, not watched {host:?} ({:+.1}%)",
            pct(on),
            pct(host)
        );
    }
    let insp = Inspector::load().unwrap_or_else(|e| panic!("{e}"));
    insp.watch(id, SandboxConfig::default()).expect("watch");
    println!(
        "bpf map memory: {} bytes as defined; one idle sandbox uses {} bytes of entries (+20 per live process)",
        insp.map_memory_bytes(),
        insp.sandbox_map_bytes(id)
    );
    insp.unwatch(id).expect("unwatch");
    let _ = fs::remove_dir(&watched);
    let _ = fs::remove_dir(&other);
}
