//! The file-tree halves of a node bundle (docs/design.md, "Node bundles, format 1"): the
//! content digest of an image, the filesystem delta of a snapshot against its image (a tar of
//! what differs, and a list of what is gone), and the CRIU image directory as a tar.
//!
//! Reading: the trees read here are scratch volumes that nothing runs on (a clone of the node's
//! snapshot, a volume of the image), so they do not change while they are walked. Their names
//! and links come from a sandbox and are not trusted: nothing is followed (`lstat`, `O_NOFOLLOW`),
//! and only entries that `lstat` calls directories are entered.
//!
//! Writing: every write goes through the image importer's confined writer
//! ([`crate::images::unpack`]): openat2 `RESOLVE_IN_ROOT`, no device nodes, no set-ID files, hard
//! links only to files inside the root. A delta never writes outside the volume it is applied to.

use std::collections::{BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::images::unpack::{self, Kind, Meta, Root, SetId};

/// What a delta holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaCounts {
    /// Entries in the tar (files, directories, links, FIFOs).
    pub entries: u64,
    /// Bytes of file data in it.
    pub file_bytes: u64,
    /// Paths removed.
    pub whiteouts: u64,
    /// Sockets and device nodes left out (a tar has no socket type; sandboxes make no devices).
    pub skipped: u64,
}

fn open_nofollow(p: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p)
}

/// Names in a directory, sorted (bytewise), without following it.
fn sorted_names(dir: &Path) -> Result<Vec<OsString>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir).with_context(|| format!("read directory {}", dir.display()))? {
        v.push(
            e.with_context(|| format!("read directory {}", dir.display()))?
                .file_name(),
        );
    }
    v.sort();
    Ok(v)
}

fn file_type_char(m: &Metadata) -> u8 {
    let t = m.file_type();
    if t.is_dir() {
        b'd'
    } else if t.is_file() {
        b'f'
    } else if t.is_symlink() {
        b'l'
    } else if t.is_fifo() {
        b'p'
    } else if t.is_socket() {
        b's'
    } else if t.is_block_device() {
        b'b'
    } else {
        b'c'
    }
}

/// The content digest of the tree at `root`: SHA-256 over every entry in bytewise path order,
/// each as its path, type, permission bits, owner, and a regular file's size and content or a
/// symlink's target. Times, inode numbers and hard-link structure are left out, so two builds of
/// one image with the same files (`image build debian` from the same debootstrap on two hosts)
/// have the same digest. Returns `sha256:<hex>`.
pub fn digest(root: &Path) -> Result<String> {
    let mut h = Sha256::new();
    digest_dir(root, Path::new(""), &mut h)?;
    Ok(format!("sha256:{}", hex(&h.finalize())))
}

