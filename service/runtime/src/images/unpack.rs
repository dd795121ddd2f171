//! Confined writes into an image root: every path an archive or a source directory names is
//! resolved inside the root, never on the host.
//!
//! The directory of an entry is opened with openat2(2) and `RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS` from a dirfd of the root: a symlink planted by an earlier entry or layer
//! (absolute, or climbing with `..`) is interpreted relative to the image root, as it will be in
//! the sandbox after pivot_root, never relative to the host's root. The last component of an
//! entry is never followed: it is created, replaced or removed with *at(2) calls on that
//! directory fd and `O_NOFOLLOW` / `AT_SYMLINK_NOFOLLOW` (removing a symlink removes the link).
//!
//! What an image may carry, the same for tar layers and directories:
//! - entry paths with a `..` component are refused; a leading `/` is dropped (as tar(1) does);
//! - a hard link must name an existing non-directory inside the root (resolved the same way);
//! - block and character devices are refused: a device node would hand the sandbox a host
//!   device (the runtime mounts its own /dev);
//! - set-user-ID and set-group-ID files are refused unless the import allows them
//!   (`--allow-setuid`); built-in images strip the bits instead ([`sanitize_builtin`]).
//!   Set-group-ID on a directory is kept: it only makes new files inherit the group;
//! - FIFOs are created (a pipe inside the image reaches nothing outside it); sockets in a source
//!   directory are skipped (tar has no socket type, and a socket file means nothing without its
//!   listener);
//! - extended attributes (so also file capabilities, `security.capability`) are not applied.
//!   Directory mtimes are not restored either; file and symlink mtimes are.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use nix::dir::Dir;
use nix::errno::Errno;
use nix::fcntl::{openat, openat2, readlinkat, AtFlags, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{
    fchmod, fstat, fstatat, futimens, mkdirat, mknodat, utimensat, FileStat, Mode, SFlag,
    UtimensatFlags,
};
use nix::sys::time::TimeSpec;
use nix::unistd::{fchown, fchownat, linkat, symlinkat, unlinkat, Gid, Uid, UnlinkatFlags};

/// What to do with set-user-ID / set-group-ID bits on files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetId {
    /// Fail the import, naming the entry.
    Refuse,
    /// Keep the bits (`--allow-setuid`).
    Allow,
    /// Clear the bits (built-in images, staging of an outer archive).
    Strip,
}

/// The type of an entry to write.
pub enum Kind<'a> {
    Dir,
    File(&'a mut dyn Read),
    /// The link's target, stored as it is (it is resolved in the sandbox, inside its root).
    Symlink(OsString),
    /// The path (relative to the root) of the file to link to.
    HardLink(PathBuf),
    Fifo,
    Block,
    Char,
}

/// Owner, permission bits and mtime of an entry.
#[derive(Clone, Copy, Debug)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Option<i64>,
}

/// A directory that every write stays inside.
pub struct Root {
    fd: OwnedFd,
}

const O_DIR_READ: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

fn in_root(flags: OFlag) -> OpenHow {
    OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS)
}

