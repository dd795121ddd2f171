//! `serve --http` serves the engine's metrics at /metrics in the Prometheus text format: a
//! parser of that format reads them, and the histograms and counters move with the work done.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sandtree_tests::{require_sandbox_host, tail, Service, Storage};

/// The address `serve --http 127.0.0.1:0` bound, from its log.
fn web_addr(svc: &Service) -> String {
    let log = svc.log();
    let line = log
        .lines()
        .find(|l| l.contains("web view listening"))
        .unwrap_or_else(|| panic!("no web view in the log:\n{}", tail(&log)));
    let at = line.find("http://").expect("the address in the log line") + 7;
    line[at..].split('/').next().unwrap().to_string()
}

/// One scrape: `name{k="v",…}` (labels sorted) → value, and the declared type of each family.
struct Scrape {
    values: HashMap<String, f64>,
    types: HashMap<String, String>,
}

impl Scrape {
    fn get(&self, key: &str) -> f64 {
        self.values.get(key).copied().unwrap_or(0.0)
    }
}

fn scrape(addr: &str) -> Scrape {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4"),
        "{head}"
    );
    let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not the Prometheus text format ({e}):\n{body}"));
    let mut values = HashMap::new();
    for s in &parsed.samples {
        let mut labels: Vec<(String, String)> = s
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        labels.sort();
        let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        let key = if labels.is_empty() {
            s.metric.clone()
        } else {
            format!("{}{{{}}}", s.metric, labels.join(","))
        };
        let v = match &s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Summary(q) => {
                // Keep the median, and the count as name_count (below).
                q.iter()
                    .find(|q| q.quantile == 0.5)
                    .map_or(f64::NAN, |q| q.count)
            }
            prometheus_parse::Value::Histogram(_) => f64::NAN,
        };
        values.insert(key, v);
    }
    // prometheus-parse folds _count and _sum into the summary: read them from the text.
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        if let Some((name, v)) = line.rsplit_once(' ') {
            if name.ends_with("_count") || name.ends_with("_sum") {
                values.insert(name.to_string(), v.parse().unwrap());
            }
        }
    }
    let types = body
        .lines()
        .filter_map(|l| {
            let (n, t) = l.strip_prefix("# TYPE ")?.split_once(' ')?;
            Some((n.to_string(), t.to_string()))
        })
        .collect();
    Scrape { values, types }
}

#[test]
fn metrics_move_with_the_work() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start_with(Storage::Btrfs, &["--http", "127.0.0.1:0"]);
    let addr = web_addr(&svc);
    let before = scrape(&addr);
    assert_eq!(before.get("sandtree_step_seconds_count"), 0.0);

    let ep = svc.create("busybox", "auto");
    svc.step(&ep, "echo hi"); // none
    svc.step(&ep, "echo a > /tmp/a"); // fs
    svc.step(&ep, "sleep 600 >/dev/null 2>&1 &"); // proc: a full node
    let fork = svc.ok(&["fork", &ep, "--turn", "3"]).trim().to_string();
    svc.ok(&["rewind", &ep, "--turn", "2"]);

    // Checkpoints run after the steps answered: wait for the full one to commit.
    let full = "sandtree_checkpoints_total{kind=\"full\",result=\"committed\"}";
    let deadline = Instant::now() + Duration::from_secs(60);
    let m = loop {
        let m = scrape(&addr);
        if m.get(full) >= 1.0 || Instant::now() > deadline {
            break m;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let dump_count = m.get("sandtree_dump_seconds_count");
    assert_eq!(m.get("sandtree_step_seconds_count"), 3.0, "three steps");
    assert_eq!(m.get("sandtree_step_checkpoint_wait_seconds_count"), 3.0);
    for kind in ["none", "fs", "proc"] {
        assert_eq!(
            m.get(&format!("sandtree_verdicts_total{{kind=\"{kind}\"}}")),
            1.0,
            "one {kind} verdict"
        );
    }
    assert_eq!(m.get(full), 1.0);
    assert_eq!(
        m.get("sandtree_checkpoints_total{kind=\"fs\",result=\"committed\"}"),
        1.0
    );
    assert!(m.get("sandtree_checkpoint_bytes_total") > 0.0);
    assert_eq!(dump_count, 1.0, "one CRIU dump");
    assert_eq!(m.get("sandtree_snapshot_seconds_count"), 2.0, "fs + full");
    assert_eq!(m.get("sandtree_checkpoint_queue_wait_seconds_count"), 2.0);
    assert_eq!(m.get("sandtree_fork_seconds_count{kind=\"cold\"}"), 1.0);
    assert_eq!(m.get("sandtree_rewind_seconds_count"), 1.0);
    // create, the fork and the rewind each restored or started a sandbox.
    assert_eq!(m.get("sandtree_restore_seconds_count"), 3.0);
    assert_eq!(m.get("sandtree_live_episodes"), 2.0);
    assert_eq!(m.get("sandtree_checkpoint_queue_depth"), 0.0);
    assert!(m.get("sandtree_step_seconds_sum") > 0.0);
    assert!(m.get("sandtree_dump_seconds_sum") > 0.0);
    for (name, ty) in [
        ("sandtree_step_seconds", "summary"),
        ("sandtree_dump_seconds", "summary"),
        ("sandtree_checkpoint_bytes_total", "counter"),
        ("sandtree_live_episodes", "gauge"),
    ] {
        assert_eq!(m.types.get(name).map(String::as_str), Some(ty), "{name}");
    }
    svc.ok(&["delete", &fork]);
    svc.ok(&["delete", &ep]);
    assert_eq!(scrape(&addr).get("sandtree_live_episodes"), 0.0);
}
