//! Node bundles: a committed node as one versioned file that another host imports as a new
//! episode starting at that node (docs/design.md, "Node bundles, format 1").
//!
//! Export reads the node's snapshot through a scratch clone of it and the image through a
//! scratch volume of it (the storage trait's own operations, so every backend works), writes
//! the delta and the CRIU image through [`NodeFiles`] into parts under `<data-dir>/bundles/`,
//! and hands back a [`BundleFile`] that reads as the bundle. Import verifies the whole file
//! (magic, version, checksum, header, section lengths) and that this host has the same image
//! before it changes anything; then it makes the episode (one tree transaction), applies the
//! delta to a fresh volume of the image, snapshots it, writes the CRIU image under
//! `<data-dir>/images/n<node>/`, commits the node and restores the episode's sandbox from it as
//! a fork would. A failure after the tree changed fails the node and deletes the episode, and
//! the garbage collector frees what was made.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context};
use sandtree_branching::{
    EpisodeId, EpisodeMeta, NewTurn, Node, NodeArtifacts, NodeKind, Observation, Policy, Session,
    SnapshotRef, Verdict, VerdictKind, VolumeName,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::{
    actor, blocking, collect_garbage, materialize, precheck, preflight, Engine, EngineError,
    Result, Shared, DEFAULT_ENV,
};

/// The bundle format this service writes and reads.
pub const FORMAT: u32 = 1;
/// The first bytes of every bundle.
pub const MAGIC: &[u8; 8] = b"STBUNDLE";
/// Magic, format and header length.
const PREFIX: u64 = 16;
/// The SHA-256 at the end.
const CHECKSUM: u64 = 32;
/// Longest header.
const MAX_HEADER: u32 = 1 << 20;
/// Largest bundle an import takes.
pub const MAX_BUNDLE_BYTES: u64 = 64 << 30;

/// The bundle's header (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The image the node's files are a delta against, and its content digest.
    pub image: String,
    pub image_digest: String,
    /// `fs` or `full`.
    pub kind: String,
    /// The source episode's policy, labels, limits and user: the imported episode's.
    pub policy: Policy,
    pub meta: EpisodeMeta,
    /// The turn's shell session (cwd, env).
    pub session: Session,
    pub source: Source,
    pub sections: Sections,
}

/// Where the node came from, for the imported turn's action and for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub episode: String,
    pub turn: u32,
    pub node: u64,
    /// The node's checkpoint bytes there.
    pub node_bytes: u64,
    pub image_bytes: u64,
}

/// Byte lengths of the sections after the header, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Sections {
    pub whiteouts: u64,
    pub delta: u64,
    pub images: u64,
}

/// A bundle on disk, as parts: the prefix, header and whiteouts in memory, the delta and the
/// image tars in files under `<data-dir>/bundles/` (removed on drop), and the checksum.
pub struct BundleFile {
    head: Vec<u8>,
    files: Vec<PathBuf>,
    checksum: [u8; 32],
    pub header: Header,
    /// The bundle's size.
    pub bytes: u64,
}

impl BundleFile {
    /// Reads the bundle from its start.
    pub fn reader(&self) -> io::Result<Box<dyn Read + Send>> {
        let mut r: Box<dyn Read + Send> = Box::new(io::Cursor::new(self.head.clone()));
        for f in &self.files {
            r = Box::new(r.chain(BufReader::with_capacity(1 << 20, File::open(f)?)));
        }
        Ok(Box::new(r.chain(io::Cursor::new(self.checksum))))
    }
}

impl Drop for BundleFile {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// What an import made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    pub episode: EpisodeId,
    /// The turn that stands on the imported node (1).
    pub turn: u32,
    pub kind: String,
    /// Time to verify the bundle, build the node, and restore its sandbox, in ms.
    pub verify_ms: u64,
    pub build_ms: u64,
    pub restore_ms: u64,
}

/// Where bundles are staged: `<data-dir>/bundles/` (emptied at start).
pub fn staging_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("bundles")
}