fn is_dir(st: &FileStat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// An archive path relative to the root: a leading `/` and `.` components dropped; `None` if it
/// has a `..` component. The empty path is the root itself.
pub fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

impl Root {
    /// Opens `path` (a directory the caller trusts: the image root or its own staging dir).
    pub fn open(path: &Path) -> Result<Root> {
        let fd = nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| format!("open directory {}", path.display()))?;
        Ok(Root { fd })
    }

    /// The directory `rel` (normalised) resolved inside the root, as an O_PATH fd. With `create`,
    /// missing directories are made (0755, owned by the caller) — each inside the directory its
    /// prefix resolves to, so a dangling symlink on the way is an error, never followed out.
    fn dir(&self, rel: &Path, create: bool) -> nix::Result<OwnedFd> {
        let how = in_root(OFlag::O_PATH | OFlag::O_DIRECTORY);
        let whole = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        match openat2(&self.fd, whole, how) {
            Err(Errno::ENOENT) if create => {}
            r => return r,
        }
        let mut cur = openat2(&self.fd, ".", how)?;
        let mut prefix = PathBuf::new();
        for c in rel.components() {
            prefix.push(c);
            cur = match openat2(&self.fd, &prefix, how) {
                Err(Errno::ENOENT) => {
                    match mkdirat(&cur, c.as_os_str(), Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(e),
                    }
                    openat2(&self.fd, &prefix, how)?
                }
                r => r?,
            };
        }
        Ok(cur)
    }

    /// Opens regular file `rel` for reading, resolved inside the root.
    pub fn open_file(&self, rel: &Path) -> Result<File> {
        let n =
            normalize(rel).with_context(|| format!("{} escapes its directory", rel.display()))?;
        let fd = openat2(&self.fd, &n, in_root(OFlag::O_RDONLY))
            .with_context(|| format!("open {}", rel.display()))?;
        let st = fstat(&fd)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            bail!("{} is not a regular file", rel.display());
        }
        Ok(File::from(fd))
    }

    /// Whether `rel` exists, following symlinks inside the root.
    pub fn exists(&self, rel: &Path) -> bool {
        normalize(rel).is_some_and(|n| openat2(&self.fd, &n, in_root(OFlag::O_PATH)).is_ok())
    }

    /// Makes `name` (directly under the root) a directory with `mode` if nothing is there. With
    /// `replace`, anything there that is not a directory (a symlink included) is replaced by one.
    pub fn ensure_dir(&self, name: &str, mode: u32, replace: bool) -> Result<()> {
        match fstatat(&self.fd, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if is_dir(&st) || !replace => return Ok(()),
            Ok(_) => remove_at(&self.fd, OsStr::new(name))?,
            Err(Errno::ENOENT) => {}
            Err(e) => return Err(anyhow!("stat /{name} in the image: {e}")),
        }
        mkdirat(&self.fd, name, Mode::from_bits_truncate(0o700))
            .with_context(|| format!("mkdir /{name} in the image"))?;
        let fd = openat(&self.fd, name, O_DIR_READ, Mode::empty())?;
        fchmod(&fd, Mode::from_bits_truncate(mode))?;
        Ok(())
    }

    /// Applies whiteout `.wh.NAME` found in directory `parent`: removes NAME there (a symlink
    /// itself, never what it points to; a directory with everything in it).
    pub fn whiteout(&self, parent: &Path, name: &OsStr) -> Result<()> {
        if name.is_empty() || name == "." || name == ".." || name.as_bytes().contains(&b'/') {
            bail!("bad whiteout name {name:?}");
        }
        let dir = match self.dir(parent, false) {
            Err(Errno::ENOENT | Errno::ENOTDIR) => return Ok(()),
            r => r?,
        };
        remove_at(&dir, name)?;
        Ok(())
    }

    /// Applies an opaque whiteout (`.wh..wh..opq`) in `dir`: empties it.
    pub fn make_opaque(&self, dir: &Path) -> Result<()> {
        let whole = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        match openat2(
            &self.fd,
            whole,
            in_root(OFlag::O_RDONLY | OFlag::O_DIRECTORY),
        ) {
            Err(Errno::ENOENT | Errno::ENOTDIR) => Ok(()),
            Err(e) => Err(e.into()),
            Ok(fd) => Ok(empty_dir(fd)?),
        }
    }

    /// Writes one entry at `rel` (normalised). `what` names the source in errors ("image layer 2").
    pub fn write(
        &self,
        what: &str,
        rel: &Path,
        kind: Kind,
        meta: Meta,
        setid: SetId,
    ) -> Result<()> {
        let shown = rel.display();
        match kind {
            Kind::Block => {
                bail!("{what}: entry {shown} is a block device; images may not carry device nodes")
            }
            Kind::Char => bail!(
                "{what}: entry {shown} is a character device; images may not carry device nodes"
            ),
            _ => {}
        }
        let mut mode = meta.mode & 0o7777;
        if mode & 0o6000 != 0 && matches!(kind, Kind::File(_) | Kind::Fifo) {
            match setid {
                SetId::Refuse => bail!(
                    "{what}: entry {shown} is set-user-ID or set-group-ID (mode {mode:o}); \
                     import with --allow-setuid to keep such files"
                ),
                SetId::Strip => mode &= !0o6000,
                SetId::Allow => {}
            }
        }
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            // The root itself: its mode and owner are the storage's.
            if matches!(kind, Kind::Dir) {
                return Ok(());
            }
            bail!("{what}: entry {shown:?} would replace the image root");
        };
        let dir = self.dir(parent, true).map_err(|e| {
            anyhow!(
                "{what}: entry {shown}: cannot open its directory {:?} inside the image: {e}",
                parent.display()
            )
        })?;
        write_at(&dir, name, kind, self, meta, mode)
            .with_context(|| format!("{what}: entry {shown}"))
    }
}

