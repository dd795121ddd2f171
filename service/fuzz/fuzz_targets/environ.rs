//! The shim's parser of a shell's saved environment (`env -0` output, written by the sandbox).
//! Checks: no panic; the result is sorted, keys hold no `=`, nothing holds a
//! NUL, sandtree's own `__st_` variables never come back, and no more pairs than NUL-separated
//! items.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sandtree_runtime::fuzzing::parse_environ;

fuzz_target!(|data: &[u8]| {
    let env = parse_environ(data);
    assert!(env.windows(2).all(|w| w[0] <= w[1]), "not sorted: {env:?}");
    let items = data.split(|&b| b == 0).filter(|s| !s.is_empty()).count();
    assert!(env.len() <= items);
    for (k, v) in &env {
        assert!(
            !k.contains('=') && !k.contains('\0') && !v.contains('\0'),
            "{k:?}={v:?}"
        );
        assert!(!k.starts_with("__st_"), "{k:?}");
        assert!(
            !matches!(k.as_str(), "PWD" | "OLDPWD" | "SHLVL" | "_"),
            "{k:?}"
        );
    }
});