/// A name no other bundle of this service uses now.
pub fn scratch_name(what: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "xfer{}x{}-{what}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Removes what bundles left in the staging dir (start-up: nothing is in flight).
pub(crate) fn clear_staging(data_dir: &Path) -> usize {
    let dir = staging_dir(data_dir);
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            if std::fs::remove_file(e.path()).is_ok() {
                n += 1;
            }
        }
    }
    n
}

fn bad(msg: String) -> EngineError {
    EngineError::BadRequest(msg)
}

/// Scratch volumes, destroyed on drop.
struct Scratch<'a> {
    storage: &'a dyn sandtree_storage::SnapshotBackend,
    volumes: Vec<String>,
}

impl Drop for Scratch<'_> {
    fn drop(&mut self) {
        for v in &self.volumes {
            if let Err(e) = self.storage.destroy_volume(v) {
                warn!(volume = %v, error = %e, "cannot destroy a bundle's scratch volume");
            }
        }
    }
}

/// A writer that hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.hash.update(&b[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn syncfs(path: &Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    // SAFETY: syncfs(2) on an fd owned for the duration of the call.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("sync the file system of {}", path.display()));
    }
    Ok(())
}

impl Engine {
    /// The content digest of `image` (`sha256:<hex>`, see `NodeFiles::digest`): kept in the
    /// image's config once computed (a rebuilt image's new config has none), else computed from
    /// a scratch volume of the image.
    pub async fn image_digest(&self, image: &str) -> Result<String> {
        if let Some(d) = self.image_config(image)?.digest {
            return Ok(d);
        }
        let (e, img) = (self.clone_handle(), image.to_string());
        blocking(move || e.image_digest_blocking(&img)).await
    }

    /// [`Engine::image_digest`], blocking: image builds and imports compute it as they end.
    pub fn image_digest_blocking(&self, image: &str) -> anyhow::Result<String> {
        let mut cfg = self.image_config(image)?;
        if let Some(d) = cfg.digest {
            return Ok(d);
        }
        let s = &self.shared;
        let t = Instant::now();
        let vol = scratch_name("digest");
        let root = s.storage.create_volume(&vol, image)?;
        let scratch = Scratch {
            storage: s.storage.as_ref(),
            volumes: vec![vol],
        };
        let d = s.parts.files.digest(&root)?;
        drop(scratch);
        info!(image, digest = %d, ms = t.elapsed().as_millis() as u64, "image digest computed");
        cfg.digest = Some(d.clone());
        self.save_image_config(image, &cfg)?;
        Ok(d)
    }

    /// Writes the node at `turn` of `id` as a bundle (after the episode's pending checkpoint).
    /// Refused: turn 0 (the image itself), and a node that is not committed.
    pub async fn export_node(&self, id: &EpisodeId, turn: u32) -> Result<BundleFile> {
        let s = self.shared.clone();
        precheck(&s.tree, id, turn)?;
        actor::handle_for(&s, id)?.settle().await;
        let node = preflight(&s.tree, id, turn)?;
        let kind = match node.kind {
            NodeKind::Fs => "fs",
            NodeKind::Full => "full",
            NodeKind::Base { ref image } => {
                return Err(bad(format!(
                    "turn {turn} of episode {id} is image {image} itself: create an episode on \
                     that image instead of exporting it"
                )))
            }
        };
        let ep = s.tree.episode(id)?;
        let rec = s.tree.turn(id, turn)?;
        let image_digest = self.image_digest(&ep.image).await?;
        let header = Header {
            image: ep.image.clone(),
            image_digest,
            kind: kind.into(),
            policy: ep.policy,
            meta: ep.meta.clone(),
            session: rec.session.clone(),
            source: Source {
                episode: id.to_string(),
                turn,
                node: node.id.0,
                node_bytes: node.bytes,
                image_bytes: node.image_bytes,
            },
            sections: Sections::default(),
        };
        let t = Instant::now();
        let b = blocking(move || write_bundle(&s, &node, header)).await?;
        info!(episode = %id, turn, node = %b.header.source.node, bytes = b.bytes,
              ms = t.elapsed().as_millis() as u64, "node exported");
        Ok(b)
    }

