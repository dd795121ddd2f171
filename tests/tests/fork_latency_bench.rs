//! `sandtree bench --forks 6` (scaled down; the full run takes more forks): warm forks of the
//! python worker node are much faster than cold ones, a cold fork costs little beyond CRIU's own
//! restore of the same image, and KSM shares most of the memory of 16 warm copies. Turns the
//! host's KSM on for its second part, and back off.

use std::process::Command;

use sandtree_tests::*;

#[test]
fn warm_forks_are_fast_and_ksm_shares_their_pages() {
    if !require_sandbox_host() {
        return;
    }
    let out = std::env::temp_dir().join(unique("sandtree-forks-"));
    let o = Command::new(bin())
        .args(["bench", "--suite"])
        .arg(workloads_dir())
        .args(["--forks", "6", "--out"])
        .arg(&out)
        .output()
        .expect("run sandtree bench --forks");
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "bench failed: {}", tail(&log));
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("forks.json")).unwrap()).unwrap();
    eprintln!("{}", std::fs::read_to_string(out.join("forks.md")).unwrap());
    let _ = std::fs::remove_dir_all(&out);
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert_eq!(r["cold_ms"].as_array().unwrap().len(), 6);
    assert_eq!(r["warm_ms"].as_array().unwrap().len(), 6);
    assert!(
        f("warm_ms_p50") * 3.0 < f("cold_ms_p50"),
        "warm {} ms vs cold {} ms",
        f("warm_ms_p50"),
        f("cold_ms_p50")
    );
    assert!(f("criu_restore_ms_p50") > 0.0);
    assert!(
        f("cold_over_criu") < 2.0,
        "a cold fork costs {}x CRIU's restore",
        f("cold_over_criu")
    );
    assert!(
        f("copy_mib_plain") > 0.5,
        "a python worker's anonymous memory: {r}"
    );
    assert!(
        f("copy_mib_ksm_net") < f("copy_mib_plain"),
        "KSM shared nothing: {r}"
    );
}
