//! The storage layer's parser of /proc/self/mountinfo lines (mount points and sources a sandbox
//! or an image can name). Two modes, by the first byte:
//! - raw text: every line parses or is skipped, without a panic;
//! - a mount built from the input, written as the kernel writes it (space, tab, newline and
//!   backslash escaped as `\ooo`): it must parse back to the same mount.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sandtree_storage::pool::parse_mountinfo_line;

#[derive(Arbitrary, Debug)]
struct Mount {
    mount_point: String,
    options: String,
    fstype: String,
    source: String,
    optional: Vec<String>,
}

/// What the kernel's `seq_path`/`mangle` does to a mountinfo field.
fn escape(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        match c {
            ' ' | '\t' | '\n' | '\\' => out.push_str(&format!("\\{:03o}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// A field the kernel writes without escaping (fstype, options): no whitespace.
fn word(s: &str) -> String {
    let w: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    // Not empty, and not the separator (the kernel writes neither).
    if w.is_empty() || w == "-" {
        "x".into()
    } else {
        w
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        for line in String::from_utf8_lossy(rest).lines() {
            let _ = parse_mountinfo_line(line);
        }
        return;
    }
    let Ok(m) = Mount::arbitrary_take_rest(Unstructured::new(rest)) else {
        return;
    };
    let (fstype, options) = (word(&m.fstype), word(&m.options));
    // The kernel's mount points are absolute.
    let mount_point = format!("/{}", m.mount_point);
    // Optional fields (`shared:N`, `master:N`) come before the ` - ` separator.
    let optional: String = m
        .optional
        .iter()
        .map(|o| format!(" {}", word(o)))
        .filter(|o| o != " -")
        .collect();
    let line = format!(
        "36 35 98:0 /mnt1 {} {options}{optional} - {fstype} {} rw,errors=continue",
        escape(&mount_point),
        escape(&m.source),
    );
    let got = parse_mountinfo_line(&line).unwrap_or_else(|| panic!("no parse: {line:?}"));
    assert_eq!(
        got.mount_point.to_str(),
        Some(mount_point.as_str()),
        "{line:?}"
    );
    assert_eq!(got.source, m.source, "{line:?}");
    assert_eq!(got.fstype, fstype, "{line:?}");
    assert_eq!(got.options, options, "{line:?}");
});