fn write_at(
    dir: &OwnedFd,
    name: &OsStr,
    kind: Kind,
    root: &Root,
    meta: Meta,
    mode: u32,
) -> Result<()> {
    let existing = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Some(st),
        Err(Errno::ENOENT) => None,
        Err(e) => return Err(e.into()),
    };
    let (uid, gid) = (Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)));
    let perm = Mode::from_bits_truncate(mode);
    let mtime = TimeSpec::new(meta.mtime.unwrap_or(0), 0);
    match kind {
        Kind::Dir => {
            match existing {
                Some(st) if is_dir(&st) => {}
                Some(_) => {
                    remove_at(dir, name)?;
                    mkdirat(dir, name, Mode::from_bits_truncate(0o700))?;
                }
                None => mkdirat(dir, name, Mode::from_bits_truncate(0o700))?,
            }
            let fd = openat(dir, name, O_DIR_READ, Mode::empty())?;
            fchown(&fd, uid, gid)?;
            fchmod(&fd, perm)?;
        }
        Kind::File(data) => {
            if existing.is_some() {
                remove_at(dir, name)?;
            }
            let fd = openat(
                dir,
                name,
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(0o600),
            )?;
            let mut f = File::from(fd);
            io::copy(data, &mut f).context("write its data")?;
            // chown first: it clears set-user-ID bits that fchmod then sets.
            fchown(&f, uid, gid)?;
            fchmod(&f, perm)?;
            if meta.mtime.is_some() {
                futimens(&f, &mtime, &mtime)?;
            }
        }
        Kind::Symlink(target) => {
            if existing.is_some() {
                remove_at(dir, name)?;
            }
            symlinkat(target.as_os_str(), dir, name)?;
            fchownat(dir, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)?;
            if meta.mtime.is_some() {
                utimensat(dir, name, &mtime, &mtime, UtimensatFlags::NoFollowSymlink)?;
            }
        }
        Kind::HardLink(target) => {
            let t = normalize(&target)
                .with_context(|| format!("hard link to {} leaves the image", target.display()))?;
            let (Some(tparent), Some(tname)) = (t.parent(), t.file_name()) else {
                bail!("hard link to the image root");
            };
            let tdir = root.dir(tparent, false).map_err(|e| {
                anyhow!(
                    "hard link to {}: not inside the image: {e}",
                    target.display()
                )
            })?;
            let tst = fstatat(&tdir, tname, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(|e| {
                anyhow!(
                    "hard link to {}: not inside the image: {e}",
                    target.display()
                )
            })?;
            if is_dir(&tst) {
                bail!("hard link to directory {}", target.display());
            }
            if let Some(st) = existing {
                if (st.st_dev, st.st_ino) == (tst.st_dev, tst.st_ino) {
                    return Ok(());
                }
                remove_at(dir, name)?;
            }
            // No AT_SYMLINK_FOLLOW: a symlink target is linked itself, not what it points to.
            linkat(&tdir, tname, dir, name, AtFlags::empty())?;
        }
        Kind::Fifo => {
            if existing.is_some() {
                remove_at(dir, name)?;
            }
            mknodat(
                dir,
                name,
                SFlag::S_IFIFO,
                Mode::from_bits_truncate(0o600),
                0,
            )?;
            // Opening a FIFO read-only and non-blocking does not wait for a writer.
            let fd = openat(
                dir,
                name,
                OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )?;
            fchown(&fd, uid, gid)?;
            fchmod(&fd, perm)?;
        }
        Kind::Block | Kind::Char => unreachable!("refused by Root::write"),
    }
    Ok(())
}

/// Removes `name` in `dir` without following it; a directory with all it holds. Absent is fine.
fn remove_at<Fd: AsFd>(dir: &Fd, name: &OsStr) -> nix::Result<()> {
    let st = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Err(Errno::ENOENT) => return Ok(()),
        r => r?,
    };
    if is_dir(&st) {
        empty_dir(openat(dir, name, O_DIR_READ, Mode::empty())?)?;
        unlinkat(dir, name, UnlinkatFlags::RemoveDir)
    } else {
        unlinkat(dir, name, UnlinkatFlags::NoRemoveDir)
    }
}

