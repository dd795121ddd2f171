//! Images: root filesystems that become read-only bases on the storage backend.
//!
//! - `busybox`: the host's busybox-static with every applet linked into /bin;
//! - `debian`: `debootstrap --variant=minbase --include=python3,git bookworm`, from the Debian
//!   mirror in the machine's apt configuration;
//! - import of a rootfs directory, a tar / tar.gz, an OCI image layout or a `docker save`
//!   archive, applying layers in order with their whiteouts. Import reads archives and
//!   directories itself (`unpack`): every path resolves inside the image root, device nodes are
//!   refused, and so are set-ID files unless the import allows them.
//!
//! Every image gets the directories the runtime mounts over (/proc, /dev, /.sandtree) plus
//! /workspace and /tmp. A failed build leaves nothing behind: the backend's `create_base` destroys
//! what `populate` started when it returns an error. A base counts as made only once it is durable:
//! `create_base` syncs its files (dir: syncfs; btrfs and zfs: the snapshot that seals it commits)
//! and fsyncs `images/` and its parent; the image's config is then written with its directory
//! fsynced in the data dir (`Engine::save_image_config`).

pub(crate) mod unpack;

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use sandtree_storage::{SnapshotBackend, SnapshotError};
use unpack::{ArchiveShape, Root, SetId};

/// Reports progress lines of long work.
pub type Progress<'a> = &'a (dyn Fn(String) + Sync + Send);

/// Builds one of the built-in images.
pub fn build(storage: &dyn SnapshotBackend, name: &str, progress: Progress) -> Result<()> {
    match name {
        // Built-in images have their set-ID bits cleared and device nodes removed
        // (`unpack::sanitize_builtin`) rather than refused: debian ships setuid su, mount,
        // passwd..., which grant nothing under the sandboxes' no_new_privs anyway.
        "busybox" => create(storage, name, progress, &mut |root| {
            populate_busybox(root)?;
            unpack::sanitize_builtin(root)
        }),
        "debian" => create(storage, name, progress, &mut |root| {
            populate_debian(root, progress)?;
            unpack::sanitize_builtin(root)
        }),
        other => bail!("unknown image kind {other:?}: expected busybox or debian (use `image import` for others)"),
    }
}

/// Options of `image import`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ImportOptions {
    /// Keep set-user-ID / set-group-ID files instead of refusing the import.
    pub allow_setuid: bool,
}

/// Imports a directory, tar(.gz), OCI layout or docker-save archive as image `name`. Every write
/// stays inside the image root (see `unpack`); a refused entry fails the whole import.
pub fn import(
    storage: &dyn SnapshotBackend,
    name: &str,
    path: &Path,
    opts: ImportOptions,
    progress: Progress,
) -> Result<ImageConfig> {
    let mut config = ImageConfig::default();
    import_into(storage, name, path, opts, progress, &mut config)?;
    Ok(config)
}

/// What an OCI or docker-save image's config says an episode starts with: its environment,
/// working directory and user (resolved against the image's /etc/passwd and /etc/group at
/// import, so a missing user fails the import, not a step).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageConfig {
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    /// (uid, gid) the image's `User` names; None: root.
    pub user: Option<(u32, u32)>,
}

impl ImageConfig {
    /// Reads the `config` object of an image config JSON (OCI image config or docker-save's).
    fn from_json(v: &serde_json::Value, root: &Root) -> Result<ImageConfig> {
        let c = &v["config"];
        let mut env = Vec::new();
        for e in c["Env"].as_array().into_iter().flatten() {
            let e = e
                .as_str()
                .context("image config Env has a non-string entry")?;
            let (k, val) = e
                .split_once('=')
                .with_context(|| format!("image config Env entry {e:?} has no '='"))?;
            if k.is_empty() || k.contains('\0') || val.contains('\0') {
                bail!("image config Env entry {e:?} is not a valid variable");
            }
            env.push((k.to_string(), val.to_string()));
        }
        let working_dir = c["WorkingDir"]
            .as_str()
            .filter(|w| !w.is_empty())
            .map(|w| {
                if !w.starts_with('/') || w.contains('\0') || w.len() > 4096 {
                    bail!("image config WorkingDir {w:?} is not an absolute path");
                }
                Ok(w.to_string())
            })
            .transpose()?;
        let user = match c["User"].as_str().filter(|u| !u.is_empty()) {
            None => None,
            Some(u) => resolve_user(root, u)?,
        };
        Ok(ImageConfig {
            env,
            working_dir,
            user,
        })
    }
}

