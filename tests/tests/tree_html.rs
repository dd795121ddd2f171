//! `sandtree tree EPISODE --html FILE`: a self-contained page with the whole tree across forks
//! as inline SVG, one node element per turn record with its kind's class, the episodes' heads
//! marked live, and the tooltips' commands and outputs escaped.

use sandtree_tests::*;

#[test]
fn tree_html_has_one_node_per_record() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start(Storage::Btrfs);
    let ep = svc.create("busybox", "auto");
    svc.step(&ep, "mkdir -p /w && echo x > /w/f"); // fs
    svc.step(&ep, "sleep 600 >/dev/null 2>&1 &"); // full
    svc.step(&ep, "echo '<script>alert(\"&\")</script>'"); // shared, with markup in its output
    let forks: Vec<String> = svc
        .ok(&["fork", &ep, "--turn", "1", "--count", "2"])
        .lines()
        .map(str::to_string)
        .collect();
    svc.step(&forks[0], "echo fork > /w/g");
    let file = svc.dir.join("tree.html");
    svc.ok(&["tree", &forks[0], "--html", file.to_str().unwrap()]);
    let html = std::fs::read_to_string(&file).unwrap();
    assert!(
        html.starts_with("<!DOCTYPE html>") && html.contains("<svg"),
        "{html}"
    );
    assert!(!html.contains("<script"), "output must be escaped: {html}");
    assert!(html.contains("&lt;script&gt;alert(&quot;&amp;&quot;)&lt;/script&gt;"));

    let whole: serde_json::Value =
        serde_json::from_str(&svc.ok(&["tree", &ep, "--whole", "--json"])).unwrap();
    let family = whole["family"].as_array().unwrap();
    assert_eq!(
        family.len(),
        5,
        "turn 0..3 of ep, turn 2 of the fork: {whole}"
    );
    let nodes: Vec<&str> = html
        .split("<circle ")
        .skip(1)
        .filter(|c| c.starts_with("class=\"node "))
        .collect();
    assert_eq!(nodes.len(), family.len(), "one node element per record");
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
            .replace('\'', "&#39;")
    };
    let mut sizes = Vec::new();
    for t in family {
        let rec = format!("data-record=\"{}\"", t["record"]);
        let el = nodes
            .iter()
            .find(|n| n.contains(&rec))
            .unwrap_or_else(|| panic!("no node for record {}", t["record"]));
        let class = el.split('"').nth(1).unwrap();
        // Sized by checkpoint bytes: the node carries its bytes, and its radius grows with them.
        let attr = |name: &str| -> f64 {
            let at = el.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
            el[at..].split('"').next().unwrap().parse().unwrap()
        };
        let bytes = t["bytes"].as_u64().expect("bytes");
        assert_eq!(attr("data-bytes"), bytes as f64, "{el}");
        sizes.push((bytes, attr("r")));
        // Its hover card holds the command.
        let card = html
            .split("<pre class=\"tip\" ")
            .find(|c| c.starts_with(&format!("id=\"t{}\"", t["record"])))
            .unwrap_or_else(|| panic!("no hover card for record {}", t["record"]));
        let action = t["action"].as_str().unwrap_or("");
        assert!(card.contains(&escape(action)), "{card} for {t}");
        let kind = format!("kind-{}", t["kind"].as_str().unwrap());
        assert!(class.split(' ').any(|c| c == kind), "{class} for {t}");
        // Heads: ep's turn 3, forks[0]'s turn 2, forks[1]'s turn 1.
        let head = t["turn"] == 3
            || (t["turn"] == 2 && t["episodes"] == serde_json::json!([forks[0]]))
            || t["turn"] == 1;
        assert_eq!(
            class.split(' ').any(|c| c == "live"),
            head,
            "{class} for {t}"
        );
    }
    // More bytes never a smaller node; the full node (a CRIU image) is larger than a shared one.
    sizes.sort_by(|a, b| a.partial_cmp(b).unwrap());
    for w in sizes.windows(2) {
        assert!(w[0].1 <= w[1].1, "radius shrinks as bytes grow: {sizes:?}");
    }
    assert!(
        sizes[0].0 == 0 && sizes.last().unwrap().1 > sizes[0].1 + 1.0,
        "{sizes:?}"
    );
    let kinds: Vec<&str> = family.iter().map(|t| t["kind"].as_str().unwrap()).collect();
    for k in ["base", "fs", "full", "shared"] {
        assert!(kinds.contains(&k), "{kinds:?}");
    }
    // Deterministic: the same tree gives the same page.
    let again = svc.dir.join("again.html");
    svc.ok(&["tree", &ep, "--html", again.to_str().unwrap()]);
    let again = std::fs::read_to_string(&again).unwrap();
    let svg = |h: &str| h[h.find("<svg").unwrap()..].to_string();
    assert_eq!(svg(&html), svg(&again));
    for e in forks.iter().chain([&ep]) {
        svc.ok(&["delete", e]);
    }
}

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