/// Names in a directory (opened for reading), without `.` and `..`, sorted.
fn names(d: &mut Dir) -> nix::Result<Vec<OsString>> {
    let mut v = Vec::new();
    for e in d.iter() {
        let n = e?.file_name().to_bytes().to_vec();
        if n != b"." && n != b".." {
            v.push(OsString::from_vec(n));
        }
    }
    v.sort();
    Ok(v)
}

/// Removes everything in a directory (an fd opened for reading), following no symlink.
fn empty_dir(fd: OwnedFd) -> nix::Result<()> {
    let mut d = Dir::from_fd(fd)?;
    for n in names(&mut d)? {
        remove_at(&d, &n)?;
    }
    Ok(())
}

/// Opens an archive file, gunzipping it if it starts with the gzip magic.
pub fn open_archive(f: File, shown: &Path) -> Result<Box<dyn Read>> {
    let mut r = BufReader::new(f);
    let head = r
        .fill_buf()
        .with_context(|| format!("read {}", shown.display()))?;
    let other = [
        (&b"\x28\xb5\x2f\xfd"[..], "zstd"),
        (b"\xfd7zXZ\x00", "xz"),
        (b"BZh", "bzip2"),
    ];
    if head.starts_with(b"\x1f\x8b") {
        return Ok(Box::new(flate2::bufread::MultiGzDecoder::new(r)));
    }
    if let Some((_, alg)) = other.iter().find(|(m, _)| head.starts_with(m)) {
        bail!(
            "{} is {alg}-compressed: only tar and gzip-compressed tar are supported",
            shown.display()
        );
    }
    Ok(Box::new(r))
}

/// Opens one archive for a pass over its entries.
pub type Opener<'a> = &'a dyn Fn() -> Result<Box<dyn Read>>;

fn entry_path<R: Read>(e: &tar::Entry<R>, what: &str) -> Result<PathBuf> {
    let raw = e
        .path()
        .with_context(|| format!("{what}: an entry has a bad path"))?;
    normalize(&raw).with_context(|| {
        format!(
            "{what}: entry {} has a `..` component; refused",
            raw.display()
        )
    })
}

fn entries_err(what: &str) -> String {
    format!("{what} is not a readable tar archive")
}

/// Applies one layer: first its whiteouts (`.wh.NAME` removes NAME, `.wh..wh..opq` empties its
/// directory), which act on the layers below, then its entries.
pub fn apply_layer(root: &Root, what: &str, open: Opener, setid: SetId) -> Result<()> {
    let mut ar = tar::Archive::new(open()?);
    for e in ar.entries().with_context(|| entries_err(what))? {
        let e = e.with_context(|| entries_err(what))?;
        let rel = entry_path(&e, what)?;
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            continue;
        };
        let name = name.as_bytes();
        let r = if name == b".wh..wh..opq" {
            root.make_opaque(parent)
        } else if name.starts_with(b".wh..wh.") {
            // Other aufs metadata (.wh..wh.plnk, .wh..wh.aufs): nothing to apply.
            Ok(())
        } else if let Some(target) = name.strip_prefix(b".wh.") {
            root.whiteout(parent, OsStr::from_bytes(target))
        } else {
            Ok(())
        };
        r.with_context(|| format!("{what}: whiteout {}", rel.display()))?;
    }
    write_entries(root, what, open()?, setid, true)
}