    /// Imports the bundle at `path` (which it removes) as a new live episode whose turn 1
    /// stands on the bundle's node; turn 0 is the image. Nothing changes unless the bundle is
    /// whole (format, checksum, header, section lengths) and this host has the same image.
    pub async fn import_node(&self, path: PathBuf) -> Result<Imported> {
        struct Remove(PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let _remove = Remove(path.clone());
        let t = Instant::now();
        let p2 = path.clone();
        let header = tokio::task::spawn_blocking(move || verify(&p2))
            .await
            .map_err(|e| anyhow!("task panicked: {e}"))??;
        let s = self.shared.clone();
        let (storage, img) = (s.storage.clone(), header.image.clone());
        if !blocking(move || Ok(storage.has_base(&img)?)).await? {
            return Err(EngineError::Precondition(format!(
                "image {} ({}) is not on this host: build or import it, then import the bundle",
                header.image, header.image_digest
            )));
        }
        let here = self.image_digest(&header.image).await?;
        if here != header.image_digest {
            return Err(EngineError::Precondition(format!(
                "image {} differs: the bundle was made against {}, this host's is {}",
                header.image, header.image_digest, here
            )));
        }
        if let Some(l) = header.meta.limits {
            let max = s.parts.runtime.max_limits();
            if l.memory_bytes > max.memory_bytes
                || l.pids > max.pids
                || l.cpu_quota_us > max.cpu_quota_us
            {
                return Err(EngineError::Precondition(format!(
                    "the node's limits ({} MiB, {} pids, {} cpus) are over this host's maximum \
                     ({} MiB, {} pids, {} cpus)",
                    l.memory_bytes >> 20,
                    l.pids,
                    l.cpu_quota_us as f64 / crate::ports::CPU_PERIOD_US as f64,
                    max.memory_bytes >> 20,
                    max.pids,
                    max.cpu_quota_us as f64 / crate::ports::CPU_PERIOD_US as f64,
                )));
            }
        }
        let verify_ms = t.elapsed().as_millis() as u64;
        let mut admission = self.admit(1)?;
        // Turn 0 as a create on this host would make it; turn 1 is the node.
        let cfg = self.image_config(&header.image)?;
        let env = actor::merge_env(
            &DEFAULT_ENV
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
            &cfg.env,
        );
        let base_session = Session {
            cwd: cfg.working_dir.clone().unwrap_or_else(|| "/".into()),
            env,
        };
        let full = header.kind == "full";
        let src = &header.source;
        let turn = NewTurn {
            action: format!(
                "# sandtree import: node {} of {}@{} ({} on image {})",
                src.node, src.episode, src.turn, header.kind, header.image
            ),
            observation: Observation::default(),
            session: header.session.clone(),
            verdict: Verdict {
                kind: if full {
                    VerdictKind::Proc
                } else {
                    VerdictKind::Fs
                },
                reasons: vec![format!(
                    "imported from {}@{} (node {})",
                    src.episode, src.turn, src.node
                )],
            },
            new_node: Some(if full { NodeKind::Full } else { NodeKind::Fs }),
        };
        let (ep, node) = s.tree.import_episode(
            &header.image,
            header.policy,
            base_session,
            header.meta.clone(),
            turn,
        )?;
        let t = Instant::now();
        let (s2, ep2, node2, h2, p2) = (
            s.clone(),
            ep.id.clone(),
            node.clone(),
            header.clone(),
            path.clone(),
        );
        let built = tokio::task::spawn_blocking(move || build_node(&s2, &ep2, &node2, &h2, &p2))
            .await
            .map_err(|e| EngineError::Internal(anyhow!("task panicked: {e}")))
            .and_then(|r| r);
        let node = match built.and_then(|a| Ok(s.tree.commit_node(node.id, a)?)) {
            Ok(n) => n,
            Err(e) => {
                let _ = s.tree.fail_node(node.id, &format!("import failed: {e}"));
                let _ = s.tree.delete_episode(&ep.id);
                let s3 = s.clone();
                let _ = tokio::task::spawn_blocking(move || collect_garbage(&s3)).await;
                return Err(e);
            }
        };
        let build_ms = t.elapsed().as_millis() as u64;
        let t = Instant::now();
        // The sandbox is made as a fork's is: a clone of the node's snapshot, restored.
        let volume = VolumeName::first(&ep.id).next();
        if let Err(e) = materialize(&s, &node, &volume, ep.meta.limits).await {
            let _ = s.tree.delete_episode(&ep.id);
            let s3 = s.clone();
            let _ = tokio::task::spawn_blocking(move || collect_garbage(&s3)).await;
            return Err(e);
        }
        admission.keep_one();
        actor::spawn(&s, &ep, Some(volume), header.session.clone(), 1);
        let restore_ms = t.elapsed().as_millis() as u64;
        info!(episode = %ep.id, node = %node.id, kind = %header.kind, verify_ms, build_ms, restore_ms, "node imported");
        Ok(Imported {
            episode: ep.id,
            turn: 1,
            kind: header.kind,
            verify_ms,
            build_ms,
            restore_ms,
        })
    }
}

/// Writes the bundle's parts (blocking).
fn write_bundle(s: &Arc<Shared>, node: &Node, mut header: Header) -> anyhow::Result<BundleFile> {
    let dir = staging_dir(&s.config.data_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let snap = node
        .snapshot
        .as_ref()
        .ok_or_else(|| anyhow!("checkpoint node {} has no snapshot", node.id))?;
    let (node_vol, base_vol) = (scratch_name("node"), scratch_name("base"));
    let mut scratch = Scratch {
        storage: s.storage.as_ref(),
        volumes: Vec::new(),
    };
    let root = s
        .storage
        .clone_snapshot(&snap.volume, &snap.snap, &node_vol)
        .with_context(|| format!("clone the snapshot of node {}", node.id))?;
    scratch.volumes.push(node_vol.clone());
    let base = s
        .storage
        .create_volume(&base_vol, &header.image)
        .with_context(|| format!("make a volume of image {}", header.image))?;
    scratch.volumes.push(base_vol.clone());
    let mut files = Vec::new();
    // Removed on error with the BundleFile's drop.
    let mut out = BundleFile {
        head: Vec::new(),
        files: Vec::new(),
        checksum: [0; 32],
        header: header.clone(),
        bytes: 0,
    };
    let delta_path = dir.join(format!("{node_vol}.delta"));
    out.files.push(delta_path.clone());
    let mut whiteouts = Vec::new();
    {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&delta_path)?);
        s.parts
            .files
            .write_delta(&base, &root, &mut w, &mut whiteouts)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    drop(scratch);
    header.sections.whiteouts = whiteouts.len() as u64;
    header.sections.delta = std::fs::metadata(&delta_path)?.len();
    files.push(delta_path);
    if header.kind == "full" {
        let images = node
            .images
            .as_ref()
            .ok_or_else(|| anyhow!("checkpoint node {} has no CRIU images", node.id))?;
        let images_path = dir.join(format!("{node_vol}.images"));
        out.files.push(images_path.clone());
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&images_path)?);
        s.parts.files.write_images(Path::new(images), &mut w)?;
        w.into_inner().map_err(|e| e.into_error())?;
        header.sections.images = std::fs::metadata(&images_path)?.len();
        files.push(images_path);
    }
    let json = serde_json::to_vec(&header)?;
    let mut head = Vec::with_capacity(PREFIX as usize + json.len() + whiteouts.len());
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&FORMAT.to_le_bytes());
    head.extend_from_slice(&(json.len() as u32).to_le_bytes());
    head.extend_from_slice(&json);
    head.extend_from_slice(&whiteouts);
    let mut h = Hashing {
        inner: io::sink(),
        hash: Sha256::new(),
        bytes: 0,
    };
    h.write_all(&head)?;
    for f in &files {
        io::copy(
            &mut BufReader::with_capacity(1 << 20, File::open(f)?),
            &mut h,
        )?;
    }
    out.checksum = h.hash.finalize().into();
    out.bytes = h.bytes + CHECKSUM;
    out.head = head;
    out.header = header;
    Ok(out)
}

