//! CRIU page images: keep only the memory pages a dump changed.
//!
//! CRIU writes every private page of every task on each dump (`pages-<id>.img`, indexed by
//! `pagemap-<pid>.img`). Incremental dumps would need the kernel's soft-dirty tracking, which this
//! kernel lacks (`criu check --feature mem_dirty_track`), so a daemon's memory would be written
//! whole at every process-changing turn. After a dump, [`dedup_against`] compares each page with
//! the page at the same address in the image the sandbox descends from, and rewrites the dump into
//! CRIU's own incremental format: equal pages become `PE_PARENT` entries, read at restore from the
//! image directory's `parent/`. CRIU's restore follows that chain itself (`criu/pagemap.c`,
//! `read_parent_page`); nothing of ours runs at restore.
//!
//! `parent/` holds hard links to the ancestor's `pagemap-*.img` and `pages-*.img` (and, below,
//! its own `parent/`), not a symlink: a node's images stay whole when its ancestor's directory is
//! collected, so garbage collection and crash reconcile need to know nothing of the chain. Chains
//! are capped (`serve --max-image-chain`, default [`MAX_CHAIN`]); the next dump is then kept
//! whole.
//!
//! A rewrite is verified before it replaces the dump: every page read back through the chain must
//! equal what CRIU wrote, or the dump is kept as it was.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use prost::Message;
use sandtree_proto::criu::{PagemapEntry, PagemapHead};

/// Pages are in the parent image.
pub const PE_PARENT: u32 = 1;
/// Pages are in this image's pages file, in entry order.
pub const PE_PRESENT: u32 = 4;

const PAGE: usize = 4096;
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const PAGEMAP_MAGIC: u32 = 0x5608_4025;
/// Name CRIU looks for in an image directory (`CR_PARENT_LINK`).
pub const PARENT: &str = "parent";

/// Default longest chain of parent images behind a dump (`serve --max-image-chain`). Each level
/// costs the restore one more pagemap to open and walk; measured in docs/design.md ("Page
/// dedup").
pub const MAX_CHAIN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum PagesError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a CRIU page map image: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("pid {pid} page {vaddr:#x} reads back different through the parent chain of {dir}")]
    Verify { dir: PathBuf, pid: u64, vaddr: u64 },
    /// Switching the page maps over failed half way: the dump is unusable.
    #[error("{dir}: page maps half switched to the deduplicated pages: {source}")]
    Inconsistent {
        dir: PathBuf,
        #[source]
        source: Box<PagesError>,
    },
}

type Result<T, E = PagesError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PagesError + '_ {
    move |source| PagesError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One task's page map: which pages-file holds its pages, and the entries in address order.
#[derive(Debug, Clone, PartialEq)]
pub struct Pagemap {
    pub pages_id: u32,
    pub entries: Vec<PagemapEntry>,
}

impl Pagemap {
    /// Bytes of this task's pages in its pages file.
    fn present_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| flags(e) & PE_PRESENT != 0)
            .map(|e| u64::from(e.nr_pages) * PAGE as u64)
            .sum()
    }
}

/// The flags CRIU acts on, with its compat rule for images that predate `flags`
/// (`init_compat_pagemap_entry`).
fn flags(e: &PagemapEntry) -> u32 {
    if e.in_parent == Some(true) {
        e.flags.unwrap_or(0) | PE_PARENT
    } else {
        e.flags.unwrap_or(PE_PRESENT)
    }
}

