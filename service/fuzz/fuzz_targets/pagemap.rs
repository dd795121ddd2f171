//! CRIU page images, as the page dedup reads them after a dump (`sandtree_runtime::pages`): the
//! dump's and its parent's `pagemap-1.img` / `pages-N.img` come from the input. Checks:
//! - `read_pagemap` and `plan_against` return a value or an error, never panic or hang;
//! - a plan changes nothing, and keeps no more than was dumped;
//! - `dedup_against` either prices what the plan priced, or fails leaving the dump's files
//!   byte for byte as they were (its contract; `Inconsistent` excepted, which needs a failing
//!   rename).
#![no_main]

use std::collections::BTreeMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sandtree_runtime::pages::{self, PagesError};

/// A pages file: `pages % 17` pages of `fill` bytes, with `tail` written over its start and
/// appended beyond it.
struct Pages<'a> {
    id: u8,
    pages: u8,
    fill: u8,
    tail: &'a [u8],
}

/// The input, framed so that real images can be seeds (`seeds.py`): a flags byte (bit 0: the
/// parent has a page map for the task), then for the dump and for the parent the pages spec
/// `id pages fill`, then four length-prefixed (u16 LE) byte strings: the dump's pagemap, the
/// parent's pagemap, the dump's pages tail, the parent's pages tail (the last takes the rest).
struct Input<'a> {
    parent_has_task: bool,
    child_map: &'a [u8],
    child_pages: Pages<'a>,
    parent_map: &'a [u8],
    parent_pages: Pages<'a>,
}

fn parse(data: &[u8]) -> Option<Input<'_>> {
    let (head, mut rest) = data.split_at_checked(7)?;
    let mut take = |last: bool| -> Option<&[u8]> {
        if last {
            return Some(std::mem::take(&mut rest));
        }
        let (n, r) = rest.split_at_checked(2)?;
        let n = usize::from(u16::from_le_bytes([n[0], n[1]])).min(r.len());
        let (s, r) = r.split_at(n);
        rest = r;
        Some(s)
    };
    let (child_map, parent_map) = (take(false)?, take(false)?);
    let (child_tail, parent_tail) = (take(false)?, take(true)?);
    Some(Input {
        parent_has_task: head[0] & 1 != 0,
        child_map,
        child_pages: Pages {
            id: head[1],
            pages: head[2],
            fill: head[3],
            tail: child_tail,
        },
        parent_map,
        parent_pages: Pages {
            id: head[4],
            pages: head[5],
            fill: head[6],
            tail: parent_tail,
        },
    })
}

fn write_image(dir: &Path, map: &[u8], p: &Pages, has_task: bool) {
    std::fs::create_dir_all(dir).unwrap();
    if has_task {
        std::fs::write(dir.join("pagemap-1.img"), map).unwrap();
    }
    let mut bytes = vec![p.fill; usize::from(p.pages % 17) * 4096];
    let over = p.tail.len().min(bytes.len());
    bytes[..over].copy_from_slice(&p.tail[..over]);
    bytes.extend_from_slice(&p.tail[over..]);
    // CRIU numbers pages files from 1; the id is also what a fuzzed head most often names.
    std::fs::write(dir.join(format!("pages-{}.img", p.id % 4)), bytes).unwrap();
}

/// Every file under `dir` (not following symlinks) with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        let ft = e.file_type().unwrap();
        if ft.is_file() {
            out.insert(name, std::fs::read(e.path()).unwrap());
        } else {
            out.insert(format!("{name}/"), Vec::new());
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = parse(data) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (child, parent) = (t.path().join("c"), t.path().join("p"));
    write_image(&child, input.child_map, &input.child_pages, true);
    write_image(
        &parent,
        input.parent_map,
        &input.parent_pages,
        input.parent_has_task,
    );

    let read = pages::read_pagemap(&child.join("pagemap-1.img"));
    if let Ok(pm) = &read {
        assert!(pm.entries.windows(2).all(|w| w[0].vaddr < w[1].vaddr));
    }

    let before = snapshot(&child);
    let planned = pages::plan_against(&child, &parent);
    assert_eq!(snapshot(&child), before, "a plan wrote to the dump");
    if let Ok(s) = &planned {
        assert!(read.is_ok());
        assert!(s.kept_bytes <= s.dumped_bytes, "{s:?}");
    }

    match pages::dedup_against(&child, &parent, pages::MAX_CHAIN) {
        Ok(done) => {
            let planned = planned.expect("a dedup succeeded where its plan failed");
            assert_eq!(done, planned);
        }
        Err(PagesError::Inconsistent { .. }) => panic!("half switched without a failing rename"),
        Err(_) => assert_eq!(snapshot(&child), before, "a failed dedup changed the dump"),
    }
});