fn digest_dir(root: &Path, rel: &Path, h: &mut Sha256) -> Result<()> {
    let dir = root.join(rel);
    for n in sorted_names(&dir)? {
        let r = rel.join(&n);
        let p = root.join(&r);
        let m = fs::symlink_metadata(&p).with_context(|| format!("stat {}", p.display()))?;
        h.update(r.as_os_str().as_bytes());
        h.update([0, file_type_char(&m)]);
        h.update(format!(" {:o} {} {}", m.mode() & 0o7777, m.uid(), m.gid()).as_bytes());
        if m.is_file() {
            h.update(m.len().to_le_bytes());
            let mut f = open_nofollow(&p).with_context(|| format!("open {}", p.display()))?;
            let mut fh = Sha256::new();
            io::copy(&mut f, &mut fh).with_context(|| format!("read {}", p.display()))?;
            h.update(fh.finalize());
        } else if m.file_type().is_symlink() {
            let t = fs::read_link(&p).with_context(|| format!("readlink {}", p.display()))?;
            h.update(t.as_os_str().as_bytes());
        }
        h.update([b'\n']);
        if m.is_dir() {
            digest_dir(root, &r, h)?;
        }
    }
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes the delta of the tree at `root` against the tree at `base`: to `tar`, every entry of
/// `root` that is new or differs from `base` (type, permission bits, owner, a file's size, mtime
/// or content, a symlink's target), with its mode, owner and mtime; to `whiteouts`, every path of
/// `base` that `root` lacks, each NUL-terminated, a directory once (not its contents). A file
/// that is a hard link of one written earlier (or of an unchanged one) is written as a link.
/// `root` is expected to be a clone of a snapshot of a volume made from `base`'s image: a file
/// whose metadata, inode number and ctime all equal the base's is unchanged without being read.
pub fn write_delta(
    base: &Path,
    root: &Path,
    tar: &mut dyn Write,
    whiteouts: &mut dyn Write,
) -> Result<DeltaCounts> {
    let mut w = DeltaWriter {
        base,
        root,
        tar: tar::Builder::new(tar),
        whiteouts,
        links: HashMap::new(),
        counts: DeltaCounts::default(),
    };
    let rm = fs::symlink_metadata(root).with_context(|| format!("stat {}", root.display()))?;
    let bm = fs::symlink_metadata(base).with_context(|| format!("stat {}", base.display()))?;
    if !same_owner_mode(&rm, &bm) {
        w.entry(Path::new(""), &rm)?;
    }
    w.dir(Path::new(""), true)?;
    w.tar.finish().context("write the delta's tar")?;
    Ok(w.counts)
}

struct DeltaWriter<'a> {
    base: &'a Path,
    root: &'a Path,
    tar: tar::Builder<&'a mut dyn Write>,
    whiteouts: &'a mut dyn Write,
    /// Inode of a multiply-linked file → its first path, and whether that path was written.
    links: HashMap<u64, (PathBuf, bool)>,
    counts: DeltaCounts,
}

fn same_owner_mode(a: &Metadata, b: &Metadata) -> bool {
    (a.mode(), a.uid(), a.gid()) == (b.mode(), b.uid(), b.gid())
}

