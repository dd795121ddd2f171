//! Snapshot and clone stay fast: the median of 10 is well under a second on every backend
//! (dir copies a small volume here). Prints the medians, which the docs quote.

mod common;

use std::time::{Duration, Instant};

use common::{for_each_backend, make_base, noise, write};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn snapshot_and_clone_medians() {
    for_each_backend(|b| {
        make_base(&**b, "img");
        let v = b.create_volume("v", "img").unwrap();
        let (mut snaps, mut clones, mut changed) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..10 {
            write(&v.join("f"), &noise(64 << 10, i));
            let t = Instant::now();
            assert!(b.changed_since_last_snapshot("v").unwrap());
            changed.push(t.elapsed());
            let t = Instant::now();
            let info = b.snapshot("v", &format!("s{i}")).unwrap();
            snaps.push(t.elapsed());
            assert!(info.bytes >= 64 << 10);
            let t = Instant::now();
            b.clone_snapshot("v", &format!("s{i}"), &format!("c{i}"))
                .unwrap();
            clones.push(t.elapsed());
        }
        let (s, c, ch) = (median(snaps), median(clones), median(changed));
        eprintln!(
            "latency {}: snapshot median {:.1} ms, clone median {:.1} ms, changed_since_last_snapshot median {:.1} ms",
            b.kind(),
            s.as_secs_f64() * 1e3,
            c.as_secs_f64() * 1e3,
            ch.as_secs_f64() * 1e3
        );
        assert!(
            s < Duration::from_secs(1),
            "{}: snapshot median {s:?}",
            b.kind()
        );
        assert!(
            c < Duration::from_secs(1),
            "{}: clone median {c:?}",
            b.kind()
        );
    });
}
