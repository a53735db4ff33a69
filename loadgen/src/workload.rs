//! The workloads, run the same way against every system: a connect storm that leaves its
//! sockets idle, publishing to many users' channels, and fan-out to one channel. Every run is
//! bounded in time and counts delivered, lost and duplicated messages per subscriber.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use crate::histogram::Percentiles;
use crate::process::{ProcessError, Usage};
use crate::systems::{ClientError, SubState, Tally, Target};

/// Most messages in one publish request (the host's limit).
const MAX_BATCH: usize = 1000;
/// How long a run waits after publishing stops for the last messages to arrive.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Sockets subscribed through one workload, and what was published to their channels.
pub struct Group {
    target: Arc<Target>,
    /// Channel names in the target's own spelling.
    channels: Arc<Vec<String>>,
    /// The last sequence number published on each channel.
    published: Arc<Vec<AtomicU64>>,
    subs: Vec<Arc<SubState>>,
    tasks: Vec<JoinHandle<()>>,
    tally: Arc<Tally>,
    /// Subscribers on each channel: how many deliveries one message makes.
    per_channel: usize,
}

impl Drop for Group {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Storm {
    pub attempted: usize,
    pub subscribed: usize,
    pub failed: usize,
    pub secs: f64,
    /// Completed handshakes (the `subscribed` reply received) per second.
    pub per_sec: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// How a run paces its publishers.
#[derive(Clone, Copy, Debug)]
pub enum Pace {
    /// As fast as deliveries keep up: at most this many deliveries outstanding at once. The
    /// rate it reaches is the most the system sustains without dropping anything.
    Window(u64),
    /// A fixed rate of published messages per second, whatever happens to them.
    Rate(f64),
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Run {
    pub pace: String,
    pub secs: f64,
    pub published: u64,
    /// The rate asked for in a fixed-rate run; 0 when publishing flat out.
    pub offered_per_sec: f64,
    pub published_per_sec: f64,
    pub delivered_per_sec: f64,
    pub latency: Percentiles,
    /// Server CPU over the measured part of the run, in percent of one core.
    pub server_cpu_percent: f64,
    /// Server CPU per delivered message.
    pub server_cpu_us_per_delivery: f64,
    pub loadgen_cpu_percent: f64,
    pub lost: u64,
    pub duplicated: u64,
    pub wrong_offsets: u64,
    pub disconnected: u64,
    pub publish_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_publish_error: Option<String>,
    /// When the run was repeated: this is the median one, and the faults above add up all.
    pub repeats: usize,
    pub delivered_per_sec_each: Vec<f64>,
    pub p99_us_each: Vec<u64>,
}

impl Run {
    /// The median of `runs` by `key`, carrying the faults of all of them.
    pub fn median(mut runs: Vec<Run>, key: impl Fn(&Run) -> f64) -> Run {
        let delivered_each = runs.iter().map(|r| r.delivered_per_sec).collect();
        let p99_each = runs.iter().map(|r| r.latency.p99_us).collect();
        let sum = |f: fn(&Run) -> u64| runs.iter().map(f).sum::<u64>();
        let faults = (
            sum(|r| r.lost),
            sum(|r| r.duplicated),
            sum(|r| r.wrong_offsets),
            sum(|r| r.disconnected),
            sum(|r| r.publish_errors),
            sum(|r| r.published),
        );
        let first_error = runs.iter().find_map(|r| r.first_publish_error.clone());
        let repeats = runs.len();
        runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
        let mut median = runs.swap_remove(repeats / 2);
        (
            median.lost,
            median.duplicated,
            median.wrong_offsets,
            median.disconnected,
            median.publish_errors,
            median.published,
        ) = faults;
        median.first_publish_error = first_error;
        median.repeats = repeats;
        median.delivered_per_sec_each = delivered_each;
        median.p99_us_each = p99_each;
        median
    }

    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.wrong_offsets == 0
            && self.disconnected == 0
            && self.publish_errors == 0
    }
}

/// Opens one socket per entry of `users`, `concurrency` handshakes at a time. Socket `i`
/// subscribes as `users[i]` to channel `i / per_channel`, so the users of one channel's
/// sockets must be the same.
pub async fn connect(
    target: Arc<Target>,
    users: Vec<String>,
    per_channel: usize,
    concurrency: usize,
    limit: Duration,
) -> (Group, Storm) {
    let tally = Arc::new(Tally::default());
    let channels: Vec<String> = users
        .iter()
        .step_by(per_channel)
        .map(|u| target.kind.channel(u))
        .collect();
    let published = (0..channels.len()).map(|_| AtomicU64::new(0)).collect();
    let gate = Arc::new(Semaphore::new(concurrency));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Result<(), ClientError>>();
    let started = Instant::now();
    let mut subs = Vec::with_capacity(users.len());
    let mut tasks = Vec::with_capacity(users.len());
    for (i, user) in users.iter().enumerate() {
        let sub = Arc::new(SubState {
            channel: i / per_channel,
            last_seq: AtomicU64::new(0),
        });
        subs.push(sub.clone());
        let (target, gate, done, tally) =
            (target.clone(), gate.clone(), done_tx.clone(), tally.clone());
        let user = user.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(permit) = gate.acquire_owned().await else {
                return;
            };
            let subscribed = target.subscribe(&user).await;
            drop(permit);
            match subscribed {
                Ok(subscription) => {
                    let _ = done.send(Ok(()));
                    subscription.read_all(sub, tally, target.kind).await;
                }
                Err(e) => {
                    let _ = done.send(Err(e));
                }
            }
        }));
    }
    drop(done_tx);

    let mut storm = Storm {
        attempted: users.len(),
        ..Storm::default()
    };
    let deadline = tokio::time::Instant::now() + limit;
    let mut last_done = started;
    while storm.subscribed + storm.failed < users.len() {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some(Ok(()))) => {
                storm.subscribed += 1;
                last_done = Instant::now();
            }
            Ok(Some(Err(e))) => {
                storm.failed += 1;
                storm.first_error.get_or_insert_with(|| e.to_string());
            }
            Ok(None) => break,
            Err(_) => {
                let left = users.len() - storm.subscribed - storm.failed;
                storm.failed += left;
                storm
                    .first_error
                    .get_or_insert_with(|| format!("{left} handshakes still open at the limit"));
                break;
            }
        }
    }
    storm.secs = last_done.duration_since(started).as_secs_f64();
    if storm.secs > 0.0 {
        storm.per_sec = storm.subscribed as f64 / storm.secs;
    }
    let group = Group {
        target,
        channels: Arc::new(channels),
        published: Arc::new(published),
        subs,
        tasks,
        tally,
        per_channel,
    };
    (group, storm)
}

