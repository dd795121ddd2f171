//! Test harness: drives the real `sandtree` binary (CLI and service) on real storage.
//!
//! Tests that need root, CRIU or a tool call [`require`]: outside CI it prints
//! "skipping: <reason>" and the test returns; with CI=true it panics instead, so nothing is
//! silently skipped there. Every service, pool and episode a test makes is removed by a guard's
//! Drop, also when the test fails.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The sandtree binary next to the test executable (target/<profile>/sandtree), or
/// `SANDTREE_BIN` (to run these tests against another build, e.g. an older one that should fail).
pub fn bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SANDTREE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join("sandtree");
    assert!(
        p.exists(),
        "{} not built: run `cargo build -p sandtree` first",
        p.display()
    );
    p
}

/// Returns false (and prints why) if a requirement is missing; panics instead under CI=true.
pub fn require(ok: bool, reason: &str) -> bool {
    if ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("requirement missing under CI: {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args([
            "-c",
            &format!("command -v {tool} || test -x /usr/local/sbin/{tool}"),
        ])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Root, CRIU, btrfs: what every sandbox test needs.
pub fn require_sandbox_host() -> bool {
    require(is_root(), "not root")
        && require(have("criu"), "CRIU >= 4.0 not found (run scripts/setup.sh)")
        && require(have("mkfs.btrfs"), "btrfs-progs not found")
        && require(
            Path::new("/bin/busybox").exists(),
            "busybox-static not installed",
        )
}

pub fn require_zfs() -> bool {
    require(have("zpool") && have("zfs-fuse"), "zfs-fuse not installed")
}

static SEQ: AtomicU32 = AtomicU32::new(0);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A private service on its own data dir and socket; stopped and cleaned on drop.
pub struct Service {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pool: Option<String>,
    storage: String,
    extra: Vec<String>,
}

/// Storage for a test service.
pub enum Storage {
    Btrfs,
    /// A fresh zfs-fuse pool on a file, made and destroyed by the guard.
    Zfs,
}

impl Service {
    pub fn start(storage: Storage) -> Service {
        Service::start_with(storage, &[])
    }

    /// Like [`Service::start`], with extra `serve` flags.
    pub fn start_with(storage: Storage, extra: &[&str]) -> Service {
        let dir = std::env::temp_dir().join(unique("sandtree-test-"));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("s.sock");
        let (spec, pool) = match storage {
            Storage::Btrfs => ("btrfs".to_string(), None),
            Storage::Zfs => {
                let name = unique("sttest");
                // The storage crate's helper takes the host-wide zfs-fuse lock, as the service
                // does: a mount racing another one wedges zfs-fuse.
                sandtree_storage::pool::create_file_pool(&name, &dir.join("zpool.img"), 4 << 30)
                    .unwrap_or_else(|e| panic!("zpool create {name}: {e}"));
                (format!("zfs:{name}/sandtree"), Some(name))
            }
        };
        let mut s = Service {
            child: None,
            dir,
            socket,
            pool,
            storage: spec,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("serve.log"))
            .unwrap();
        let child = Command::new(bin())
            // Tests cross-check every auto verdict: an unsafe one is logged and upgraded.
            .args([
                "serve",
                "--verify-verdicts",
                "--storage",
                &self.storage,
                "--data-dir",
            ])
            .arg(self.dir.join("data"))
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.extra)
            .env("SANDTREE_LOG", "info,sandtree=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn sandtree serve");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(120);
        while !self.socket.exists() || !self.cli(&["list"]).status.success() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("service exited {st}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "service did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("serve.log")).unwrap_or_default()
    }

    /// SIGKILL the service (crash tests).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Start it again on the same data dir.
    pub fn restart(&mut self) {
        self.kill9();
        let _ = std::fs::remove_file(&self.socket);
        self.spawn();
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run sandtree")
    }

    /// Runs a CLI command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "sandtree {args:?} failed: {}\nservice log tail:\n{}",
            String::from_utf8_lossy(&o.stderr),
            tail(&self.log())
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    pub fn image(&self, name: &str) {
        let have = self.ok(&["image", "list"]);
        if have.lines().any(|l| l == name) {
            return;
        }
        // `image build debian` copies the debootstrap that scripts/rootfs-cache.sh keeps.
        self.ok(&["image", "build", name]);
    }

    pub fn create(&self, image: &str, policy: &str) -> String {
        self.image(image);
        self.ok(&["create", "--image", image, "--policy", policy])
            .trim()
            .to_string()
    }

    /// Every volume and snapshot the service's storage holds, every CRIU image directory and
    /// every staged bundle file in its data dir, sorted: what a refused call must not change.
    pub fn storage_objects(&self) -> Vec<String> {
        let mut v = Vec::new();
        let data = self.dir.join("data");
        let list = |d: &Path, tag: &str, v: &mut Vec<String>| {
            if let Ok(rd) = std::fs::read_dir(d) {
                for e in rd.flatten() {
                    v.push(format!("{tag}:{}", e.file_name().to_string_lossy()));
                }
            }
        };
        match self.storage.strip_prefix("zfs:") {
            Some(ds) => {
                let out = sandtree_storage::cmd::run(
                    "zfs",
                    ["list", "-H", "-r", "-t", "all", "-o", "name", ds],
                )
                .unwrap_or_else(|e| panic!("zfs list {ds}: {e}"));
                v.extend(
                    out.lines()
                        .filter(|l| !l.contains("/images/") && !l.contains("/images@"))
                        .map(|l| format!("zfs:{l}")),
                );
            }
            None => {
                let top = data.join("storage/mnt/sandtree");
                list(&top.join("volumes"), "volume", &mut v);
                if let Ok(rd) = std::fs::read_dir(top.join("snapshots")) {
                    for e in rd.flatten() {
                        list(&e.path(), "snapshot", &mut v);
                    }
                }
            }
        }
        list(&data.join("images"), "criu-image", &mut v);
        list(&data.join("bundles"), "bundle", &mut v);
        v.sort();
        v
    }

    pub fn step(&self, ep: &str, cmd: &str) -> serde_json::Value {
        let out = self.ok(&["step", ep, "--json", "--", cmd]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad step json {out:?}: {e}"))
    }
}

pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline && c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(p) = self.pool.take() {
            if let Err(e) = sandtree_storage::pool::destroy_file_pool(&p) {
                eprintln!("warning: cannot destroy test pool {p}: {e}");
            }
        }
        let mnt = self.dir.join("data/storage/mnt");
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&mnt)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A trajectory of the shared workload suite.
#[derive(Debug, serde::Deserialize)]
pub struct Trajectory {
    pub name: String,
    pub image: String,
    pub turns: Vec<Turn>,
}

#[derive(Debug, serde::Deserialize)]
pub struct Turn {
    pub cmd: String,
    pub effect: String,
}

/// ../shared/workloads/public relative to the workspace root.
pub fn workloads_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for c in [
        root.join("../shared/workloads/public"),
        root.join("shared/workloads/public"),
    ] {
        if c.exists() {
            return c;
        }
    }
    panic!("shared workloads not found next to {}", root.display());
}

pub fn trajectories() -> Vec<Trajectory> {
    let mut v: Vec<Trajectory> = std::fs::read_dir(workloads_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap())
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// xorshift64*: a small seeded generator for tests that pick random steps, delays and fork points
/// (seeded, so a failing run can be repeated).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed: distinct seeds give distinct, non-zero states.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-enough in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with the given probability in percent.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A directory under the system temp dir with a unique name, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let d = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Compiles `tests/probes/<name>` static with gcc into `out` (mode 0755).
pub fn compile_static_probe(name: &str, out: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("probes")
        .join(name);
    let o = Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(out)
        .arg(&src)
        .output()
        .expect("run gcc");
    assert!(
        o.status.success(),
        "gcc -static {} failed (is glibc's static libc installed?):\n{}",
        src.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A rootfs directory `root` for `image import`: the host's busybox with every applet linked in
/// /bin, and the empty directories `dirs`.
pub fn busybox_rootfs(root: &Path, dirs: &[&str]) {
    for d in std::iter::once(&"bin").chain(dirs) {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .expect("busybox --list");
    for applet in String::from_utf8_lossy(&list.stdout)
        .lines()
        .filter(|a| !a.is_empty() && *a != "busybox")
    {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
}
