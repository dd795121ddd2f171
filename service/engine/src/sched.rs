//! The host-wide checkpoint scheduler: every episode's pending checkpoint is one job in one queue.
//!
//! **Deadlines.** A job's deadline is when its episode's next step is expected: the end of the
//! step that made it plus the episode's think time (an EWMA of the gaps between its steps, seeded
//! from the host-wide EWMA until the episode has one). `edf` starts the job with the earliest
//! *latest start* first (deadline minus the measured cost of a job of its kind), `fifo` (today's
//! semaphore, the baseline) in the order jobs came.
//!
//! **Concurrency.** At most `cap` jobs run at once (the host's CPUs by default: a dump and a
//! snapshot are CPU-bound in CRIU and the file system). A step that arrives before its own
//! checkpoint has started *promotes* it under `edf`: the job starts at once, past the cap, so a
//! step never waits for another episode's checkpoint (only for its own), as long as fewer than
//! `express` promoted jobs already run past it; beyond that (an overloaded host, where every
//! step finds its checkpoint queued) promoted jobs wait at the head of the queue, so that
//! concurrency stays bounded at `cap + express`. With `express` 0 a promoted job only goes to
//! the head of the queue.
//!
//! **Batches.** When an `edf` job of kind fs starts, every other queued fs job whose latest start
//! falls within [`BATCH_WINDOW`] of it starts with it, up to [`MAX_BATCH`]: their snapshots go to
//! the storage layer in one call ([`sandtree_storage::SnapshotBackend::snapshot_many`]; one
//! `zfs snapshot`, one transaction group). A batch takes one place under the cap.
//!
//! **Fairness.** Deadlines are fixed when a job is queued and think times are capped at
//! [`MAX_THINK`], so a job waits at most until every job queued before its deadline has started:
//! no episode is starved under a steady load.
//!
//! The scheduler is a data structure under one mutex; the engine's `pump` starts what it hands
//! out. It is generic over the job's payload so that its unit tests need no engine.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sandtree_branching::{EpisodeId, NodeId};

/// How jobs are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Discipline {
    /// Earliest latest-start first, with promotion and fs batches.
    #[default]
    Edf,
    /// In the order queued, no promotion, no batches (the old `--checkpoint-slots` semaphore).
    Fifo,
}

impl std::str::FromStr for Discipline {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "edf" => Ok(Discipline::Edf),
            "fifo" => Ok(Discipline::Fifo),
            _ => Err(format!("invalid scheduler {s:?}: expected edf or fifo")),
        }
    }
}

impl std::fmt::Display for Discipline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Discipline::Edf => "edf",
            Discipline::Fifo => "fifo",
        })
    }
}

/// What a job does, for its cost estimate and for batching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// A file-system snapshot only: batchable.
    Fs,
    /// A CRIU dump with its snapshot.
    Full,
}

/// Fs jobs whose latest starts are this close go in one batch.
pub const BATCH_WINDOW: Duration = Duration::from_millis(500);
/// Most snapshots in one batch.
pub const MAX_BATCH: usize = 32;
/// Longest think time a deadline assumes.
pub const MAX_THINK: Duration = Duration::from_secs(60);
/// Think time assumed before any episode has shown one.
pub const DEFAULT_THINK: Duration = Duration::from_secs(1);
/// Weight of the newest sample in every EWMA here.
const ALPHA: f64 = 0.3;

/// One job as the scheduler sees it.
#[derive(Debug, Clone)]
pub struct Job {
    pub episode: EpisodeId,
    pub node: NodeId,
    pub kind: JobKind,
    /// When the episode's next step is expected.
    pub deadline: Instant,
}

/// A job handed out to run, with how long it was queued.
pub struct Started<P> {
    pub job: Job,
    pub payload: P,
    pub queued: Duration,
    pub promoted: bool,
    /// It runs past the cap (a promoted job when the cap was full): give this to
    /// [`Scheduler::finished`].
    pub past_cap: bool,
}

struct Queued<P> {
    job: Job,
    payload: P,
    seq: u64,
    at: Instant,
    promoted: bool,
}

struct State<P> {
    queue: Vec<Queued<P>>,
    /// Batches running that count against the cap.
    running: usize,
    /// Promoted batches running past the cap.
    running_promoted: usize,
    seq: u64,
    /// EWMA cost of a job of each kind, ms.
    cost_ms: HashMap<JobKind, f64>,
    /// Host-wide EWMA think time, ms.
    think_ms: Option<f64>,
}

/// Counters for `stats` and the bench.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub queued: usize,
    pub running: usize,
    pub promoted: u64,
    pub batches: u64,
    pub batched_jobs: u64,
    /// Most batches that ran at once.
    pub peak_running: usize,
}