/// What one run measures, and how long it lasts.
#[derive(Clone, Copy, Debug)]
pub struct RunShape {
    pub pace: Pace,
    pub warmup: Duration,
    pub measured: Duration,
    pub publishers: usize,
}

impl Group {
    pub fn sockets(&self) -> usize {
        self.subs.len()
    }

    /// Publishes to every channel of the group, round robin, for the length of `shape`, then
    /// waits for the stragglers and accounts for every message.
    pub async fn run(&self, shape: RunShape, server_pid: u32) -> Result<Run, ProcessError> {
        self.tally.clear();
        let sent = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let (error_tx, mut error_rx) = mpsc::unbounded_channel::<String>();
        let started = tokio::time::Instant::now();
        let stop_at = started + shape.warmup + shape.measured;
        let publishers = shape.publishers.clamp(1, self.channels.len());
        let mut tasks = Vec::new();
        for index in 0..publishers {
            let own: Vec<usize> = (index..self.channels.len()).step_by(publishers).collect();
            let job = PublishJob {
                target: self.target.clone(),
                channels: self.channels.clone(),
                published: self.published.clone(),
                own,
                sent: sent.clone(),
                errors: errors.clone(),
                error_tx: error_tx.clone(),
                tally: self.tally.clone(),
                per_channel: self.per_channel as u64,
                pace: shape.pace,
                share: publishers as f64,
                started,
                stop_at,
            };
            tasks.push(tokio::spawn(job.run()));
        }
        drop(error_tx);

        tokio::time::sleep(shape.warmup).await;
        let delivered_from = self.tally.delivered.load(Ordering::Relaxed);
        let sent_from = sent.load(Ordering::Relaxed);
        self.tally.latency.clear();
        let (server_from, own_from) = (Usage::of(server_pid)?, Usage::own()?);
        tokio::time::sleep_until(stop_at).await;
        let delivered_to = self.tally.delivered.load(Ordering::Relaxed);
        let sent_to = sent.load(Ordering::Relaxed);
        let (server_to, own_to) = (Usage::of(server_pid)?, Usage::own()?);
        for task in tasks {
            let _ = task.await;
        }
        let latency = self.tally.latency.percentiles();
        self.drain(sent.load(Ordering::Relaxed)).await;

        let secs = server_to.at.duration_since(server_from.at).as_secs_f64();
        let delivered = delivered_to - delivered_from;
        let server_cpu = server_to.cpu.saturating_sub(server_from.cpu);
        Ok(Run {
            pace: match shape.pace {
                Pace::Window(w) => format!("window of {w} deliveries"),
                Pace::Rate(r) => format!("{r:.0} msg/s"),
            },
            secs,
            published: sent.load(Ordering::Relaxed),
            offered_per_sec: match shape.pace {
                Pace::Window(_) => 0.0,
                Pace::Rate(r) => r,
            },
            published_per_sec: (sent_to - sent_from) as f64 / secs,
            delivered_per_sec: delivered as f64 / secs,
            latency,
            server_cpu_percent: server_to.cpu_percent_since(&server_from),
            server_cpu_us_per_delivery: server_cpu.as_secs_f64() * 1e6 / delivered.max(1) as f64,
            loadgen_cpu_percent: own_to.cpu_percent_since(&own_from),
            lost: self.account_losses(),
            duplicated: self.tally.duplicated.load(Ordering::Relaxed),
            wrong_offsets: self.tally.wrong_offsets.load(Ordering::Relaxed),
            disconnected: self.tally.disconnected.load(Ordering::Relaxed),
            publish_errors: errors.load(Ordering::Relaxed),
            first_publish_error: error_rx.try_recv().ok(),
            repeats: 1,
            delivered_per_sec_each: Vec::new(),
            p99_us_each: Vec::new(),
        })
    }