/// GET over plain HTTP/1.1: (status, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp.split(' ').nth(1).unwrap().parse().unwrap();
    let body = resp.split_once("\r\n\r\n").unwrap().1.to_string();
    (code, body)
}

#[test]
fn serve_http_shows_the_index_and_the_tree_page() {
    if !require_sandbox_host() {
        return;
    }
    let svc = Service::start_with(Storage::Btrfs, &["--http", "127.0.0.1:0"]);
    let ep = svc.create("busybox", "auto");
    svc.step(&ep, "echo '<b>bold</b>' > /tmp/x; cat /tmp/x");
    let f = svc.ok(&["fork", &ep, "--turn", "1"]).trim().to_string();
    let addr = web_addr(&svc);
    let (code, page) = get(&addr, &format!("/episodes/{f}"));
    assert_eq!(code, 200, "{page}");
    assert_eq!(page.matches("<circle class=\"node ").count(), 2, "{page}");
    let (code, index) = get(&addr, "/");
    assert_eq!(code, 200, "{index}");
    for e in [&ep, &f] {
        assert!(
            index.contains(&format!("href=\"/episodes/{e}\"")),
            "{index}"
        );
    }
    // A wider tree: both branch, one with a daemon (a full node).
    svc.step(&ep, "echo a > /tmp/a");
    svc.step(&ep, "sleep 600 >/dev/null 2>&1 &");
    svc.step(&f, "echo b > /tmp/b");
    svc.step(&f, "ls /tmp");
    let (code, page) = get(&addr, &format!("/episodes/{f}"));
    assert_eq!(code, 200, "{page}");
    assert_eq!(page.matches("<circle class=\"node ").count(), 6, "{page}");
    assert!(
        page.contains("&lt;b&gt;bold&lt;/b&gt;") && !page.contains("<b>"),
        "{page}"
    );
    // The same page as `tree --html`.
    let file = svc.dir.join("t.html");
    svc.ok(&["tree", &f, "--html", file.to_str().unwrap()]);
    assert_eq!(page, std::fs::read_to_string(&file).unwrap());
    assert_eq!(get(&addr, "/episodes/ep-missing").0, 404);
    assert_eq!(get(&addr, "/episodes/bad%20id").0, 400);
    assert_eq!(get(&addr, "/nothing").0, 404);

    // A headless browser renders it: SANDTREE_BROWSER_PYTHON names a Python with Playwright
    // (scripts/test.sh sets it), SANDTREE_CHROMIUM the browser if not Debian's /usr/bin/chromium.
    // Outside CI a missing one skips this part; under CI=true it fails.
    let py = std::env::var_os("SANDTREE_BROWSER_PYTHON");
    if !require(
        py.is_some(),
        "the headless browser check needs SANDTREE_BROWSER_PYTHON (a Python with Playwright)",
    ) {
        for e in [&f, &ep] {
            svc.ok(&["delete", e]);
        }
        return;
    }
    let py = py.expect("checked");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web/check_tree_page.py");
    // The screenshot goes under the target dir: a unique name while it is checked, then the one
    // name a person looks at (target/tmp/tree_html_page.png), replacing the last run's.
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let shot = shots.join(format!("tree_html_page-{f}.png"));
    let o = std::process::Command::new(py)
        .arg(script)
        .arg(format!("http://{addr}"))
        .arg(&ep)
        .arg(&f)
        .arg(&shot)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "browser check failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&o.stdout));
    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("no screenshot {shot:?}: {e}"));
    let _ = std::fs::remove_file(&shot);
    assert!(
        png.len() > 1000 && png.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG: {} bytes",
        png.len()
    );
    // The image is as wide as the viewport (1280 px): IHDR's width, big-endian, at byte 16.
    assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 1280);
    std::fs::write(shots.join("tree_html_page.png"), &png).unwrap();
    for e in [&f, &ep] {
        svc.ok(&["delete", e]);
    }
}