/// The scheduler. See the module docs.
pub struct Scheduler<P> {
    discipline: Discipline,
    cap: usize,
    /// Promoted batches that may run past the cap at once.
    express: usize,
    state: Mutex<State<P>>,
    counts: Mutex<Counts>,
}

/// An EWMA step.
pub fn ewma(old: Option<f64>, sample: f64) -> f64 {
    match old {
        Some(o) => o + ALPHA * (sample - o),
        None => sample,
    }
}

impl<P> Scheduler<P> {
    /// `cap` batches at once, and `express` more for promoted jobs (edf).
    pub fn new(discipline: Discipline, cap: usize, express: usize) -> Scheduler<P> {
        Scheduler {
            discipline,
            cap: cap.max(1),
            express,
            state: Mutex::new(State {
                queue: Vec::new(),
                running: 0,
                running_promoted: 0,
                seq: 0,
                cost_ms: HashMap::new(),
                think_ms: None,
            }),
            counts: Mutex::default(),
        }
    }

    pub fn discipline(&self) -> Discipline {
        self.discipline
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State<P>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records one think time seen on the host (the gap between a step's end and the next
    /// step of the same episode).
    pub fn observe_think(&self, d: Duration) {
        let mut s = self.state();
        let ms = d.min(MAX_THINK).as_secs_f64() * 1e3;
        s.think_ms = Some(ewma(s.think_ms, ms));
    }

    /// The think time to assume for an episode with EWMA `episode_ms` (none yet: the host's).
    pub fn think_for(&self, episode_ms: Option<f64>) -> Duration {
        let ms = episode_ms
            .or(self.state().think_ms)
            .unwrap_or(DEFAULT_THINK.as_secs_f64() * 1e3);
        Duration::from_secs_f64(ms.max(0.0) / 1e3).min(MAX_THINK)
    }

    /// Queues a job.
    pub fn push(&self, job: Job, payload: P) {
        let mut s = self.state();
        s.seq += 1;
        let seq = s.seq;
        s.queue.push(Queued {
            job,
            payload,
            seq,
            at: Instant::now(),
            promoted: false,
        });
    }

    /// A step of the node's episode arrived: under `edf` a queued job for `node` starts next,
    /// past the cap. Returns whether it was queued.
    pub fn promote(&self, node: NodeId) -> bool {
        if self.discipline == Discipline::Fifo {
            return false;
        }
        let mut s = self.state();
        match s.queue.iter_mut().find(|q| q.job.node == node) {
            Some(q) => {
                q.promoted = true;
                drop(s);
                self.counts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .promoted += 1;
                true
            }
            None => false,
        }
    }

    /// The next batch to start, if one may start now. The caller runs it and then calls
    /// [`Scheduler::finished`] with the `past_cap` flag of its first job.
    pub fn next(&self) -> Option<Vec<Started<P>>> {
        let mut s = self.state();
        if s.queue.is_empty() {
            return None;
        }
        let now = Instant::now();
        let head = match self.discipline {
            Discipline::Fifo => {
                if s.running >= self.cap {
                    return None;
                }
                s.queue
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, q)| q.seq)
                    .map(|(i, _)| i)?
            }
            Discipline::Edf => {
                // Promoted jobs first, past the cap while fewer than `cap` others run past it.
                let promoted = s
                    .queue
                    .iter()
                    .enumerate()
                    .filter(|(_, q)| q.promoted)
                    .min_by_key(|(_, q)| q.seq)
                    .map(|(i, _)| i);
                let room = s.running < self.cap || s.running_promoted < self.express;
                match promoted {
                    Some(i) if room => i,
                    _ if s.running >= self.cap => return None,
                    // (A promoted job always has room when the cap has: it took the arm above.)
                    _ => {
                        let key = |q: &Queued<P>| (self.latest_start(&s, q), q.seq);
                        s.queue
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, q)| key(q))
                            .map(|(i, _)| i)?
                    }
                }
            }
        };
        let first = s.queue.swap_remove(head);
        // A job takes a place under the cap if there is one, else (promoted) one past it.
        let past_cap = s.running >= self.cap;
        if past_cap {
            s.running_promoted += 1;
        } else {
            s.running += 1;
        }
        let running_now = s.running + s.running_promoted;
        let mut batch = vec![first];
        if self.discipline == Discipline::Edf && batch[0].job.kind == JobKind::Fs {
            let limit = self.latest_start(&s, &batch[0]) + BATCH_WINDOW;
            let mut more: Vec<usize> = s
                .queue
                .iter()
                .enumerate()
                .filter(|(_, q)| q.job.kind == JobKind::Fs && self.latest_start(&s, q) <= limit)
                .map(|(i, _)| i)
                .collect();
            more.truncate(MAX_BATCH - 1);
            // Highest index first, so swap_remove leaves the other indices valid.
            more.sort_unstable_by(|a, b| b.cmp(a));
            for i in more {
                batch.push(s.queue.swap_remove(i));
            }
        }
        drop(s);
        {
            let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
            c.peak_running = c.peak_running.max(running_now);
            if batch.len() > 1 {
                c.batches += 1;
                c.batched_jobs += batch.len() as u64;
            }
        }
        Some(
            batch
                .into_iter()
                .map(|q| Started {
                    queued: now.saturating_duration_since(q.at),
                    promoted: q.promoted,
                    past_cap,
                    job: q.job,
                    payload: q.payload,
                })
                .collect(),
        )
    }

    /// A batch handed out by [`Scheduler::next`] ended; `ms` is what each of its jobs took.
    pub fn finished(&self, past_cap: bool, kind: JobKind, ms: f64) {
        let mut s = self.state();
        if past_cap {
            s.running_promoted = s.running_promoted.saturating_sub(1);
        } else {
            s.running = s.running.saturating_sub(1);
        }
        let old = s.cost_ms.get(&kind).copied();
        s.cost_ms.insert(kind, ewma(old, ms));
    }

    /// When a job must start to be done by its deadline, by the measured cost of its kind.
    fn latest_start(&self, s: &State<P>, q: &Queued<P>) -> Instant {
        let cost = s.cost_ms.get(&q.job.kind).copied().unwrap_or(0.0);
        let cost = Duration::from_secs_f64(cost.max(0.0) / 1e3);
        q.job.deadline.checked_sub(cost).unwrap_or(q.job.deadline)
    }

    pub fn counts(&self) -> Counts {
        let s = self.state();
        let mut c = *self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.queued = s.queue.len();
        c.running = s.running + s.running_promoted;
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(ep: &str, node: u64, kind: JobKind, deadline_ms: u64, t0: Instant) -> Job {
        Job {
            episode: EpisodeId(ep.to_string()),
            node: NodeId(node),
            kind,
            deadline: t0 + Duration::from_millis(deadline_ms),
        }
    }

    fn order(s: &Scheduler<u64>) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(b) = s.next() {
            let (p, k) = (b[0].past_cap, b[0].job.kind);
            out.extend(b.iter().map(|x| x.payload));
            s.finished(p, k, 1.0);
        }
        out
    }

    #[test]
    fn edf_starts_the_earliest_deadline_and_fifo_the_oldest() {
        let t0 = Instant::now();
        for (d, want) in [
            (Discipline::Edf, vec![2, 3, 1]),
            (Discipline::Fifo, vec![1, 2, 3]),
        ] {
            let s = Scheduler::new(d, 1, 1);
            s.push(job("a", 1, JobKind::Full, 3000, t0), 1);
            s.push(job("b", 2, JobKind::Full, 1000, t0), 2);
            s.push(job("c", 3, JobKind::Full, 2000, t0), 3);
            assert_eq!(order(&s), want, "{d}");
        }
    }

    #[test]
    fn the_cap_holds_but_a_promoted_job_starts_past_it() {
        let t0 = Instant::now();
        let s = Scheduler::new(Discipline::Edf, 1, 1);
        s.push(job("a", 1, JobKind::Full, 10, t0), 1);
        s.push(job("b", 2, JobKind::Full, 20, t0), 2);
        let first = s.next().expect("one may start");
        assert_eq!(first[0].payload, 1);
        assert!(s.next().is_none(), "the cap is 1 and one runs");
        assert!(s.promote(NodeId(2)));
        let second = s.next().expect("a promoted job starts past the cap");
        assert_eq!((second[0].payload, second[0].promoted), (2, true));
        assert!(second[0].past_cap);
        assert_eq!(s.counts().running, 2);
        s.finished(true, JobKind::Full, 5.0);
        s.finished(false, JobKind::Full, 5.0);
        assert_eq!(s.counts().peak_running, 2);
        assert_eq!(s.counts().running, 0);
        assert!(!s.promote(NodeId(2)), "no longer queued");
        // fifo has no promotion: it is the baseline.
        let f = Scheduler::new(Discipline::Fifo, 1, 1);
        f.push(job("a", 1, JobKind::Full, 10, t0), 1);
        f.push(job("b", 2, JobKind::Full, 20, t0), 2);
        let _one = f.next();
        assert!(!f.promote(NodeId(2)));
        assert!(f.next().is_none());
    }

    #[test]
    fn promoted_jobs_past_the_cap_are_bounded_by_the_cap() {
        let t0 = Instant::now();
        let s = Scheduler::new(Discipline::Edf, 2, 2);
        for n in 0..6 {
            s.push(job("e", n, JobKind::Full, 10 * n, t0), n);
        }
        let (a, b) = (s.next().unwrap(), s.next().unwrap());
        assert!(!a[0].past_cap && !b[0].past_cap);
        for n in 2..6 {
            assert!(s.promote(NodeId(n)));
        }
        let (c, d) = (s.next().unwrap(), s.next().unwrap());
        assert!(c[0].past_cap && d[0].past_cap);
        assert!(
            s.next().is_none(),
            "2 under the cap and 2 past it run: the rest wait"
        );
        s.finished(false, JobKind::Full, 1.0);
        let e = s.next().expect("a place under the cap freed");
        assert!(
            e[0].promoted && !e[0].past_cap,
            "the promoted job goes first"
        );
        assert_eq!(s.counts().peak_running, 4);
    }

    #[test]
    fn fs_jobs_due_together_start_as_one_batch() {
        let t0 = Instant::now();
        let s = Scheduler::new(Discipline::Edf, 1, 1);
        s.push(job("a", 1, JobKind::Fs, 1000, t0), 1);
        s.push(job("b", 2, JobKind::Full, 1100, t0), 2);
        s.push(job("c", 3, JobKind::Fs, 1200, t0), 3);
        s.push(job("d", 4, JobKind::Fs, 1000 + 5000, t0), 4);
        let b = s.next().expect("a batch");
        let mut got: Vec<u64> = b.iter().map(|x| x.payload).collect();
        got.sort();
        assert_eq!(
            got,
            vec![1, 3],
            "fs jobs within the window, not the full one, not d"
        );
        assert_eq!(s.counts().batches, 1);
        assert_eq!(s.counts().running, 1, "a batch takes one place");
        // fifo never batches.
        let f = Scheduler::new(Discipline::Fifo, 1, 1);
        f.push(job("a", 1, JobKind::Fs, 1000, t0), 1);
        f.push(job("c", 3, JobKind::Fs, 1000, t0), 3);
        assert_eq!(f.next().expect("one").len(), 1);
    }

    #[test]
    fn measured_cost_moves_the_latest_start() {
        let t0 = Instant::now();
        let s = Scheduler::new(Discipline::Edf, 1, 1);
        // Full jobs have been measured at 2 s, fs at 1 ms: a full job due 1.5 s after an fs
        // job must start first.
        s.finished(false, JobKind::Full, 2000.0);
        s.finished(false, JobKind::Fs, 1.0);
        s.push(job("a", 1, JobKind::Fs, 1000, t0), 1);
        s.push(job("b", 2, JobKind::Full, 2500, t0), 2);
        assert_eq!(order(&s), vec![2, 1]);
    }

    #[test]
    fn a_steady_load_starves_no_episode() {
        // One episode thinks for 60 s, 8 others for 10 ms and keep queueing: the slow one's job
        // starts once the jobs queued before its deadline have started.
        let t0 = Instant::now();
        let s = Scheduler::new(Discipline::Edf, 1, 1);
        s.push(job("slow", 0, JobKind::Full, 60_000, t0), 0);
        let mut started_slow_at = None;
        let mut node = 1;
        for round in 0..10_000u64 {
            let now_ms = round * 10;
            for e in 0..8 {
                s.push(
                    job(&format!("e{e}"), node, JobKind::Full, now_ms + 10, t0),
                    node,
                );
                node += 1;
            }
            for _ in 0..8 {
                if let Some(b) = s.next() {
                    if b[0].payload == 0 {
                        started_slow_at = Some(now_ms);
                    }
                    s.finished(false, JobKind::Full, 0.0);
                }
            }
            if started_slow_at.is_some() {
                break;
            }
        }
        let at = started_slow_at.expect("the slow episode's job started");
        assert!(at <= 60_010, "started at {at} ms, after its deadline");
    }

    #[test]
    fn think_time_is_the_episodes_else_the_hosts() {
        let s: Scheduler<()> = Scheduler::new(Discipline::Edf, 2, 2);
        assert_eq!(s.think_for(None), DEFAULT_THINK);
        s.observe_think(Duration::from_millis(200));
        assert_eq!(s.think_for(None), Duration::from_millis(200));
        assert_eq!(s.think_for(Some(50.0)), Duration::from_millis(50));
        assert_eq!(s.think_for(Some(1e9)), MAX_THINK);
    }
}