/// Checks the bundle at `path` whole before anything is made of it: magic, format, checksum,
/// header and section lengths. Every refusal is a `BadRequest` that says what is wrong.
pub fn verify(path: &Path) -> Result<Header> {
    let mut f = File::open(path).map_err(|e| anyhow!("open {}: {e}", path.display()))?;
    let len = f.metadata().map_err(|e| anyhow!("stat bundle: {e}"))?.len();
    if len < PREFIX + CHECKSUM {
        return Err(bad(format!(
            "the bundle is {len} bytes, too short to be a node bundle (truncated?)"
        )));
    }
    let mut prefix = [0u8; PREFIX as usize];
    f.read_exact(&mut prefix)
        .map_err(|e| anyhow!("read bundle: {e}"))?;
    if &prefix[..8] != MAGIC {
        return Err(bad(
            "not a sandtree node bundle (it does not start with STBUNDLE)".into(),
        ));
    }
    let format = u32::from_le_bytes(prefix[8..12].try_into().expect("4 bytes"));
    if format != FORMAT {
        return Err(bad(format!(
            "node bundle format {format} is not supported: this service reads format {FORMAT}"
        )));
    }
    let hlen = u32::from_le_bytes(prefix[12..16].try_into().expect("4 bytes"));
    if hlen > MAX_HEADER || PREFIX + hlen as u64 + CHECKSUM > len {
        return Err(bad(format!(
            "the bundle's header length {hlen} does not fit in its {len} bytes: the bundle is \
             corrupt or truncated"
        )));
    }
    // The checksum covers everything before it.
    f.seek(SeekFrom::Start(0))
        .map_err(|e| anyhow!("read bundle: {e}"))?;
    let mut h = Hashing {
        inner: io::sink(),
        hash: Sha256::new(),
        bytes: 0,
    };
    io::copy(
        &mut BufReader::with_capacity(1 << 20, (&mut f).take(len - CHECKSUM)),
        &mut h,
    )
    .map_err(|e| anyhow!("read bundle: {e}"))?;
    let mut want = [0u8; 32];
    f.read_exact(&mut want)
        .map_err(|e| anyhow!("read bundle: {e}"))?;
    let got: [u8; 32] = h.hash.finalize().into();
    if got != want {
        return Err(bad(format!(
            "the bundle's checksum does not match its {len} bytes: it is corrupt or truncated"
        )));
    }
    f.seek(SeekFrom::Start(PREFIX))
        .map_err(|e| anyhow!("read bundle: {e}"))?;
    let mut json = vec![0u8; hlen as usize];
    f.read_exact(&mut json)
        .map_err(|e| anyhow!("read bundle: {e}"))?;
    let header: Header = serde_json::from_slice(&json)
        .map_err(|e| bad(format!("the bundle's header is not valid: {e}")))?;
    let sec = header.sections;
    let want_len = [sec.whiteouts, sec.delta, sec.images]
        .into_iter()
        .try_fold(PREFIX + hlen as u64 + CHECKSUM, |a, b| a.checked_add(b));
    if want_len != Some(len) {
        return Err(bad(format!(
            "the bundle's sections ({} + {} + {} bytes) do not add up to its {len} bytes",
            sec.whiteouts, sec.delta, sec.images
        )));
    }
    match (header.kind.as_str(), sec.images) {
        ("fs", 0) => {}
        ("full", n) if n > 0 => {}
        ("fs" | "full", _) => {
            return Err(bad(format!(
                "a bundle of a {} node with {} bytes of CRIU image",
                header.kind, sec.images
            )))
        }
        (k, _) => return Err(bad(format!("the bundle's node kind {k:?} is unknown"))),
    }
    if sec.whiteouts > 1 << 30 {
        return Err(bad(format!(
            "the bundle's whiteout list of {} bytes is over 1 GiB",
            sec.whiteouts
        )));
    }
    sandtree_storage::validate_name(&header.image).map_err(|_| {
        bad(format!(
            "the bundle's image name {:?} is invalid",
            header.image
        ))
    })?;
    Ok(header)
}