/// `User` of an image config (`name`, `uid`, `name:group`, `uid:gid`) as (uid, gid), looked up
/// in the image's own /etc/passwd and /etc/group. root is None.
fn resolve_user(root: &Root, spec: &str) -> Result<Option<(u32, u32)>> {
    let read = |f: &str| -> String {
        let mut s = String::new();
        if let Ok(mut file) = root.open_file(Path::new(f)) {
            let _ = (&mut file).take(1 << 20).read_to_string(&mut s);
        }
        s
    };
    let (passwd, group) = (read("etc/passwd"), read("etc/group"));
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let entry = |db: &str, name: &str| -> Option<(u32, Option<u32>)> {
        db.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 3 || f[0] != name {
                return None;
            }
            Some((f[2].parse().ok()?, f.get(3).and_then(|x| x.parse().ok())))
        })
    };
    let (uid, primary) = match u.parse::<u32>() {
        Ok(n) => (n, None),
        Err(_) => entry(&passwd, u).with_context(|| {
            format!("the image's User {spec:?} names a user that is not in its /etc/passwd")
        })?,
    };
    let gid = match g {
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => entry(&group, g).map(|(gid, _)| gid).with_context(|| {
                format!("the image's User {spec:?} names a group that is not in its /etc/group")
            })?,
        },
        None => primary.unwrap_or(uid),
    };
    Ok((uid != 0 || gid != 0).then_some((uid, gid)))
}

fn import_into(
    storage: &dyn SnapshotBackend,
    name: &str,
    path: &Path,
    opts: ImportOptions,
    progress: Progress,
    config: &mut ImageConfig,
) -> Result<()> {
    let meta = fs::metadata(path)
        .with_context(|| format!("import source {} does not exist", path.display()))?;
    let path = path.canonicalize()?;
    create(storage, name, progress, &mut |root_path| {
        populate_import(root_path, &path, meta.is_dir(), opts, progress, config)
    })
}

/// Fills the empty image root `root_path` from `path` (canonical; a directory if `is_dir`): what
/// `import` does between creating the base and committing it. A staging directory for an outer
/// archive is made next to `root_path` and removed again.
pub(crate) fn populate_import(
    root_path: &Path,
    path: &Path,
    is_dir: bool,
    opts: ImportOptions,
    progress: Progress,
    config: &mut ImageConfig,
) -> Result<()> {
    let setid = if opts.allow_setuid {
        SetId::Allow
    } else {
        SetId::Refuse
    };
    let root = Root::open(root_path)?;
    if is_dir && path.join("oci-layout").exists() {
        let src = Root::open(path)?;
        let (layers, cfg) = oci_layers(&src)?;
        apply_layers(&root, &src, &layers, setid, progress)?;
        if let Some(c) = cfg {
            *config = ImageConfig::from_json(&c, &root)?;
        }
        Ok(())
    } else if is_dir {
        progress(format!("copying {}", path.display()));
        let what = format!("image directory {}", path.display());
        unpack::copy_dir(&root, path, &what, setid)
    } else {
        let open = || unpack::open_archive(fs::File::open(path)?, path);
        let shape = unpack::shape(&open, path)?;
        if shape == ArchiveShape::Rootfs {
            progress("plain rootfs tarball".into());
            return unpack::apply_layer(&root, "image layer 1", &open, setid);
        }
        // The outer archive is unpacked by the same confined code into a staging dir;
        // set-ID bits there are cleared (it is on the host's filesystem for a while).
        let staging = tempdir_near(root_path)?;
        let r = (|| {
            let st = Root::open(&staging)?;
            let what = format!("archive {}", path.display());
            unpack::apply_layer(&st, &what, &open, SetId::Strip)?;
            let (layers, cfg) = match shape {
                ArchiveShape::DockerSave => docker_save_layers(&st)?,
                _ => oci_layers(&st)?,
            };
            apply_layers(&root, &st, &layers, setid, progress)?;
            if let Some(c) = cfg {
                *config = ImageConfig::from_json(&c, &root)?;
            }
            Ok(())
        })();
        let _ = fs::remove_dir_all(&staging);
        r
    }
}

fn create(
    storage: &dyn SnapshotBackend,
    name: &str,
    progress: Progress,
    f: &mut dyn FnMut(&Path) -> Result<()>,
) -> Result<()> {
    sandtree_storage::validate_name(name).map_err(|_| {
        anyhow::anyhow!(
            "invalid image name {name:?}: use letters, digits, '.', '_' and '-' (no '/' or '..')"
        )
    })?;
    if storage.has_base(name)? {
        bail!("image {name} already exists");
    }
    progress(format!("creating image {name} on {}", storage.describe()));
    storage.create_base(name, &mut |root: &Path| {
        let r = f(root).and_then(|()| finish_rootfs(root));
        r.map_err(|e| SnapshotError::Unsupported(format!("{e:#}")))
    })?;
    progress(format!("image {name} ready"));
    Ok(())
}

