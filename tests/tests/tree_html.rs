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
    for t in family {
        let rec = format!("data-record=\"{}\"", t["record"]);
        let el = nodes
            .iter()
            .find(|n| n.contains(&rec))
            .unwrap_or_else(|| panic!("no node for record {}", t["record"]));
        let class = el.split('"').nth(1).unwrap();
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