/// Writes every entry of a tar archive into the root (pass two of [`apply_layer`]). With
/// `skip_whiteouts`, entries named `.wh.*` (a layer's whiteouts, applied before) are skipped;
/// without, they are files like any other (a node bundle's delta, whose deletions come apart).
pub fn write_entries(
    root: &Root,
    what: &str,
    archive: Box<dyn Read + '_>,
    setid: SetId,
    skip_whiteouts: bool,
) -> Result<()> {
    let mut ar = tar::Archive::new(archive);
    for e in ar.entries().with_context(|| entries_err(what))? {
        let mut e = e.with_context(|| entries_err(what))?;
        let rel = entry_path(&e, what)?;
        if skip_whiteouts
            && rel
                .file_name()
                .is_some_and(|n| n.as_bytes().starts_with(b".wh."))
        {
            continue;
        }
        let h = e.header();
        // Devices are refused before anything else of the header is read.
        let device = match h.entry_type() {
            tar::EntryType::Block => Some(Kind::Block),
            tar::EntryType::Char => Some(Kind::Char),
            _ => None,
        };
        if let Some(kind) = device {
            let meta = Meta {
                mode: 0,
                uid: 0,
                gid: 0,
                mtime: None,
            };
            root.write(what, &rel, kind, meta, setid)?;
            continue;
        }
        let id = |v: io::Result<u64>, which: &str| -> Result<u32> {
            let v = v.with_context(|| format!("{what}: entry {}: bad {which}", rel.display()))?;
            u32::try_from(v)
                .with_context(|| format!("{what}: entry {}: {which} {v} too large", rel.display()))
        };
        let meta = Meta {
            mode: h
                .mode()
                .with_context(|| format!("{what}: entry {}: bad mode", rel.display()))?,
            uid: id(h.uid(), "uid")?,
            gid: id(h.gid(), "gid")?,
            mtime: h.mtime().ok().and_then(|m| i64::try_from(m).ok()),
        };
        let trailing_slash = e.path_bytes().ends_with(b"/");
        let link = || -> Result<Vec<u8>> {
            Ok(e.link_name_bytes()
                .with_context(|| format!("{what}: entry {}: link without a target", rel.display()))?
                .into_owned())
        };
        use tar::EntryType as T;
        let kind = match h.entry_type() {
            T::Directory => Kind::Dir,
            T::Regular | T::Continuous if trailing_slash => Kind::Dir,
            T::Symlink => Kind::Symlink(OsString::from_vec(link()?)),
            T::Link => Kind::HardLink(PathBuf::from(OsString::from_vec(link()?))),
            T::Fifo => Kind::Fifo,
            T::Block => Kind::Block,
            T::Char => Kind::Char,
            // A GNU sparse entry may declare holes far larger than the archive, which would be
            // written out as zeros: a small archive could fill the pool. Refused.
            T::GNUSparse => bail!(
                "{what}: entry {} is a GNU sparse file, which image import does not take \
                 (re-create the archive without --sparse)",
                rel.display()
            ),
            T::Regular | T::Continuous => Kind::File(&mut e),
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink => continue,
            other => bail!(
                "{what}: entry {} has an unsupported type {other:?}",
                rel.display()
            ),
        };
        root.write(what, &rel, kind, meta, setid)?;
    }
    Ok(())
}

/// The shape of a tar file given to `image import`.
#[derive(Debug, PartialEq, Eq)]
pub enum ArchiveShape {
    DockerSave,
    OciLayout,
    Rootfs,
}

/// Looks at the top-level names of an archive: `manifest.json` without `etc/` is a docker-save
/// archive, `oci-layout` an OCI image layout, anything else a rootfs.
pub fn shape(open: Opener, shown: &Path) -> Result<ArchiveShape> {
    let (mut manifest, mut oci, mut etc) = (false, false, false);
    let mut ar = tar::Archive::new(open()?);
    let err = || format!("{} is not a readable tar archive", shown.display());
    for e in ar.entries().with_context(err)? {
        let e = e.with_context(err)?;
        let Some(rel) = e.path().ok().and_then(|p| normalize(&p)) else {
            continue;
        };
        let mut c = rel.components();
        let first = c.next().map(|c| c.as_os_str().to_owned());
        let only = c.next().is_none();
        match first.as_deref().and_then(OsStr::to_str) {
            Some("manifest.json") if only => manifest = true,
            Some("oci-layout") if only => oci = true,
            Some("etc") => etc = true,
            _ => {}
        }
    }
    Ok(if manifest && !etc {
        ArchiveShape::DockerSave
    } else if oci {
        ArchiveShape::OciLayout
    } else {
        ArchiveShape::Rootfs
    })
}

/// Copies directory `src` into the root with the same rules as a layer: nothing in `src` is
/// followed (symlinks are copied as symlinks, subdirectories opened with O_NOFOLLOW), hard links
/// between its files are kept.
pub fn copy_dir(root: &Root, src: &Path, what: &str, setid: SetId) -> Result<()> {
    let fd = nix::fcntl::open(src, O_DIR_READ, Mode::empty())
        .with_context(|| format!("open {}", src.display()))?;
    let mut links = HashMap::new();
    walk(root, what, fd, Path::new(""), &mut links, setid)
}

