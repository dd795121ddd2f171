//! Images: root filesystems that become read-only bases on the storage backend.
//!
//! - `busybox`: the host's busybox-static with every applet linked into /bin;
//! - `debian`: `debootstrap --variant=minbase --include=python3,git bookworm`, from the Debian
//!   mirror in the machine's apt configuration;
//! - import of a rootfs directory, a tar / tar.gz, an OCI image layout or a `docker save`
//!   archive, applying layers in order with their whiteouts.
//!
//! Every image gets the directories the runtime mounts over (/proc, /dev, /.sandtree) plus
//! /workspace and /tmp. A failed build leaves nothing behind: the backend's `create_base` destroys
//! what `populate` started when it returns an error.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use sandtree_storage::{SnapshotBackend, SnapshotError};

/// Reports progress lines of long work.
pub type Progress<'a> = &'a (dyn Fn(String) + Sync + Send);

/// Builds one of the built-in images.
pub fn build(storage: &dyn SnapshotBackend, name: &str, progress: Progress) -> Result<()> {
    match name {
        "busybox" => create(storage, name, progress, &mut |root| populate_busybox(root)),
        "debian" => create(storage, name, progress, &mut |root| populate_debian(root, progress)),
        other => bail!("unknown image kind {other:?}: expected busybox or debian (use `image import` for others)"),
    }
}

/// Imports a directory, tar(.gz), OCI layout or docker-save archive as image `name`.
pub fn import(
    storage: &dyn SnapshotBackend,
    name: &str,
    path: &Path,
    progress: Progress,
) -> Result<()> {
    let meta = fs::metadata(path)
        .with_context(|| format!("import source {} does not exist", path.display()))?;
    let path = path.canonicalize()?;
    create(storage, name, progress, &mut |root| {
        if meta.is_dir() && path.join("oci-layout").exists() {
            apply_layers(root, &oci_layers(&path)?, progress)
        } else if meta.is_dir() {
            progress(format!("copying {}", path.display()));
            run(Command::new("cp")
                .arg("-a")
                .arg("--reflink=auto")
                .arg(format!("{}/.", path.display()))
                .arg(root))
        } else {
            let staging = tempdir_near(root)?;
            let r = (|| {
                run(Command::new("tar")
                    .arg("-xf")
                    .arg(&path)
                    .arg("-C")
                    .arg(&staging))
                .with_context(|| format!("{} is not a readable tar archive", path.display()))?;
                if staging.join("manifest.json").exists() && !staging.join("etc").exists() {
                    apply_layers(root, &docker_save_layers(&staging)?, progress)
                } else if staging.join("oci-layout").exists() {
                    apply_layers(root, &oci_layers(&staging)?, progress)
                } else {
                    progress("plain rootfs tarball".into());
                    apply_layers(root, std::slice::from_ref(&path), progress)
                }
            })();
            let _ = fs::remove_dir_all(&staging);
            r
        }
    })
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

/// The directories every sandbox rootfs needs.
fn finish_rootfs(root: &Path) -> Result<()> {
    if !root.join("bin/sh").exists() && fs::symlink_metadata(root.join("bin/sh")).is_err() {
        bail!("the image has no /bin/sh, which every turn runs with");
    }
    for (d, mode) in [
        ("proc", 0o555),
        ("dev", 0o755),
        (".sandtree", 0o711),
        ("workspace", 0o755),
        ("tmp", 0o1777),
        ("root", 0o700),
        ("etc", 0o755),
    ] {
        let p = root.join(d);
        if fs::symlink_metadata(&p).is_err() {
            fs::create_dir_all(&p)?;
            fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        }
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

fn read_json(p: &Path) -> Result<serde_json::Value> {
    serde_json::from_slice(&fs::read(p).with_context(|| format!("read {}", p.display()))?)
        .with_context(|| format!("{} is not valid JSON", p.display()))
}

fn blob(dir: &Path, digest: &str) -> Result<PathBuf> {
    let (alg, hex) = digest
        .split_once(':')
        .with_context(|| format!("bad digest {digest:?}"))?;
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) || alg.contains('/') {
        bail!("bad digest {digest:?}");
    }
    Ok(dir.join("blobs").join(alg).join(hex))
}

/// Layer tarballs of the first manifest of an OCI image layout, bottom first.
fn oci_layers(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = read_json(&dir.join("index.json"))?;
    let digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json has no manifest")?;
    let mut manifest = read_json(&blob(dir, digest)?)?;
    if manifest.get("manifests").is_some() {
        // An image index: take its first manifest.
        let d = manifest["manifests"][0]["digest"]
            .as_str()
            .context("nested index has no manifest")?
            .to_string();
        manifest = read_json(&blob(dir, &d)?)?;
    }
    manifest["layers"]
        .as_array()
        .context("manifest has no layers")?
        .iter()
        .map(|l| blob(dir, l["digest"].as_str().context("layer without digest")?))
        .collect()
}

/// Layer tarballs of a `docker save` archive (extracted in `dir`), bottom first.
fn docker_save_layers(dir: &Path) -> Result<Vec<PathBuf>> {
    let manifest = read_json(&dir.join("manifest.json"))?;
    manifest[0]["Layers"]
        .as_array()
        .context("manifest.json has no Layers")?
        .iter()
        .map(|l| {
            let rel = l.as_str().context("layer path is not a string")?;
            if rel.contains("..") {
                bail!("layer path {rel:?} escapes the archive");
            }
            Ok(dir.join(rel))
        })
        .collect()
}

/// Applies layer tarballs in order: whiteouts of a layer remove paths of the layers below it
/// (`.wh.NAME` removes NAME; `.wh..wh..opq` empties its directory), then its files are extracted.
fn apply_layers(root: &Path, layers: &[PathBuf], progress: Progress) -> Result<()> {
    for (i, layer) in layers.iter().enumerate() {
        progress(format!(
            "layer {}/{}: {}",
            i + 1,
            layers.len(),
            layer.file_name().unwrap_or_default().to_string_lossy()
        ));
        let out = Command::new("tar")
            .arg("-tf")
            .arg(layer)
            .output()
            .context("tar -t")?;
        if !out.status.success() {
            bail!(
                "layer {} is not a readable tar archive: {}",
                layer.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for entry in String::from_utf8_lossy(&out.stdout).lines() {
            let entry = entry.trim_start_matches("./");
            let p = Path::new(entry);
            let Some(fname) = p.file_name().map(|f| f.to_string_lossy().into_owned()) else {
                continue;
            };
            if entry.split('/').any(|c| c == "..") {
                bail!(
                    "layer {} has an entry that escapes the root: {entry}",
                    layer.display()
                );
            }
            let parent = root.join(p.parent().unwrap_or(Path::new("")));
            if fname == ".wh..wh..opq" {
                if let Ok(rd) = fs::read_dir(&parent) {
                    for e in rd.flatten() {
                        remove_any(&e.path())?;
                    }
                }
            } else if let Some(target) = fname.strip_prefix(".wh.") {
                remove_any(&parent.join(target))?;
            }
        }
        run(Command::new("tar")
            .args([
                "-x",
                "--numeric-owner",
                "--same-permissions",
                "--exclude=.wh.*",
                "--exclude=./.wh.*",
                "-f",
            ])
            .arg(layer)
            .arg("-C")
            .arg(root))
        .with_context(|| format!("extracting layer {}", layer.display()))?;
    }
    Ok(())
}

fn remove_any(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p)?,
        Ok(_) => fs::remove_file(p)?,
        Err(_) => {}
    }
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