/// The directories every sandbox rootfs needs. /proc, /dev and /.sandtree, which the runtime
/// mounts over, are made real directories (a symlink there is replaced).
fn finish_rootfs(root: &Path) -> Result<()> {
    let r = Root::open(root)?;
    if !r.exists(Path::new("bin/sh")) {
        bail!("the image has no /bin/sh, which every turn runs with");
    }
    for (d, mode, replace) in [
        ("proc", 0o555, true),
        ("dev", 0o755, true),
        (".sandtree", 0o711, true),
        ("workspace", 0o755, false),
        ("tmp", 0o1777, false),
        ("root", 0o700, false),
        ("etc", 0o755, false),
    ] {
        r.ensure_dir(d, mode, replace)?;
    }
    Ok(())
}

fn populate_busybox(root: &Path) -> Result<()> {
    let bb = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists());
    let bb = bb.context(
        "busybox not found: install the Debian package busybox-static (scripts/setup.sh does)",
    )?;
    let ldd = Command::new("file")
        .arg(bb)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if ldd.contains("dynamically linked") {
        bail!(
            "{} is dynamically linked: install busybox-static",
            bb.display()
        );
    }
    for d in ["bin", "etc", "proc", "dev", "tmp", "workspace", "root"] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::copy(bb, root.join("bin/busybox"))?;
    fs::set_permissions(root.join("bin/busybox"), fs::Permissions::from_mode(0o755))?;
    let list = Command::new(bb)
        .arg("--list")
        .output()
        .context("busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))?;
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(root.join("etc/group"), "root:x:0:\n")?;
    fs::write(
        root.join("etc/hosts"),
        "127.0.0.1 localhost sandbox\n::1 localhost\n",
    )?;
    fs::write(root.join("etc/hostname"), "sandbox\n")?;
    Ok(())
}

/// The first Debian mirror in the machine's apt configuration (deb822 or one-line format).
pub fn debian_mirror() -> Result<String> {
    let mut candidates = Vec::new();
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        for e in rd.flatten() {
            let text = fs::read_to_string(e.path()).unwrap_or_default();
            for l in text.lines() {
                if let Some(u) = l.strip_prefix("URIs:") {
                    candidates.extend(u.split_whitespace().map(String::from));
                } else if let Some(rest) = l.strip_prefix("deb ") {
                    candidates.extend(
                        rest.split_whitespace()
                            .filter(|w| w.contains("://"))
                            .map(String::from),
                    );
                }
            }
        }
    }
    for l in fs::read_to_string("/etc/apt/sources.list")
        .unwrap_or_default()
        .lines()
    {
        if let Some(rest) = l.strip_prefix("deb ") {
            candidates.extend(
                rest.split_whitespace()
                    .filter(|w| w.contains("://"))
                    .map(String::from),
            );
        }
    }
    candidates
        .into_iter()
        .map(|u| u.trim_end_matches('/').to_string())
        .find(|u| u.ends_with("/debian") && !u.contains("security"))
        .context("no Debian mirror found in /etc/apt/sources.list(.d)")
}

fn populate_debian(root: &Path, progress: Progress) -> Result<()> {
    // scripts/rootfs-cache.sh keeps the same debootstrap under the host cache: copy it.
    let cache = std::env::var_os("SANDTREE_CACHE")
        .map_or_else(|| PathBuf::from("/var/cache/sandtree"), PathBuf::from)
        .join("rootfs/debian");
    if cache.join(".complete").exists() {
        progress(format!(
            "copying the cached debootstrap at {}",
            cache.display()
        ));
        let out = Command::new("cp")
            .arg("-a")
            .arg(cache.join("."))
            .arg(root)
            .output()
            .context("run cp")?;
        if !out.status.success() {
            bail!(
                "copying {} failed: {}",
                cache.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let _ = fs::remove_file(root.join(".complete"));
        return Ok(());
    }
    let mirror = debian_mirror()?;
    progress(format!(
        "debootstrap bookworm from {mirror} (about a minute)"
    ));
    let mut child = Command::new("debootstrap")
        .args(["--variant=minbase", "--include=python3,git", "bookworm"])
        .arg(root)
        .arg(&mirror)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run debootstrap: install the Debian package debootstrap (scripts/setup.sh does)")?;
    let stderr = child.stderr.take().expect("piped");
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            s.push_str(&l);
            s.push('\n');
        }
        s
    });
    for line in BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        if line.starts_with("I: Retrieving")
            || line.starts_with("I: Installing")
            || line.starts_with("I: Base system")
        {
            progress(line);
        }
    }
    let status = child.wait()?;
    let err = err_thread.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "debootstrap failed ({status}): {}",
            err.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
        );
    }
    let _ = fs::remove_dir_all(root.join("var/cache/apt/archives"));
    fs::create_dir_all(root.join("var/cache/apt/archives/partial"))?;
    Ok(())
}