/// Makes the imported node's artifacts from a verified bundle (blocking): a volume of the image
/// with the delta applied, its snapshot `n<node>` (the volume itself is then destroyed, as a
/// rewind destroys the volume it replaced), and for a full node the CRIU image under
/// `<data-dir>/images/n<node>/`, durable. On error nothing of it is left.
fn build_node(
    s: &Arc<Shared>,
    ep: &EpisodeId,
    node: &Node,
    header: &Header,
    path: &Path,
) -> Result<NodeArtifacts> {
    let vol = VolumeName::first(ep).to_string();
    let snap = format!("n{}", node.id.0);
    let images = s.config.data_dir.join("images").join(&snap);
    let (mut made_vol, mut made_snap, mut made_images) = (false, false, false);
    // What the bundle itself holds that this host refuses (a set-ID file, a device node, a
    // path that climbs out) is the bundle's fault: invalid_argument, not internal.
    let mut refused = false;
    let r = (|| -> anyhow::Result<NodeArtifacts> {
        let sec = header.sections;
        let mut f = File::open(path)?;
        let start =
            std::fs::metadata(path)?.len() - CHECKSUM - sec.whiteouts - sec.delta - sec.images;
        f.seek(SeekFrom::Start(start))?;
        let mut whiteouts = vec![0u8; sec.whiteouts as usize];
        f.read_exact(&mut whiteouts)?;
        let root = s.storage.create_volume(&vol, &header.image)?;
        made_vol = true;
        {
            let mut delta = BufReader::with_capacity(1 << 20, (&mut f).take(sec.delta));
            refused = true;
            s.parts
                .files
                .apply_delta(&root, &whiteouts, &mut delta)
                .context("the bundle's delta was refused")?;
            refused = false;
        }
        syncfs(&root)?;
        let info = s.storage.snapshot(&vol, &snap)?;
        made_snap = true;
        let mut image_bytes = 0;
        let images_ref = if sec.images > 0 {
            f.seek(SeekFrom::Start(start + sec.whiteouts + sec.delta))?;
            let mut tar = BufReader::with_capacity(1 << 20, (&mut f).take(sec.images));
            made_images = true;
            refused = true;
            s.parts
                .files
                .read_images(&images, &mut tar)
                .context("the bundle's CRIU image was refused")?;
            refused = false;
            s.parts.checkpointer.make_durable(&images)?;
            image_bytes = s.parts.checkpointer.image_bytes(&images);
            Some(images.to_string_lossy().into_owned())
        } else {
            None
        };
        s.storage.destroy_volume(&vol)?;
        made_vol = false;
        Ok(NodeArtifacts {
            snapshot: Some(SnapshotRef {
                volume: vol.clone(),
                snap: snap.clone(),
            }),
            images: images_ref,
            bytes: info.bytes + image_bytes,
            image_bytes,
            image_dumped_bytes: image_bytes,
            image_parent: None,
            timings: None,
        })
    })();
    if r.is_err() {
        if made_images {
            s.parts.checkpointer.remove(&images);
        }
        if made_snap {
            let _ = s.storage.destroy_snapshot(&vol, &snap);
        }
        if made_vol {
            let _ = s.storage.destroy_volume(&vol);
        }
    }
    match r {
        Ok(a) => Ok(a),
        Err(e) if refused => Err(bad(format!("{e:#}"))),
        Err(e) => Err(EngineError::Internal(e)),
    }
}