impl DeltaWriter<'_> {
    /// Compares directory `rel` of the root with the base's (`in_base`: the base has a directory
    /// there too).
    fn dir(&mut self, rel: &Path, in_base: bool) -> Result<()> {
        let names = sorted_names(&self.root.join(rel))?;
        if in_base {
            let have: BTreeSet<&OsString> = names.iter().collect();
            for n in sorted_names(&self.base.join(rel))? {
                if !have.contains(&n) {
                    let p = rel.join(&n);
                    self.whiteouts.write_all(p.as_os_str().as_bytes())?;
                    self.whiteouts.write_all(&[0])?;
                    self.counts.whiteouts += 1;
                }
            }
        }
        for n in names {
            let r = rel.join(&n);
            let rp = self.root.join(&r);
            let m = fs::symlink_metadata(&rp).with_context(|| format!("stat {}", rp.display()))?;
            let b = if in_base {
                match fs::symlink_metadata(self.base.join(&r)) {
                    Ok(b) => Some(b),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                    Err(e) => return Err(e).with_context(|| format!("stat base {}", r.display())),
                }
            } else {
                None
            };
            let b = b.filter(|b| file_type_char(b) == file_type_char(&m));
            let t = m.file_type();
            if t.is_dir() {
                if b.as_ref().is_none_or(|b| !same_owner_mode(&m, b)) {
                    self.entry(&r, &m)?;
                }
                self.dir(&r, b.is_some())?;
            } else if t.is_file() {
                let changed = match &b {
                    None => true,
                    Some(b) => self.file_changed(&r, &m, b)?,
                };
                if m.nlink() > 1 {
                    if let Some((first, written)) = self.links.get(&m.ino()).cloned() {
                        if changed || written {
                            self.link(&r, &m, &first)?;
                        }
                        continue;
                    }
                    self.links.insert(m.ino(), (r.clone(), changed));
                }
                if changed {
                    self.entry(&r, &m)?;
                }
            } else if t.is_symlink() {
                let changed = match &b {
                    None => true,
                    Some(b) => {
                        (m.uid(), m.gid()) != (b.uid(), b.gid())
                            || fs::read_link(&rp)? != fs::read_link(self.base.join(&r))?
                    }
                };
                if changed {
                    self.entry(&r, &m)?;
                }
            } else if t.is_fifo() {
                if b.as_ref().is_none_or(|b| !same_owner_mode(&m, b)) {
                    self.entry(&r, &m)?;
                }
            } else {
                // A socket (meaningless without its listener; CRIU restores a bound socket's
                // file itself) or a device node (sandboxes cannot make them).
                self.counts.skipped += 1;
            }
        }
        Ok(())
    }

    fn file_changed(&self, r: &Path, m: &Metadata, b: &Metadata) -> Result<bool> {
        if !same_owner_mode(m, b)
            || m.len() != b.len()
            || (m.mtime(), m.mtime_nsec()) != (b.mtime(), b.mtime_nsec())
        {
            return Ok(true);
        }
        // A clone keeps inode numbers and ctimes: any write, chmod or utime since changes ctime.
        if (m.ino(), m.ctime(), m.ctime_nsec()) == (b.ino(), b.ctime(), b.ctime_nsec()) {
            return Ok(false);
        }
        let mut x = open_nofollow(&self.root.join(r))?;
        let mut y = open_nofollow(&self.base.join(r))?;
        let (mut bx, mut by) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
        loop {
            let n = read_full(&mut x, &mut bx)?;
            let k = read_full(&mut y, &mut by)?;
            if n != k || bx[..n] != by[..k] {
                return Ok(true);
            }
            if n == 0 {
                return Ok(false);
            }
        }
    }

    fn header(m: &Metadata, kind: tar::EntryType) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(m.mode() & 0o7777);
        h.set_uid(m.uid() as u64);
        h.set_gid(m.gid() as u64);
        h.set_mtime(m.mtime().max(0) as u64);
        h.set_size(0);
        h
    }

    fn entry(&mut self, r: &Path, m: &Metadata) -> Result<()> {
        let p = self.root.join(r);
        let t = m.file_type();
        let shown = if r.as_os_str().is_empty() {
            Path::new(".")
        } else {
            r
        };
        let err = || format!("add {} to the delta", p.display());
        if t.is_dir() {
            let mut h = Self::header(m, tar::EntryType::Directory);
            self.tar
                .append_data(&mut h, shown, io::empty())
                .with_context(err)?;
        } else if t.is_file() {
            let mut h = Self::header(m, tar::EntryType::Regular);
            h.set_size(m.len());
            let f = open_nofollow(&p).with_context(err)?;
            // Exactly the size in the header, even if the file were to change meanwhile.
            let mut data = f.take(m.len());
            self.tar
                .append_data(&mut h, r, &mut data)
                .with_context(err)?;
            self.counts.file_bytes += m.len();
        } else if t.is_symlink() {
            let target = fs::read_link(&p).with_context(err)?;
            let mut h = Self::header(m, tar::EntryType::Symlink);
            self.tar.append_link(&mut h, r, &target).with_context(err)?;
        } else if t.is_fifo() {
            let mut h = Self::header(m, tar::EntryType::Fifo);
            self.tar
                .append_data(&mut h, r, io::empty())
                .with_context(err)?;
        }
        self.counts.entries += 1;
        Ok(())
    }

    fn link(&mut self, r: &Path, m: &Metadata, to: &Path) -> Result<()> {
        let mut h = Self::header(m, tar::EntryType::Link);
        self.tar
            .append_link(&mut h, r, to)
            .with_context(|| format!("add hard link {} to the delta", r.display()))?;
        self.counts.entries += 1;
        Ok(())
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Applies a delta to the tree at `root` (a fresh volume of the image it was made against):
/// removes every path of `whiteouts` (NUL-terminated relative paths), then writes the tar's
/// entries, all through the confined writer. Set-ID files are refused; so are device nodes,
/// paths with `..`, and hard links to anything outside the root.
pub fn apply_delta(root: &Path, whiteouts: &[u8], tar: Box<dyn Read + '_>) -> Result<()> {
    let r = Root::open(root)?;
    for p in whiteouts.split(|b| *b == 0).filter(|p| !p.is_empty()) {
        let raw = Path::new(OsStr::from_bytes(p));
        let rel = unpack::normalize(raw)
            .with_context(|| format!("whiteout {} has a `..` component", raw.display()))?;
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            bail!("whiteout {} names the root", raw.display());
        };
        r.whiteout(parent, name)
            .with_context(|| format!("remove {}", rel.display()))?;
    }
    unpack::write_entries(&r, "node bundle delta", tar, SetId::Refuse, false)
}