fn tempdir_near(root: &Path) -> Result<PathBuf> {
    let base = root.parent().unwrap_or(Path::new("/tmp"));
    for i in 0..1000 {
        let p = base.join(format!(".import-{}-{i}", std::process::id()));
        if fs::create_dir(&p).is_ok() {
            return Ok(p);
        }
    }
    bail!(
        "cannot create a staging directory next to {}",
        root.display()
    )
}

fn read_json(dir: &Root, rel: &str) -> Result<serde_json::Value> {
    let mut text = Vec::new();
    dir.open_file(Path::new(rel))?
        .read_to_end(&mut text)
        .with_context(|| format!("read {rel}"))?;
    serde_json::from_slice(&text).with_context(|| format!("{rel} is not valid JSON"))
}

fn blob(digest: &str) -> Result<String> {
    let (alg, hex) = digest
        .split_once(':')
        .with_context(|| format!("bad digest {digest:?}"))?;
    if hex.is_empty()
        || !hex.bytes().all(|b| b.is_ascii_hexdigit())
        || !alg.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        bail!("bad digest {digest:?}");
    }
    Ok(format!("blobs/{alg}/{hex}"))
}

/// Layer tarballs of the first manifest of an OCI image layout, bottom first.
/// Layer blobs of an OCI layout, bottom first, and its image config (if it has one).
fn oci_layers(dir: &Root) -> Result<(Vec<PathBuf>, Option<serde_json::Value>)> {
    let index = read_json(dir, "index.json")?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json has no manifest")?;
    let mut manifest = read_json(dir, &blob(digest)?)?;
    if manifest.get("manifests").is_some() {
        // An image index: take its first manifest.
        let d = manifest["manifests"][0]["digest"]
            .as_str()
            .context("nested index has no manifest")?
            .to_string();
        manifest = read_json(dir, &blob(&d)?)?;
    }
    let layers = manifest["layers"]
        .as_array()
        .context("manifest has no layers")?
        .iter()
        .map(|l| blob(l["digest"].as_str().context("layer without digest")?).map(PathBuf::from))
        .collect::<Result<_>>()?;
    let config = match manifest["config"]["digest"].as_str() {
        Some(d) => Some(read_json(dir, &blob(d)?)?),
        None => None,
    };
    Ok((layers, config))
}

/// Layer tarballs of a `docker save` archive (unpacked in `dir`), bottom first, and its image
/// config. Each is opened inside `dir` (`Root::open_file`), so a path cannot name a file outside.
fn docker_save_layers(dir: &Root) -> Result<(Vec<PathBuf>, Option<serde_json::Value>)> {
    let manifest = read_json(dir, "manifest.json")?;
    let layers = manifest[0]["Layers"]
        .as_array()
        .context("manifest.json has no Layers")?
        .iter()
        .map(|l| {
            let rel = l.as_str().context("layer path is not a string")?;
            unpack::normalize(Path::new(rel))
                .with_context(|| format!("layer path {rel:?} escapes the archive"))
        })
        .collect::<Result<_>>()?;
    let config = match manifest[0]["Config"].as_str() {
        Some(rel) => {
            let rel = unpack::normalize(Path::new(rel))
                .with_context(|| format!("config path {rel:?} escapes the archive"))?;
            // An archive without its config file imports with the default config.
            match dir.open_file(&rel) {
                Ok(_) => Some(read_json(dir, &rel.to_string_lossy())?),
                Err(_) => None,
            }
        }
        None => None,
    };
    Ok((layers, config))
}

/// Applies layer tarballs (paths inside `src`) in order, bottom first.
fn apply_layers(
    root: &Root,
    src: &Root,
    layers: &[PathBuf],
    setid: SetId,
    progress: Progress,
) -> Result<()> {
    for (i, layer) in layers.iter().enumerate() {
        progress(format!(
            "layer {}/{}: {}",
            i + 1,
            layers.len(),
            layer.file_name().unwrap_or_default().to_string_lossy()
        ));
        let open = || unpack::open_archive(src.open_file(layer)?, layer);
        unpack::apply_layer(root, &format!("image layer {}", i + 1), &open, setid)?;
    }
    Ok(())
}