pub fn read_pagemap(path: &Path) -> Result<Pagemap> {
    let b = std::fs::read(path).map_err(io(path))?;
    let bad = |msg: &str| PagesError::Format {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    };
    let u32_at =
        |i: usize| -> Option<u32> { Some(u32::from_le_bytes(b.get(i..i + 4)?.try_into().ok()?)) };
    if u32_at(0) != Some(IMG_COMMON_MAGIC) || u32_at(4) != Some(PAGEMAP_MAGIC) {
        return Err(bad("bad magic"));
    }
    let mut i = 8;
    let mut msgs = Vec::new();
    while i < b.len() {
        let n = u32_at(i).ok_or_else(|| bad("truncated entry length"))? as usize;
        let body = b
            .get(i + 4..i + 4 + n)
            .ok_or_else(|| bad("truncated entry"))?;
        msgs.push(body);
        i += 4 + n;
    }
    let (head, rest) = msgs.split_first().ok_or_else(|| bad("no pagemap_head"))?;
    let head = PagemapHead::decode(*head).map_err(|e| bad(&e.to_string()))?;
    let entries = rest
        .iter()
        .map(|m| PagemapEntry::decode(*m).map_err(|e| bad(&e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    // Each entry is page-aligned and ends inside the address space; entries are in address
    // order and do not overlap (so every page is named once and `vaddr + n * PAGE` never wraps).
    let (mut end, mut prev) = (0u64, None);
    for e in &entries {
        if e.vaddr % PAGE as u64 != 0 {
            return Err(bad(&format!("entry at {:#x} is not page-aligned", e.vaddr)));
        }
        // Strictly increasing (an empty entry ends where it starts) and not overlapping.
        if e.vaddr < end || prev.is_some_and(|p| e.vaddr <= p) {
            return Err(bad("entries not in address order, or overlapping"));
        }
        prev = Some(e.vaddr);
        end = e
            .vaddr
            .checked_add(u64::from(e.nr_pages) * PAGE as u64)
            .ok_or_else(|| {
                bad(&format!(
                    "entry at {:#x} runs past the address space",
                    e.vaddr
                ))
            })?;
    }
    Ok(Pagemap {
        pages_id: head.pages_id,
        entries,
    })
}

fn encode_pagemap(pm: &Pagemap) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&IMG_COMMON_MAGIC.to_le_bytes());
    out.extend_from_slice(&PAGEMAP_MAGIC.to_le_bytes());
    let mut put = |m: &dyn Fn(&mut Vec<u8>)| {
        let mut body = Vec::new();
        m(&mut body);
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
    };
    let head = PagemapHead {
        pages_id: pm.pages_id,
    };
    put(&|b| head.encode(b).expect("vec grows"));
    for e in &pm.entries {
        put(&|b| e.encode(b).expect("vec grows"));
    }
    out
}

/// Writes a file durably under a temporary name and renames it into place.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("img.tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// One task's pages as a restore sees them: this image, then its parent chain.
struct PageSource {
    map: Pagemap,
    /// Offset in the pages file of each entry's first page (present entries only).
    offsets: Vec<u64>,
    pages: Option<(PathBuf, File)>,
    parent: Option<Box<PageSource>>,
}

impl PageSource {
    /// The pages of task `pid` in image directory `dir`, or None if the task has no page map
    /// there (CRIU treats a missing image as empty, too).
    fn open(dir: &Path, pid: u64) -> Result<Option<PageSource>> {
        let path = dir.join(format!("pagemap-{pid}.img"));
        if !path.exists() {
            return Ok(None);
        }
        let map = read_pagemap(&path)?;
        let parent_dir = dir.join(PARENT);
        let parent = if parent_dir.is_dir() {
            PageSource::open(&parent_dir, pid)?.map(Box::new)
        } else {
            None
        };
        PageSource::from_parts(dir, map, parent).map(Some)
    }

    fn from_parts(dir: &Path, map: Pagemap, parent: Option<Box<PageSource>>) -> Result<Self> {
        let mut offsets = Vec::with_capacity(map.entries.len());
        let mut off = 0u64;
        for e in &map.entries {
            offsets.push(off);
            if flags(e) & PE_PRESENT != 0 {
                off = off
                    .checked_add(u64::from(e.nr_pages) * PAGE as u64)
                    .ok_or_else(|| PagesError::Format {
                        path: dir.join(format!("pagemap of pages-{}.img", map.pages_id)),
                        msg: "present pages add up past 2^64 bytes".into(),
                    })?;
            }
        }
        let pages = if off > 0 {
            let p = dir.join(format!("pages-{}.img", map.pages_id));
            let f = File::open(&p).map_err(io(&p))?;
            let len = f.metadata().map_err(io(&p))?.len();
            if len < off {
                return Err(PagesError::Format {
                    path: p,
                    msg: format!("{len} bytes, the page map needs {off}"),
                });
            }
            Some((p, f))
        } else {
            None
        };
        Ok(PageSource {
            map,
            offsets,
            pages,
            parent,
        })
    }

    /// Reads the page at `vaddr` into `buf`; false if no image in the chain has it.
    fn read(&self, vaddr: u64, buf: &mut [u8; PAGE]) -> Result<bool> {
        let i = self.map.entries.partition_point(|e| e.vaddr <= vaddr);
        let Some(i) = i.checked_sub(1) else {
            return Ok(false);
        };
        let e = &self.map.entries[i];
        let idx = (vaddr - e.vaddr) / PAGE as u64;
        if idx >= u64::from(e.nr_pages) {
            return Ok(false);
        }
        let f = flags(e);
        if f & PE_PRESENT != 0 {
            let (path, file) = self.pages.as_ref().expect("present pages have a file");
            file.read_exact_at(buf, self.offsets[i] + idx * PAGE as u64)
                .map_err(io(path))?;
            Ok(true)
        } else if f & PE_PARENT != 0 {
            match &self.parent {
                Some(p) => p.read(vaddr, buf),
                None => Ok(false),
            }
        } else {
            Ok(false)
        }
    }
}

/// How many `parent/` levels an image directory has.
pub fn chain_depth(dir: &Path) -> usize {
    let mut d = dir.join(PARENT);
    let mut n = 0;
    while d.is_dir() {
        n += 1;
        d = d.join(PARENT);
    }
    n
}

/// Hard-links the page images of `from` (and of its own `parent/`, recursively) into `to`.
fn link_chain(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir(to).map_err(io(to))?;
    for e in std::fs::read_dir(from).map_err(io(from))? {
        let e = e.map_err(io(from))?;
        let name = e.file_name();
        let name_s = name.to_string_lossy();
        let ft = e.file_type().map_err(io(&e.path()))?;
        if name_s == PARENT && ft.is_dir() {
            link_chain(&e.path(), &to.join(PARENT))?;
        } else if ft.is_file()
            && name_s.ends_with(".img")
            && (name_s.starts_with("pagemap-") || name_s.starts_with("pages-"))
        {
            std::fs::hard_link(e.path(), to.join(&name)).map_err(io(&e.path()))?;
        }
    }
    File::open(to).and_then(|d| d.sync_all()).map_err(io(to))?;
    Ok(())
}

/// The numbers `n` of the files `<prefix>-<n>.img` in an image directory, sorted. With prefix
/// `pagemap`, the tasks (shared-memory page maps, `pagemap-shmem-<id>`, do not parse and are left
/// whole); with `pages`, the pages files.
fn numbered(dir: &Path, prefix: &str) -> Result<Vec<u64>> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let name = e.map_err(io(dir))?.file_name();
        if let Some(id) = name
            .to_string_lossy()
            .strip_prefix(prefix)
            .and_then(|s| s.strip_prefix('-'))
            .and_then(|s| s.strip_suffix(".img"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Page bytes in the tasks' pages files of an image directory.
fn present_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for pid in numbered(dir, "pagemap")? {
        n += read_pagemap(&dir.join(format!("pagemap-{pid}.img")))?.present_bytes();
    }
    Ok(n)
}

/// What a dedup did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DedupStats {
    /// Page bytes CRIU wrote.
    pub dumped_bytes: u64,
    /// Page bytes kept in this image after the rewrite.
    pub kept_bytes: u64,
    /// Parent levels behind the image (0: kept whole).
    pub depth: usize,
}

/// A task's entries split into runs of pages equal to the parent's and runs that changed.
struct Rewrite {
    pid: u64,
    map: Pagemap,
    new_pages: Vec<u8>,
    old_map: Pagemap,
}

/// Rewrites the dump in `dir` so that pages equal to those of the image in `parent` are read
/// from there at restore. Leaves the dump whole (and says so in the stats) when the chain
/// behind `parent` is already `max_chain` long or nothing is shared. On error the dump is
/// left as CRIU wrote it, so a failed dedup never costs a checkpoint — except
/// [`PagesError::Inconsistent`] (a rename failed between two page maps), after which the dump
/// must not be used.
pub fn dedup_against(dir: &Path, parent: &Path, max_chain: usize) -> Result<DedupStats> {
    let link = dir.join(PARENT);
    if link.exists() {
        // Not ours to clean up below.
        return Err(PagesError::Format {
            path: link,
            msg: "the dump already has a parent".into(),
        });
    }
    // `parent/` is made only once there is something to rewrite; an error after that removes it
    // again, unless the page maps were half switched over to it.
    match dedup_inner(dir, parent, max_chain) {
        Ok(s) => Ok(s),
        Err(e @ PagesError::Inconsistent { .. }) => Err(e),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&link);
            Err(e)
        }
    }
}