/// Writes the CRIU image directory `images` as a tar: its files and, recursively, its `parent/`
/// chain (hard links to the page files of the images it was deduplicated against), each file
/// whole, so the tar holds everything a restore reads. Anything but directories and regular
/// files is refused.
pub fn write_images(images: &Path, tar: &mut dyn Write) -> Result<u64> {
    let mut b = tar::Builder::new(tar);
    let mut bytes = 0;
    images_dir(images, Path::new(""), &mut b, &mut bytes)?;
    b.finish().context("write the image's tar")?;
    Ok(bytes)
}

fn images_dir(
    top: &Path,
    rel: &Path,
    b: &mut tar::Builder<&mut dyn Write>,
    bytes: &mut u64,
) -> Result<()> {
    for n in sorted_names(&top.join(rel))? {
        let r = rel.join(&n);
        let p = top.join(&r);
        let m = fs::symlink_metadata(&p).with_context(|| format!("stat {}", p.display()))?;
        if m.is_dir() {
            let mut h = DeltaWriter::header(&m, tar::EntryType::Directory);
            b.append_data(&mut h, &r, io::empty())?;
            images_dir(top, &r, b, bytes)?;
        } else if m.is_file() {
            let mut h = DeltaWriter::header(&m, tar::EntryType::Regular);
            h.set_size(m.len());
            let f = open_nofollow(&p).with_context(|| format!("open {}", p.display()))?;
            b.append_data(&mut h, &r, f.take(m.len()))
                .with_context(|| format!("add {} to the image's tar", p.display()))?;
            *bytes += m.len();
        } else {
            bail!(
                "{} in a CRIU image directory is neither a file nor a directory",
                p.display()
            );
        }
    }
    Ok(())
}

/// Makes the CRIU image directory `images` (which must not exist) from a tar that
/// [`write_images`] wrote: directories and regular files only, written by the confined writer.
/// On error the directory is removed.
pub fn read_images(images: &Path, tar: Box<dyn Read + '_>) -> Result<()> {
    fs::create_dir(images).with_context(|| format!("create {}", images.display()))?;
    let r = (|| {
        let root = Root::open(images)?;
        let mut ar = tar::Archive::new(tar);
        for e in ar.entries().context("the image's tar is not readable")? {
            let mut e = e.context("the image's tar is not readable")?;
            let raw = e
                .path()
                .context("an entry of the image's tar has a bad path")?;
            let rel = unpack::normalize(&raw)
                .with_context(|| format!("image entry {} has a `..` component", raw.display()))?;
            let h = e.header();
            let meta = Meta {
                mode: h.mode()? & 0o777,
                uid: 0,
                gid: 0,
                mtime: h.mtime().ok().and_then(|m| i64::try_from(m).ok()),
            };
            let kind = match h.entry_type() {
                tar::EntryType::Directory => Kind::Dir,
                tar::EntryType::Regular => Kind::File(&mut e),
                other => bail!(
                    "image entry {} is {other:?}: an image holds only files and directories",
                    rel.display()
                ),
            };
            root.write("node bundle image", &rel, kind, meta, SetId::Refuse)?;
        }
        Ok(())
    })();
    if r.is_err() {
        let _ = fs::remove_dir_all(images);
    }
    r
}