fn walk(
    root: &Root,
    what: &str,
    fd: OwnedFd,
    rel: &Path,
    links: &mut HashMap<(u64, u64), PathBuf>,
    setid: SetId,
) -> Result<()> {
    let mut d = Dir::from_fd(fd)?;
    let read_err = |n: &OsStr| format!("{what}: read {}", rel.join(n).display());
    for n in names(&mut d).with_context(|| read_err(OsStr::new("")))? {
        let st = fstatat(&d, n.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .with_context(|| read_err(&n))?;
        let child = rel.join(&n);
        let meta = Meta {
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime: Some(st.st_mtime),
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                root.write(what, &child, Kind::Dir, meta, setid)?;
                let sub = openat(&d, n.as_os_str(), O_DIR_READ, Mode::empty())
                    .with_context(|| read_err(&n))?;
                walk(root, what, sub, &child, links, setid)?;
            }
            libc::S_IFREG => {
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1 {
                    if let Some(first) = links.get(&key) {
                        let kind = Kind::HardLink(first.clone());
                        root.write(what, &child, kind, meta, setid)?;
                        continue;
                    }
                }
                let fd = openat(
                    &d,
                    n.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .with_context(|| read_err(&n))?;
                let mut f = File::from(fd);
                root.write(what, &child, Kind::File(&mut f), meta, setid)?;
                if st.st_nlink > 1 {
                    links.insert(key, child);
                }
            }
            libc::S_IFLNK => {
                let target = readlinkat(&d, n.as_os_str()).with_context(|| read_err(&n))?;
                root.write(what, &child, Kind::Symlink(target), meta, setid)?;
            }
            libc::S_IFIFO => root.write(what, &child, Kind::Fifo, meta, setid)?,
            libc::S_IFBLK => root.write(what, &child, Kind::Block, meta, setid)?,
            libc::S_IFCHR => root.write(what, &child, Kind::Char, meta, setid)?,
            _ => {} // a socket
        }
    }
    Ok(())
}

/// For built-in images (debootstrap, busybox): clears set-user-ID / set-group-ID bits on files
/// and removes block and character device nodes (debootstrap makes some in /dev; the runtime
/// mounts its own /dev over it). Debian legitimately ships setuid binaries (su, mount, passwd):
/// sandboxes run with no_new_privs, so the bits would grant nothing; clearing them makes the
/// images say so. Nothing is followed.
pub fn sanitize_builtin(root: &Path) -> Result<()> {
    let fd = nix::fcntl::open(root, O_DIR_READ, Mode::empty())
        .with_context(|| format!("open {}", root.display()))?;
    sanitize_dir(fd, root)
}

fn sanitize_dir(fd: OwnedFd, at: &Path) -> Result<()> {
    let mut d = Dir::from_fd(fd)?;
    for n in names(&mut d).with_context(|| format!("read {}", at.display()))? {
        let p = at.join(&n);
        let st = fstatat(&d, n.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            .with_context(|| format!("stat {}", p.display()))?;
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let sub = openat(&d, n.as_os_str(), O_DIR_READ, Mode::empty())
                    .with_context(|| format!("open {}", p.display()))?;
                sanitize_dir(sub, &p)?;
            }
            libc::S_IFBLK | libc::S_IFCHR => {
                unlinkat(&d, n.as_os_str(), UnlinkatFlags::NoRemoveDir)
                    .with_context(|| format!("remove device node {}", p.display()))?
            }
            libc::S_IFREG if st.st_mode & 0o6000 != 0 => {
                let f = openat(
                    &d,
                    n.as_os_str(),
                    OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .with_context(|| format!("open {}", p.display()))?;
                fchmod(&f, Mode::from_bits_truncate(st.st_mode & 0o1777))
                    .with_context(|| format!("chmod {}", p.display()))?;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> Meta {
        // SAFETY: geteuid/getegid have no preconditions.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        Meta {
            mode: 0o644,
            uid,
            gid,
            mtime: None,
        }
    }

    /// A root and a sentinel directory beside it, with one file, that no write may touch.
    fn setup() -> (tempfile::TempDir, PathBuf, Root, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let rootp = t.path().join("root");
        let sentinel = t.path().join("sentinel");
        std::fs::create_dir_all(&rootp).unwrap();
        std::fs::create_dir_all(&sentinel).unwrap();
        std::fs::write(sentinel.join("keepme"), "x").unwrap();
        let root = Root::open(&rootp).unwrap();
        (t, rootp, root, sentinel)
    }

    fn sentinel_intact(s: &Path) {
        let names: Vec<_> = std::fs::read_dir(s)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("keepme")]);
    }

    #[test]
    fn gnu_sparse_entries_are_refused() {
        let (_t, rootp, root, sentinel) = setup();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNUSparse);
        h.set_path("big").unwrap();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        // One byte of data past a hole of 1 TiB: what would be written out as zeros.
        let gnu = h.as_gnu_mut().unwrap();
        gnu.sparse[0].set_offset(1 << 40);
        gnu.sparse[0].set_length(1);
        gnu.set_real_size((1 << 40) + 1);
        gnu.set_is_extended(false);
        h.set_cksum();
        b.append(&h, &b"x"[..]).unwrap();
        let bytes = b.into_inner().unwrap();
        let open = || -> Result<Box<dyn Read>> { Ok(Box::new(io::Cursor::new(bytes.clone()))) };
        let e = apply_layer(&root, "layer", &open, SetId::Refuse).unwrap_err();
        assert!(format!("{e:#}").contains("GNU sparse"), "{e:#}");
        assert!(std::fs::symlink_metadata(rootp.join("big")).is_err());
        sentinel_intact(&sentinel);
    }

    #[test]
    fn normalize_drops_root_and_dot_and_refuses_dotdot() {
        assert_eq!(normalize(Path::new("/a/./b/")), Some(PathBuf::from("a/b")));
        assert_eq!(normalize(Path::new("./")), Some(PathBuf::new()));
        assert_eq!(normalize(Path::new("a/../b")), None);
        assert_eq!(normalize(Path::new("../x")), None);
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let (_t, rootp, root, sentinel) = setup();
        for (n, target) in [
            ("abs", sentinel.clone()),
            ("up", PathBuf::from("../../../..")),
        ] {
            let kind = Kind::Symlink(target.into_os_string());
            root.write("t", Path::new(n), kind, me(), SetId::Refuse)
                .unwrap();
        }
        // Through an absolute link: lands under <root>/<sentinel path> (or fails), never in the
        // sentinel.
        let mut data: &[u8] = b"new";
        let _ = root.write(
            "t",
            Path::new("abs/file"),
            Kind::File(&mut data),
            me(),
            SetId::Refuse,
        );
        let mut data: &[u8] = b"new";
        root.write(
            "t",
            Path::new("up/file"),
            Kind::File(&mut data),
            me(),
            SetId::Refuse,
        )
        .unwrap();
        assert_eq!(std::fs::read(rootp.join("file")).unwrap(), b"new");
        root.whiteout(Path::new("abs"), OsStr::new("keepme"))
            .unwrap();
        root.make_opaque(Path::new("abs")).unwrap();
        // A whiteout of the link removes the link.
        root.whiteout(Path::new(""), OsStr::new("abs")).unwrap();
        assert!(std::fs::symlink_metadata(rootp.join("abs")).is_err());
        sentinel_intact(&sentinel);
    }

    #[test]
    fn hard_links_stay_inside_and_devices_and_setuid_are_refused() {
        let (_t, _rootp, root, sentinel) = setup();
        let out = sentinel.join("keepme");
        let e = root
            .write(
                "t",
                Path::new("h"),
                Kind::HardLink(out),
                me(),
                SetId::Refuse,
            )
            .unwrap_err();
        assert!(format!("{e:#}").contains("not inside the image"), "{e:#}");
        let e = root
            .write(
                "image layer 3",
                Path::new("dev/loop0"),
                Kind::Block,
                me(),
                SetId::Refuse,
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "image layer 3: entry dev/loop0 is a block device; images may not carry device nodes"
        );
        let m = Meta {
            mode: 0o4755,
            ..me()
        };
        let mut data: &[u8] = b"";
        let e = root
            .write(
                "t",
                Path::new("su"),
                Kind::File(&mut data),
                m,
                SetId::Refuse,
            )
            .unwrap_err();
        assert!(e.to_string().contains("--allow-setuid"), "{e}");
        let mut data: &[u8] = b"";
        root.write("t", Path::new("su"), Kind::File(&mut data), m, SetId::Strip)
            .unwrap();
        let e = root.whiteout(Path::new(""), OsStr::new("..")).unwrap_err();
        assert!(e.to_string().contains("bad whiteout"));
        sentinel_intact(&sentinel);
    }
}