/// Compares the dump in `dir` page by page with the image in `parent` (and its chain), and
/// plans each task's rewrite. Writes nothing.
fn plan(dir: &Path, parent: &Path) -> Result<(DedupStats, Vec<Rewrite>)> {
    let mut stats = DedupStats::default();
    let mut rewrites = Vec::new();
    for pid in numbered(dir, "pagemap")? {
        let map_path = dir.join(format!("pagemap-{pid}.img"));
        let old_map = read_pagemap(&map_path)?;
        let was = old_map.present_bytes();
        stats.dumped_bytes += was;
        stats.kept_bytes += was;
        if old_map.entries.iter().any(|e| flags(e) & PE_PARENT != 0) {
            return Err(PagesError::Format {
                path: map_path,
                msg: "the dump already reads pages from a parent image".into(),
            });
        }
        let Some(prev) = PageSource::open(parent, pid)? else {
            continue;
        };
        let old = PageSource::from_parts(dir, old_map.clone(), None)?;
        let mut entries = Vec::with_capacity(old_map.entries.len());
        let mut new_pages = Vec::new();
        let (mut mine, mut theirs) = ([0u8; PAGE], [0u8; PAGE]);
        for e in &old_map.entries {
            let f = flags(e);
            if f & PE_PRESENT == 0 {
                entries.push(*e);
                continue;
            }
            // Runs of (in parent?, first page, pages).
            let mut run: Option<(bool, u64, u32)> = None;
            let flush = |run: (bool, u64, u32), entries: &mut Vec<PagemapEntry>| {
                entries.push(PagemapEntry {
                    vaddr: run.1,
                    nr_pages: run.2,
                    in_parent: None,
                    flags: Some(if run.0 { PE_PARENT } else { f }),
                });
            };
            for p in 0..e.nr_pages {
                let va = e.vaddr + u64::from(p) * PAGE as u64;
                if !old.read(va, &mut mine)? {
                    return Err(PagesError::Format {
                        path: map_path,
                        msg: format!("present page {va:#x} not found"),
                    });
                }
                let same = prev.read(va, &mut theirs)? && mine == theirs;
                if !same {
                    new_pages.extend_from_slice(&mine);
                }
                run = match run {
                    Some((s, start, n)) if s == same => Some((s, start, n + 1)),
                    Some(r) => {
                        flush(r, &mut entries);
                        Some((same, va, 1))
                    }
                    None => Some((same, va, 1)),
                };
            }
            if let Some(r) = run {
                flush(r, &mut entries);
            }
        }
        let kept = new_pages.len() as u64;
        if kept < was {
            stats.kept_bytes -= was - kept;
            rewrites.push(Rewrite {
                pid,
                map: Pagemap {
                    pages_id: 0,
                    entries,
                },
                new_pages,
                old_map,
            });
        }
    }
    Ok((stats, rewrites))
}