/// Paths of a whiteout list, for messages and tests.
pub fn whiteout_paths(list: &[u8]) -> Vec<PathBuf> {
    list.split(|b| *b == 0)
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(OsString::from_vec(p.to_vec())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write(p: &Path, s: &str) {
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, s).unwrap();
    }

    /// A base, a copy changed in every way a delta carries, and the delta applied to a second
    /// copy of the base gives the changed tree's digest.
    #[test]
    fn a_delta_applied_to_the_base_gives_the_tree() {
        let t = tempfile::tempdir().unwrap();
        let (base, node, target) = (t.path().join("b"), t.path().join("n"), t.path().join("t"));
        for d in [&base, &node, &target] {
            write(&d.join("etc/keep"), "same");
            write(&d.join("etc/gone"), "bye");
            write(&d.join("old/dir/f"), "x");
            write(&d.join("edit"), "before");
            write(&d.join("typechange"), "file");
            symlink("keep", d.join("etc/link")).unwrap();
        }
        write(&node.join("edit"), "after!");
        write(&node.join("new/deep/file"), "hello");
        fs::remove_file(node.join("etc/gone")).unwrap();
        fs::remove_dir_all(node.join("old")).unwrap();
        fs::remove_file(node.join("typechange")).unwrap();
        fs::create_dir(node.join("typechange")).unwrap();
        write(&node.join("typechange/inside"), "y");
        fs::remove_file(node.join("etc/link")).unwrap();
        symlink("/elsewhere", node.join("etc/link")).unwrap();
        fs::hard_link(node.join("etc/keep"), node.join("etc/keep2")).unwrap();
        write(&node.join(".wh.not-a-whiteout"), "a real file");

        let (mut tar, mut wh) = (Vec::new(), Vec::new());
        let c = write_delta(&base, &node, &mut tar, &mut wh).unwrap();
        let mut gone = whiteout_paths(&wh);
        gone.sort();
        assert_eq!(gone, [PathBuf::from("etc/gone"), PathBuf::from("old")]);
        assert_eq!(c.whiteouts, 2);
        apply_delta(&target, &wh, Box::new(&tar[..])).unwrap();
        assert_eq!(digest(&target).unwrap(), digest(&node).unwrap());
        assert_eq!(
            fs::read_to_string(target.join("etc/keep2")).unwrap(),
            "same"
        );
        assert_ne!(digest(&target).unwrap(), digest(&base).unwrap());
    }

    #[test]
    fn a_delta_cannot_climb_out_of_its_root() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        fs::create_dir(&root).unwrap();
        write(&t.path().join("sentinel"), "keep");
        assert!(apply_delta(&root, b"../sentinel\0", Box::new(io::empty())).is_err());
        // A symlink to the outside, then a file through it: written inside the root.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, "out", t.path()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(3);
        b.append_data(&mut h, "out/sentinel", &b"bad"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let _ = apply_delta(&root, b"", Box::new(&data[..]));
        assert_eq!(
            fs::read_to_string(t.path().join("sentinel")).unwrap(),
            "keep"
        );
    }

    #[test]
    fn images_round_trip_with_their_parent_chain() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("n5");
        write(&src.join("pages-1.img"), "pages");
        write(&src.join("parent/pages-1.img"), "older");
        write(&src.join("parent/parent/pagemap-1.img"), "oldest");
        let mut tar = Vec::new();
        assert_eq!(write_images(&src, &mut tar).unwrap(), 16);
        let dst = t.path().join("n9");
        read_images(&dst, Box::new(&tar[..])).unwrap();
        assert_eq!(digest(&dst).unwrap(), digest(&src).unwrap());
        // Anything but files and directories is refused, and leaves no directory behind.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        b.append_link(&mut h, "pages-1.img", "/etc/shadow").unwrap();
        let data = b.into_inner().unwrap();
        let bad = t.path().join("n10");
        assert!(read_images(&bad, Box::new(&data[..])).is_err());
        assert!(!bad.exists());
    }
}
