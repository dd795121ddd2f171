//! A recording, in-memory [`SnapshotBackend`] for unit tests of other crates. Needs no root.
//!
//! It keeps the same rules as the real backends (name validation, `Exists`, `NotFound`,
//! snapshots outliving their volume) and records every call as one line, e.g.
//! `"snapshot vol1 n3"`. Volumes and bases get real, empty directories under a root directory
//! (a fresh one under the system temp dir by default, removed on drop) so that callers can write
//! into them, but the fake never copies data: a clone starts empty. Writes are simulated with
//! [`FakeBackend::write`].
//!
//! Fault injection: [`FakeBackend::fail_after`] makes every operation after the next `n` fail,
//! and [`FakeBackend::fail_next`] makes the next call of one operation fail. An injected failure
//! is a [`SnapshotError::Command`] with status `"injected fault"` and changes no state.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::{validate_name, Entry, Kind, Result, SnapshotBackend, SnapshotError, SnapshotInfo};

/// Status of an injected failure.
pub const INJECTED: &str = "injected fault";

/// The fake backend. See the module docs.
#[derive(Debug)]
pub struct FakeBackend {
    root: PathBuf,
    owns_root: bool,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<String>,
    bases: BTreeSet<String>,
    volumes: BTreeMap<String, Volume>,
    snapshots: BTreeMap<(String, String), u64>,
    /// Operations started so far.
    ops: u64,
    /// Operations after this many fail.
    fail_after: Option<u64>,
    /// Operation names whose next call fails.
    fail_next: Vec<String>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Volume {
    changed: bool,
    pending_bytes: u64,
}

impl Default for FakeBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeBackend {
    /// A fake whose directories live in a fresh directory under the system temp dir, removed
    /// when the fake is dropped.
    pub fn new() -> FakeBackend {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let root = std::env::temp_dir().join(format!(
            "sandtree-fake-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        FakeBackend {
            root,
            owns_root: true,
            state: Mutex::default(),
        }
    }

    /// A fake whose directories live under `root` (kept when the fake is dropped).
    pub fn with_root(root: impl Into<PathBuf>) -> FakeBackend {
        FakeBackend {
            root: root.into(),
            owns_root: false,
            state: Mutex::default(),
        }
    }

    /// Every call so far, oldest first, including failed ones.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    /// Returns the calls so far and forgets them.
    pub fn take_calls(&self) -> Vec<String> {
        std::mem::take(&mut self.state().calls)
    }

    /// The next `n` operations succeed (unless they fail on their own); every later one fails
    /// until [`FakeBackend::heal`].
    pub fn fail_after(&self, n: u64) {
        let mut s = self.state();
        s.fail_after = Some(s.ops + n);
    }

    /// The next call of operation `op` (e.g. `"snapshot"`) fails.
    pub fn fail_next(&self, op: &str) {
        self.state().fail_next.push(op.to_string());
    }

    /// Clears every injected fault.
    pub fn heal(&self) {
        let mut s = self.state();
        s.fail_after = None;
        s.fail_next.clear();
    }

    /// Simulates a write of `bytes` into `vol`: it now counts as changed, and its next snapshot
    /// reports these bytes. Not recorded as a call.
    pub fn write(&self, vol: &str, bytes: u64) -> Result<()> {
        let mut s = self.state();
        let v = s
            .volumes
            .get_mut(vol)
            .ok_or_else(|| not_found("volume", vol))?;
        v.changed = true;
        v.pending_bytes += bytes;
        Ok(())
    }

    /// The directory under which volume and base directories are made.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `call` and decides whether it fails by injection.
    fn begin(&self, call: String) -> Result<std::sync::MutexGuard<'_, State>> {
        let mut s = self.state();
        let op = call.split(' ').next().unwrap_or_default().to_string();
        s.calls.push(call.clone());
        s.ops += 1;
        let after = s.fail_after.is_some_and(|n| s.ops > n);
        let next = match s.fail_next.iter().position(|o| *o == op) {
            Some(i) => {
                s.fail_next.remove(i);
                true
            }
            None => false,
        };
        if after || next {
            return Err(SnapshotError::Command {
                command: format!("fake {call}"),
                status: INJECTED.to_string(),
                stderr: "failure injected by FakeBackend".to_string(),
            });
        }
        Ok(s)
    }