/// What [`dedup_against`] would keep, without changing anything (`Stats` with
/// `price_page_dedup` uses it to price the whole-image `full` baseline with page dedup).
pub fn plan_against(dir: &Path, parent: &Path) -> Result<DedupStats> {
    let (mut stats, rewrites) = plan(dir, parent)?;
    stats.depth = usize::from(!rewrites.is_empty()) * (chain_depth(parent) + 1);
    Ok(stats)
}

fn dedup_inner(dir: &Path, parent: &Path, max_chain: usize) -> Result<DedupStats> {
    let depth = chain_depth(parent) + 1;
    if depth > max_chain || !parent.is_dir() {
        let dumped = present_bytes(dir)?;
        return Ok(DedupStats {
            dumped_bytes: dumped,
            kept_bytes: dumped,
            depth: 0,
        });
    }
    let link = dir.join(PARENT);
    let (mut stats, mut rewrites) = plan(dir, parent)?;
    if rewrites.is_empty() {
        return Ok(DedupStats { depth: 0, ..stats });
    }
    link_chain(parent, &link)?;

    // New pages files get fresh ids, so the dump stays intact until every task's pages are
    // written and verified; then each task's page map is switched over by one rename.
    let mut next_id = numbered(dir, "pages")?
        .last()
        .map_or(1, |&id| id as u32 + 1);
    let mut written = Vec::new();
    let staged = (|| {
        for rw in &mut rewrites {
            rw.map.pages_id = next_id;
            next_id += 1;
            let pages_path = dir.join(format!("pages-{}.img", rw.map.pages_id));
            written.push(pages_path.clone());
            write_durably(&pages_path, &rw.new_pages)?;
            verify(dir, &link, rw)?;
        }
        Ok(())
    })();
    if let Err(e) = staged {
        for p in written {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    let switch = || -> Result<()> {
        for rw in &rewrites {
            write_durably(
                &dir.join(format!("pagemap-{}.img", rw.pid)),
                &encode_pagemap(&rw.map),
            )?;
            let old_pages = dir.join(format!("pages-{}.img", rw.old_map.pages_id));
            std::fs::remove_file(&old_pages).map_err(io(&old_pages))?;
        }
        File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
    };
    switch().map_err(|e| PagesError::Inconsistent {
        dir: dir.to_path_buf(),
        source: Box::new(e),
    })?;
    stats.depth = depth;
    Ok(stats)
}

/// Every page of the old map must read back equal through the new map and the chain.
fn verify(dir: &Path, link: &Path, rw: &Rewrite) -> Result<()> {
    let parent = PageSource::open(link, rw.pid)?.map(Box::new);
    let new = PageSource::from_parts(dir, rw.map.clone(), parent)?;
    let old = PageSource::from_parts(dir, rw.old_map.clone(), None)?;
    let (mut a, mut b) = ([0u8; PAGE], [0u8; PAGE]);
    for e in &rw.old_map.entries {
        if flags(e) & PE_PRESENT == 0 {
            // A hole (or lazy range) holds no page to compare, and may span 2^32 pages: the
            // rewrite copies it as it is, so the new map must hold the same entry.
            if !rw.map.entries.iter().any(|n| n == e) {
                return Err(PagesError::Verify {
                    dir: dir.to_path_buf(),
                    pid: rw.pid,
                    vaddr: e.vaddr,
                });
            }
            continue;
        }
        for p in 0..u64::from(e.nr_pages) {
            let va = e.vaddr + p * PAGE as u64;
            let had = old.read(va, &mut a)?;
            let has = new.read(va, &mut b)?;
            if had != has || (had && a != b) {
                return Err(PagesError::Verify {
                    dir: dir.to_path_buf(),
                    pid: rw.pid,
                    vaddr: va,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::dir_bytes;

    /// A temporary dir with a parent image dir `p` and a child image dir `c`.
    fn parent_and_child() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let (p, c) = (t.path().join("p"), t.path().join("c"));
        std::fs::create_dir_all(&p).unwrap();
        std::fs::create_dir_all(&c).unwrap();
        (t, p, c)
    }

    /// Writes a task's image as CRIU would: present entries, pages in entry order.
    fn write_task(dir: &Path, pid: u64, pages_id: u32, runs: &[(u64, Vec<[u8; PAGE]>)]) {
        let mut entries = Vec::new();
        let mut pages = Vec::new();
        for (vaddr, ps) in runs {
            entries.push(PagemapEntry {
                vaddr: *vaddr,
                nr_pages: ps.len() as u32,
                in_parent: None,
                flags: Some(PE_PRESENT | 2),
            });
            for p in ps {
                pages.extend_from_slice(p);
            }
        }
        let pm = Pagemap { pages_id, entries };
        std::fs::write(dir.join(format!("pagemap-{pid}.img")), encode_pagemap(&pm)).unwrap();
        std::fs::write(dir.join(format!("pages-{pages_id}.img")), pages).unwrap();
    }

    fn page(b: u8) -> [u8; PAGE] {
        [b; PAGE]
    }

    fn write_map(dir: &Path, entries: Vec<PagemapEntry>) -> PathBuf {
        let path = dir.join("pagemap-9.img");
        let pm = Pagemap {
            pages_id: 9,
            entries,
        };
        std::fs::write(&path, encode_pagemap(&pm)).unwrap();
        path
    }

    fn entry(vaddr: u64, nr_pages: u32, flags: u32) -> PagemapEntry {
        PagemapEntry {
            vaddr,
            nr_pages,
            in_parent: None,
            flags: Some(flags),
        }
    }

    #[test]
    fn maps_that_wrap_overlap_or_are_unaligned_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let top = u64::MAX - (PAGE as u64 - 1); // the last page
        for (entries, why) in [
            (vec![entry(top, 2, PE_PRESENT)], "past the address space"),
            (
                vec![entry(top - 4096 * 3, u32::MAX, 0)],
                "past the address space",
            ),
            (
                vec![entry(0x1000, 4, PE_PRESENT), entry(0x2000, 1, PE_PRESENT)],
                "overlapping",
            ),
            (vec![entry(0x1001, 1, PE_PRESENT)], "not page-aligned"),
            (
                vec![entry(0x1000, 0, PE_PRESENT), entry(0x1000, 1, PE_PRESENT)],
                "overlapping",
            ),
        ] {
            let p = write_map(t.path(), entries);
            let e = read_pagemap(&p).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
        // An entry may end at the last page (its end, exclusive, is the last page's start).
        let p = write_map(t.path(), vec![entry(top - 4096, 1, 0)]);
        assert_eq!(read_pagemap(&p).unwrap().entries.len(), 1);
    }

    #[test]
    fn a_hole_of_2_to_the_32_pages_is_verified_without_walking_it() {
        let (_t, p, c) = parent_and_child();
        write_task(&p, 1, 1, &[(A, vec![page(1)])]);
        write_task(&c, 1, 2, &[(A, vec![page(1)])]);
        // Add a huge hole after the present page in the child's map.
        let path = c.join("pagemap-1.img");
        let mut pm = read_pagemap(&path).unwrap();
        pm.entries.push(entry(A + 0x1000_0000, u32::MAX, 0));
        std::fs::write(&path, encode_pagemap(&pm)).unwrap();
        let t = std::time::Instant::now();
        let s = dedup_against(&c, &p, 4).unwrap();
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(s.kept_bytes, 0, "the one page equals the parent's");
        let after = read_pagemap(&path).unwrap();
        assert!(after.entries.contains(&entry(A + 0x1000_0000, u32::MAX, 0)));
    }

    /// Reads every page of a task through the chain, as a restore would.
    fn contents(dir: &Path, pid: u64, addrs: &[u64]) -> Vec<Option<u8>> {
        let src = PageSource::open(dir, pid).unwrap().unwrap();
        let mut buf = [0u8; PAGE];
        addrs
            .iter()
            .map(|&a| src.read(a, &mut buf).unwrap().then_some(buf[0]))
            .collect()
    }

    const A: u64 = 0x40_0000;
    const B: u64 = 0x7f00_0000_0000;

    fn addrs() -> Vec<u64> {
        let mut v: Vec<u64> = (0..4).map(|i| A + i * PAGE as u64).collect();
        v.extend((0..3).map(|i| B + i * PAGE as u64));
        v
    }

    #[test]
    fn pagemap_round_trips() {
        let t = tempfile::tempdir().unwrap();
        write_task(
            t.path(),
            1,
            1,
            &[(A, vec![page(1), page(2)]), (B, vec![page(3)])],
        );
        let pm = read_pagemap(&t.path().join("pagemap-1.img")).unwrap();
        assert_eq!(pm.pages_id, 1);
        assert_eq!(pm.entries.len(), 2);
        assert_eq!(
            encode_pagemap(&pm),
            std::fs::read(t.path().join("pagemap-1.img")).unwrap()
        );
    }

    #[test]
    fn rejects_what_is_not_a_pagemap() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("pagemap-1.img");
        std::fs::write(&p, b"not an image").unwrap();
        assert!(matches!(read_pagemap(&p), Err(PagesError::Format { .. })));
    }

    #[test]
    fn keeps_only_changed_pages_and_reads_back_the_same() {
        let (_t, p, c) = parent_and_child();
        write_task(
            &p,
            1,
            1,
            &[
                (A, vec![page(1), page(2), page(3), page(4)]),
                (B, vec![page(5), page(6)]),
            ],
        );
        // The child changed page A+1, grew the B mapping by one page, and has a task the parent
        // did not have.
        write_task(
            &c,
            1,
            1,
            &[
                (A, vec![page(1), page(9), page(3), page(4)]),
                (B, vec![page(5), page(6), page(7)]),
            ],
        );
        write_task(&c, 8, 2, &[(A, vec![page(8)])]);
        let want1 = contents(&c, 1, &addrs());
        let want8 = contents(&c, 8, &[A]);

        let s = dedup_against(&c, &p, MAX_CHAIN).unwrap();
        assert_eq!(s.depth, 1);
        assert_eq!(s.dumped_bytes, 8 * PAGE as u64);
        // Kept: A+1 and B+2 of task 1, and all of task 8 (no parent image).
        assert_eq!(s.kept_bytes, 3 * PAGE as u64);
        assert_eq!(contents(&c, 1, &addrs()), want1);
        assert_eq!(contents(&c, 8, &[A]), want8);
        let pm = read_pagemap(&c.join("pagemap-1.img")).unwrap();
        let shape: Vec<(u64, u32, u32)> = pm
            .entries
            .iter()
            .map(|e| (e.vaddr, e.nr_pages, flags(e)))
            .collect();
        assert_eq!(
            shape,
            vec![
                (A, 1, PE_PARENT),
                (A + PAGE as u64, 1, PE_PRESENT | 2),
                (A + 2 * PAGE as u64, 2, PE_PARENT),
                (B, 2, PE_PARENT),
                (B + 2 * PAGE as u64, 1, PE_PRESENT | 2),
            ]
        );
        // The old pages file is gone; the parent's files are hard links.
        assert!(!c.join("pages-1.img").exists());
        assert!(c.join("parent/pages-1.img").exists());

        // The child still reads back whole once the parent's directory is collected.
        std::fs::remove_dir_all(&p).unwrap();
        assert_eq!(contents(&c, 1, &addrs()), want1);
    }

    #[test]
    fn chains_follow_grandparents_and_stop_at_the_cap() {
        let t = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (0..MAX_CHAIN + 2)
            .map(|i| t.path().join(format!("n{i}")))
            .collect();
        for (i, d) in dirs.iter().enumerate() {
            std::fs::create_dir_all(d).unwrap();
            // Page A changes every time; A+1 never does.
            write_task(d, 1, 1, &[(A, vec![page(i as u8 + 10), page(1)])]);
            if i > 0 {
                let s = dedup_against(d, &dirs[i - 1], MAX_CHAIN).unwrap();
                if i <= MAX_CHAIN {
                    assert_eq!(s.depth, i, "n{i}");
                    assert_eq!(s.kept_bytes, PAGE as u64);
                } else {
                    assert_eq!(s.depth, 0, "n{i} starts a new chain");
                    assert_eq!(s.kept_bytes, 2 * PAGE as u64);
                    assert!(!d.join(PARENT).exists());
                }
            }
            assert_eq!(
                contents(d, 1, &[A, A + PAGE as u64]),
                vec![Some(i as u8 + 10), Some(1)]
            );
        }
        assert_eq!(chain_depth(&dirs[MAX_CHAIN]), MAX_CHAIN);
    }

    #[test]
    fn a_plan_prices_what_a_dedup_keeps_and_changes_nothing() {
        let (_t, p, c) = parent_and_child();
        write_task(&p, 1, 1, &[(A, vec![page(1), page(2), page(3)])]);
        write_task(&c, 1, 1, &[(A, vec![page(1), page(7), page(3)])]);
        let before = std::fs::read(c.join("pagemap-1.img")).unwrap();
        let planned = plan_against(&c, &p).unwrap();
        assert_eq!(std::fs::read(c.join("pagemap-1.img")).unwrap(), before);
        assert!(!c.join(PARENT).exists());
        let done = dedup_against(&c, &p, MAX_CHAIN).unwrap();
        assert_eq!(planned, done);
        assert_eq!(done.kept_bytes, PAGE as u64);
    }

    #[test]
    fn a_second_dedup_is_refused_and_breaks_nothing() {
        let (_t, p, c) = parent_and_child();
        write_task(&p, 1, 1, &[(A, vec![page(1), page(2)])]);
        write_task(&c, 1, 1, &[(A, vec![page(1), page(3)])]);
        dedup_against(&c, &p, MAX_CHAIN).unwrap();
        let want = contents(&c, 1, &[A, A + PAGE as u64]);
        assert!(dedup_against(&c, &p, MAX_CHAIN).is_err());
        assert!(c.join(PARENT).is_dir());
        assert_eq!(contents(&c, 1, &[A, A + PAGE as u64]), want);
        assert_eq!(want, vec![Some(1), Some(3)]);
    }

    #[test]
    fn nothing_shared_leaves_the_dump_alone() {
        let (_t, p, c) = parent_and_child();
        write_task(&p, 1, 1, &[(A, vec![page(1)])]);
        write_task(&c, 1, 1, &[(A, vec![page(2)])]);
        let before = std::fs::read(c.join("pagemap-1.img")).unwrap();
        let s = dedup_against(&c, &p, MAX_CHAIN).unwrap();
        assert_eq!((s.depth, s.kept_bytes), (0, PAGE as u64));
        assert_eq!(std::fs::read(c.join("pagemap-1.img")).unwrap(), before);
        assert!(!c.join(PARENT).exists());
    }

    #[test]
    fn a_broken_parent_leaves_the_dump_alone() {
        let (_t, p, c) = parent_and_child();
        write_task(&p, 1, 1, &[(A, vec![page(1), page(2)])]);
        // Truncated parent pages file: the parent is unusable.
        std::fs::write(p.join("pages-1.img"), [0u8; 10]).unwrap();
        write_task(&c, 1, 1, &[(A, vec![page(1), page(2)])]);
        let before = std::fs::read(c.join("pagemap-1.img")).unwrap();
        assert!(dedup_against(&c, &p, MAX_CHAIN).is_err());
        assert_eq!(std::fs::read(c.join("pagemap-1.img")).unwrap(), before);
        assert!(c.join("pages-1.img").exists());
        assert!(!c.join(PARENT).exists());
    }

    #[test]
    fn dir_bytes_leaves_out_the_parent_links() {
        let (_t, p, c) = parent_and_child();
        write_task(&p, 1, 1, &[(A, vec![page(1); 10])]);
        write_task(&c, 1, 1, &[(A, vec![page(1); 10])]);
        let whole = dir_bytes(&c);
        dedup_against(&c, &p, MAX_CHAIN).unwrap();
        assert!(
            dir_bytes(&c) < whole - 9 * PAGE as u64,
            "{} vs {whole}",
            dir_bytes(&c)
        );
    }
}