    /// Waits until every published message has reached every subscriber, or the limit.
    async fn drain(&self, sent: u64) {
        let expected = sent * self.per_channel as u64;
        let deadline = Instant::now() + DRAIN_LIMIT;
        while self.tally.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Gaps seen during the run plus every subscriber's missing tail; then lines each
    /// subscriber up with its channel so the next run starts even.
    fn account_losses(&self) -> u64 {
        let mut lost = self.tally.gaps.load(Ordering::Relaxed);
        for sub in &self.subs {
            let expected = self.published[sub.channel].load(Ordering::Relaxed);
            let last = sub.last_seq.load(Ordering::Relaxed);
            lost += expected.saturating_sub(last);
            sub.last_seq.fetch_max(expected, Ordering::Relaxed);
        }
        lost
    }
}

/// One publisher's share of a run: the channels it owns, so each channel's messages leave
/// in order from one connection.
struct PublishJob {
    target: Arc<Target>,
    channels: Arc<Vec<String>>,
    published: Arc<Vec<AtomicU64>>,
    own: Vec<usize>,
    sent: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    error_tx: mpsc::UnboundedSender<String>,
    tally: Arc<Tally>,
    per_channel: u64,
    pace: Pace,
    /// How many publishers split the rate.
    share: f64,
    started: tokio::time::Instant,
    stop_at: tokio::time::Instant,
}

impl PublishJob {
    async fn run(self) {
        let mut publisher = match self.target.publisher().await {
            Ok(p) => p,
            Err(e) => return self.fail(e),
        };
        let mut cursor = 0usize;
        let mut mine = 0u64;
        while tokio::time::Instant::now() < self.stop_at {
            let n = self.next_batch(mine);
            if n == 0 {
                tokio::time::sleep(Duration::from_micros(500)).await;
                continue;
            }
            let mut batch = Vec::with_capacity(n);
            for _ in 0..n {
                let channel = self.own[cursor % self.own.len()];
                cursor += 1;
                let seq = self.published[channel].fetch_add(1, Ordering::Relaxed) + 1;
                batch.push((self.channels[channel].as_str(), seq));
            }
            mine += n as u64;
            self.sent.fetch_add(n as u64, Ordering::Relaxed);
            if let Err(e) = publisher.send(&batch).await {
                return self.fail(e);
            }
        }
    }

    /// How many messages to send now; 0 means wait a little.
    fn next_batch(&self, mine: u64) -> usize {
        match self.pace {
            Pace::Window(window) => {
                let sent = self.sent.load(Ordering::Relaxed) * self.per_channel;
                let outstanding = sent.saturating_sub(self.tally.delivered.load(Ordering::Relaxed));
                // Limitation: publishers read the shared count without reserving, so two of
                // them can fill the same room and overshoot the window by up to one batch each.
                // A compare-and-swap on `sent` would make the window exact.
                let room = window.saturating_sub(outstanding) / self.per_channel;
                // Small batches would cost a request each; wait for a quarter window.
                let quarter = (window / self.per_channel / 4).max(1);
                if room < quarter.min(MAX_BATCH as u64) {
                    return 0;
                }
                (room as usize).min(MAX_BATCH)
            }
            Pace::Rate(per_sec) => {
                let elapsed = self.started.elapsed().as_secs_f64();
                let due = (per_sec / self.share * elapsed) as u64;
                (due.saturating_sub(mine) as usize).min(MAX_BATCH)
            }
        }
    }

    fn fail(&self, e: ClientError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let _ = self.error_tx.send(e.to_string());
    }
}

/// The users of a workload: `prefix0`, `prefix1`, ...
pub fn users(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}
