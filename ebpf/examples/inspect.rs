//! Runs shell commands as turns of a throwaway sandbox cgroup and prints what the inspector saw.
//!
//! Usage (as root): `cargo run --example inspect -- 'echo x > /tmp/a' 'sleep 100 &' true`
//! Each argument is one turn: `sh -c ARG` runs in the cgroup, then end_turn and the verdict.

mod common;

use std::fs;
use std::time::{Duration, Instant};

use sandtree_ebpf::{verdict, Inspector, SandboxConfig};

fn main() {
    let turns: Vec<String> = std::env::args().skip(1).collect();
    let (cg, id) = common::leaf(&format!("sandtree-inspect-{}", std::process::id()));
    let insp = Inspector::load().unwrap_or_else(|e| panic!("{e}"));
    insp.watch(id, SandboxConfig::default()).expect("watch");
    for turn in &turns {
        let status = common::sh_in(&cg, turn).status().expect("sh");
        std::thread::sleep(Duration::from_millis(100));
        let t = Instant::now();
        let e = insp
            .end_turn(id, &|pid| fs::metadata(format!("/proc/{pid}")).is_ok())
            .expect("end_turn");
        let took = t.elapsed();
        let (kind, reasons) = verdict(&e);
        println!("== {turn:?} ({status}); end_turn took {took:?}");
        println!("{e:#?}");
        println!("verdict {kind:?}");
        for r in reasons {
            println!("  {r}");
        }
    }
    println!("sandbox map bytes: {}", insp.sandbox_map_bytes(id));
    insp.unwatch(id).expect("unwatch");
    let _ = fs::write(cg.join("cgroup.kill"), "1");
    std::thread::sleep(Duration::from_millis(100));
    let _ = fs::remove_dir(&cg);
}