    fn mkdir(&self, path: &Path) -> Result<()> {
        std::fs::create_dir_all(path).map_err(|source| SnapshotError::Io {
            context: format!("cannot create {}", path.display()),
            source,
        })
    }

    fn volume_dir(&self, vol: &str) -> PathBuf {
        self.root.join("volumes").join(vol)
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        if self.owns_root {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

impl SnapshotBackend for FakeBackend {
    fn kind(&self) -> Kind {
        Kind::Fake
    }

    fn describe(&self) -> String {
        format!("fake at {}", self.root.display())
    }

    fn create_base(
        &self,
        image: &str,
        populate: &mut dyn FnMut(&Path) -> Result<()>,
    ) -> Result<()> {
        let s = self.begin(format!("create_base {image}"))?;
        validate_name(image)?;
        if s.bases.contains(image) {
            return Err(exists("base image", image));
        }
        // Not holding the lock while `populate` runs: it may call back into the fake.
        drop(s);
        let dir = self.root.join("images").join(image);
        self.mkdir(&dir)?;
        if let Err(e) = populate(&dir) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        let mut s = self.state();
        if !s.bases.insert(image.to_string()) {
            return Err(exists("base image", image));
        }
        Ok(())
    }

    fn has_base(&self, image: &str) -> Result<bool> {
        let s = self.begin(format!("has_base {image}"))?;
        validate_name(image)?;
        Ok(s.bases.contains(image))
    }

    fn destroy_base(&self, image: &str) -> Result<()> {
        let mut s = self.begin(format!("destroy_base {image}"))?;
        validate_name(image)?;
        if !s.bases.remove(image) {
            return Err(not_found("base image", image));
        }
        let _ = std::fs::remove_dir_all(self.root.join("images").join(image));
        Ok(())
    }

    fn create_volume(&self, vol: &str, image: &str) -> Result<PathBuf> {
        let mut s = self.begin(format!("create_volume {vol} {image}"))?;
        validate_name(vol)?;
        validate_name(image)?;
        if s.volumes.contains_key(vol) {
            return Err(exists("volume", vol));
        }
        if !s.bases.contains(image) {
            return Err(not_found("base image", image));
        }
        let dir = self.volume_dir(vol);
        self.mkdir(&dir)?;
        s.volumes.insert(vol.to_string(), Volume::default());
        Ok(dir)
    }

    fn volume_path(&self, vol: &str) -> Result<PathBuf> {
        let s = self.begin(format!("volume_path {vol}"))?;
        validate_name(vol)?;
        if !s.volumes.contains_key(vol) {
            return Err(not_found("volume", vol));
        }
        Ok(self.volume_dir(vol))
    }

    fn snapshot(&self, vol: &str, snap: &str) -> Result<SnapshotInfo> {
        let mut s = self.begin(format!("snapshot {vol} {snap}"))?;
        validate_name(vol)?;
        validate_name(snap)?;
        let key = (vol.to_string(), snap.to_string());
        if s.snapshots.contains_key(&key) {
            return Err(exists("snapshot", &format!("{vol}@{snap}")));
        }
        let v = s
            .volumes
            .get_mut(vol)
            .ok_or_else(|| not_found("volume", vol))?;
        let bytes = std::mem::take(v).pending_bytes;
        s.snapshots.insert(key, bytes);
        Ok(SnapshotInfo { bytes })
    }

    fn snapshot_many(&self, items: &[(&str, &str)]) -> Vec<Result<SnapshotInfo>> {
        let names: Vec<String> = items.iter().map(|(v, s)| format!("{v}@{s}")).collect();
        if let Err(e) = self.begin(format!("snapshot_many {}", names.join(" "))) {
            // The batch failed as a whole, as one `zfs snapshot` does.
            return items
                .iter()
                .map(|_| {
                    Err(SnapshotError::Command {
                        command: format!("fake snapshot_many {}", names.join(" ")),
                        status: INJECTED.into(),
                        stderr: e.to_string(),
                    })
                })
                .collect();
        }
        items.iter().map(|(v, s)| self.snapshot(v, s)).collect()
    }

    fn clone_snapshot(&self, vol: &str, snap: &str, new_vol: &str) -> Result<PathBuf> {
        let mut s = self.begin(format!("clone_snapshot {vol} {snap} {new_vol}"))?;
        validate_name(vol)?;
        validate_name(snap)?;
        validate_name(new_vol)?;
        if !s
            .snapshots
            .contains_key(&(vol.to_string(), snap.to_string()))
        {
            return Err(not_found("snapshot", &format!("{vol}@{snap}")));
        }
        if s.volumes.contains_key(new_vol) {
            return Err(exists("volume", new_vol));
        }
        let dir = self.volume_dir(new_vol);
        self.mkdir(&dir)?;
        s.volumes.insert(new_vol.to_string(), Volume::default());
        Ok(dir)
    }

    fn rollback(&self, vol: &str, snap: &str) -> Result<()> {
        let mut s = self.begin(format!("rollback {vol} {snap}"))?;
        validate_name(vol)?;
        validate_name(snap)?;
        if !s.volumes.contains_key(vol) {
            return Err(not_found("volume", vol));
        }
        if !s
            .snapshots
            .contains_key(&(vol.to_string(), snap.to_string()))
        {
            return Err(not_found("snapshot", &format!("{vol}@{snap}")));
        }
        s.volumes.insert(vol.to_string(), Volume::default());
        Ok(())
    }

    fn changed_since_last_snapshot(&self, vol: &str) -> Result<bool> {
        let s = self.begin(format!("changed_since_last_snapshot {vol}"))?;
        validate_name(vol)?;
        s.volumes
            .get(vol)
            .map(|v| v.changed)
            .ok_or_else(|| not_found("volume", vol))
    }

    fn destroy_volume(&self, vol: &str) -> Result<()> {
        let mut s = self.begin(format!("destroy_volume {vol}"))?;
        validate_name(vol)?;
        if s.volumes.remove(vol).is_none() {
            return Err(not_found("volume", vol));
        }
        let _ = std::fs::remove_dir_all(self.volume_dir(vol));
        Ok(())
    }

    fn destroy_snapshot(&self, vol: &str, snap: &str) -> Result<()> {
        let mut s = self.begin(format!("destroy_snapshot {vol} {snap}"))?;
        validate_name(vol)?;
        validate_name(snap)?;
        if s.snapshots
            .remove(&(vol.to_string(), snap.to_string()))
            .is_none()
        {
            return Err(not_found("snapshot", &format!("{vol}@{snap}")));
        }
        Ok(())
    }

    fn set_quota(&self, vol: &str, bytes: u64) -> Result<()> {
        let s = self.begin(format!("set_quota {vol} {bytes}"))?;
        validate_name(vol)?;
        if !s.volumes.contains_key(vol) {
            return Err(not_found("volume", vol));
        }
        Ok(())
    }

    fn list(&self) -> Result<Vec<Entry>> {
        let s = self.begin("list".to_string())?;
        let mut out: Vec<Entry> = s
            .bases
            .iter()
            .map(|n| Entry::Base { name: n.clone() })
            .collect();
        out.extend(s.volumes.keys().map(|n| Entry::Volume { name: n.clone() }));
        out.extend(s.snapshots.keys().map(|(v, n)| Entry::Snapshot {
            volume: v.clone(),
            name: n.clone(),
        }));
        Ok(out)
    }

    fn gc(&self) -> Result<usize> {
        let _s = self.begin("gc".to_string())?;
        Ok(0)
    }
}

fn not_found(kind: &'static str, name: &str) -> SnapshotError {
    SnapshotError::NotFound {
        kind,
        name: name.to_string(),
    }
}

fn exists(kind: &'static str, name: &str) -> SnapshotError {
    SnapshotError::Exists {
        kind,
        name: name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(f: &FakeBackend) {
        f.create_base("img", &mut |dir: &Path| {
            std::fs::write(dir.join("hello"), b"hi").map_err(|source| SnapshotError::Io {
                context: "write".into(),
                source,
            })
        })
        .unwrap();
    }

    #[test]
    fn records_calls_in_order() {
        let f = FakeBackend::new();
        base(&f);
        f.create_volume("v1", "img").unwrap();
        f.snapshot("v1", "n3").unwrap();
        f.clone_snapshot("v1", "n3", "v2").unwrap();
        assert_eq!(
            f.take_calls(),
            [
                "create_base img",
                "create_volume v1 img",
                "snapshot v1 n3",
                "clone_snapshot v1 n3 v2"
            ]
        );
        assert!(f.calls().is_empty());
    }

    #[test]
    fn tracks_changes_and_bytes() {
        let f = FakeBackend::new();
        base(&f);
        let path = f.create_volume("v", "img").unwrap();
        assert!(path.is_dir(), "volume paths are real directories");
        assert!(!f.changed_since_last_snapshot("v").unwrap());
        f.write("v", 1 << 20).unwrap();
        assert!(f.changed_since_last_snapshot("v").unwrap());
        assert_eq!(f.snapshot("v", "s").unwrap().bytes, 1 << 20);
        assert!(!f.changed_since_last_snapshot("v").unwrap());
        assert_eq!(f.snapshot("v", "t").unwrap().bytes, 0);
    }

    #[test]
    fn fail_after_n_operations_changes_nothing() {
        let f = FakeBackend::new();
        base(&f);
        f.create_volume("v", "img").unwrap();
        f.fail_after(1);
        f.snapshot("v", "a").unwrap();
        let err = f.snapshot("v", "b").unwrap_err();
        assert!(
            matches!(&err, SnapshotError::Command { status, .. } if status == INJECTED),
            "{err:?}"
        );
        assert!(f.list().is_err());
        f.heal();
        let list = f.list().unwrap();
        assert!(list.contains(&Entry::Snapshot {
            volume: "v".into(),
            name: "a".into()
        }));
        assert!(!list.contains(&Entry::Snapshot {
            volume: "v".into(),
            name: "b".into()
        }));
    }

    #[test]
    fn fail_next_hits_one_operation_once() {
        let f = FakeBackend::new();
        base(&f);
        f.create_volume("v", "img").unwrap();
        f.fail_next("snapshot");
        f.volume_path("v").unwrap();
        assert!(f.snapshot("v", "a").is_err());
        f.snapshot("v", "a").unwrap();
    }

    #[test]
    fn follows_the_rules_of_real_backends() {
        let f = FakeBackend::new();
        assert!(matches!(
            f.create_volume("v", "nope"),
            Err(SnapshotError::NotFound {
                kind: "base image",
                ..
            })
        ));
        assert!(matches!(
            f.create_volume("../x", "img"),
            Err(SnapshotError::InvalidName(_))
        ));
        base(&f);
        assert!(matches!(
            f.create_base("img", &mut |_: &Path| Ok(())),
            Err(SnapshotError::Exists { .. })
        ));
        f.create_volume("v", "img").unwrap();
        f.snapshot("v", "s").unwrap();
        assert!(matches!(
            f.snapshot("v", "s"),
            Err(SnapshotError::Exists { .. })
        ));
        f.destroy_volume("v").unwrap();
        // Snapshots outlive their volume, as on every backend.
        f.clone_snapshot("v", "s", "w").unwrap();
        f.destroy_snapshot("v", "s").unwrap();
        assert!(
            matches!(f.destroy_snapshot("v", "s"), Err(SnapshotError::NotFound { kind: "snapshot", name }) if name == "v@s")
        );
    }

    #[test]
    fn failed_populate_leaves_nothing() {
        let f = FakeBackend::new();
        let err = f
            .create_base("img", &mut |_: &Path| {
                Err(SnapshotError::Unsupported("boom".into()))
            })
            .unwrap_err();
        assert_eq!(err.to_string(), "boom");
        assert!(!f.has_base("img").unwrap());
        assert!(!f.root().join("images/img").exists());
    }

    #[test]
    fn removes_its_own_root_on_drop() {
        let f = FakeBackend::new();
        base(&f);
        let root = f.root().to_path_buf();
        assert!(root.exists());
        drop(f);
        assert!(!root.exists());
    }
}
