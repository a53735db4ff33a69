//! One benchmark: each system started in turn on loopback, put through every workload, and
//! stopped. The host goes first, so the others can be driven at the host's own rates.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use app::token::{random_hex, TokenError, TokenKeys};

use crate::process::{free_port, ProcessError, Server};
use crate::systems::{HostKeys, Kind, Target};
use crate::workload::{self, Group, Pace, Run, RunShape, Storm};

/// The longest a connect storm may take before its stragglers count as failed.
const STORM_LIMIT: Duration = Duration::from_secs(120);
/// Deliveries outstanding per many-users socket when publishing flat out: far below the
/// host's per-socket queue (512), so a fast run never trips the slow-consumer limit.
const WINDOW_PER_SOCKET: u64 = 8;
/// Enough outstanding deliveries to keep every system busy; more only adds queueing delay.
const MANY_USERS_WINDOW_MAX: u64 = 16 * 1024;
/// Messages outstanding on the fan-out channel when publishing flat out: a quarter of the
/// host's per-socket queue.
const FANOUT_WINDOW_MESSAGES: u64 = 128;
/// Per-socket queues of a smoke run. A smoke run checks delivery, not slow consumers: on a busy
/// machine a starved reader can fall 512 messages behind, which the host turns into a
/// disconnect and the ceiling into a loss. Queues this deep hold everything a smoke run sends.
const SMOKE_QUEUE: usize = 1 << 20;

fn send_queue(plan: &Plan) -> usize {
    if plan.smoke {
        SMOKE_QUEUE
    } else {
        crate::ceiling::QUEUE
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("token keys: {0}")]
    Token(#[from] TokenError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

/// How big and how long.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    pub smoke: bool,
    /// Sockets of the storm, idle and many-users workloads: one user and channel each.
    pub users: usize,
    /// Sockets on the one fan-out channel.
    pub fanout: usize,
    pub warmup_secs: f64,
    pub measured_secs: f64,
    /// Handshakes in flight at once during a storm.
    pub storm_concurrency: usize,
    /// Publishing connections in the many-users workload.
    pub publishers: usize,
    /// Pause before reading idle memory, and between workloads.
    pub settle_secs: f64,
    /// Deliveries outstanding at most in the many-users flat-out run; 0 picks the default.
    pub many_users_window: u64,
    /// Times each publishing run is repeated; the median goes in the report.
    pub repeats: usize,
}

impl Plan {
    pub fn full() -> Self {
        Self {
            smoke: false,
            users: 10_000,
            fanout: 1_000,
            warmup_secs: 1.0,
            measured_secs: 5.0,
            storm_concurrency: 64,
            publishers: 2,
            settle_secs: 2.0,
            many_users_window: 0,
            repeats: 3,
        }
    }

    pub fn smoke() -> Self {
        Self {
            smoke: true,
            users: 40,
            fanout: 10,
            warmup_secs: 0.2,
            measured_secs: 0.8,
            storm_concurrency: 16,
            publishers: 2,
            settle_secs: 0.2,
            many_users_window: 0,
            repeats: 1,
        }
    }

    fn shape(&self, pace: Pace, publishers: usize) -> RunShape {
        RunShape {
            pace,
            warmup: Duration::from_secs_f64(self.warmup_secs),
            measured: Duration::from_secs_f64(self.measured_secs),
            publishers,
        }
    }

    fn settle(&self) -> Duration {
        Duration::from_secs_f64(self.settle_secs)
    }
}

/// Where the programs under test are.
pub struct Paths {
    pub server_bin: PathBuf,
    pub nats_bin: PathBuf,
    pub site_root: PathBuf,
    /// Scratch space: logs, configuration, the host's data directory.
    pub work: PathBuf,
    /// A command to run the host under, such as a profiler; empty for none.
    pub host_wrapper: Vec<String>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Idle {
    pub sockets: usize,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub bytes_per_socket: f64,
}

/// Everything measured on one system.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SystemFigures {
    pub kind: Kind,
    pub label: &'static str,
    pub storm: Storm,
    pub idle: Idle,
    pub many_users_max: Run,
    pub many_users_fixed: Run,
    pub fanout_storm: Storm,
    pub fanout_max: Run,
    pub fanout_fixed: Run,
}

impl SystemFigures {
    pub fn runs(&self) -> [(&'static str, &Run); 4] {
        [
            ("many users, flat out", &self.many_users_max),
            ("many users, fixed rate", &self.many_users_fixed),
            ("fan-out, flat out", &self.fanout_max),
            ("fan-out, fixed rate", &self.fanout_fixed),
        ]
    }
}

/// Publish rates for the fixed-rate runs, in messages per second.
#[derive(Clone, Copy, Debug)]
struct Rates {
    many_users: f64,
    fanout: f64,
}

/// Runs every system that is asked for; the host always, first.
pub async fn run(
    plan: &Plan,
    paths: &Paths,
    peers: &[Kind],
) -> Result<Vec<SystemFigures>, BenchError> {
    fs::create_dir_all(&paths.work).map_err(io_err(paths.work.display().to_string()))?;
    let host = run_system(Kind::Host, plan, paths, None).await?;
    // Half of the host's own flat-out rate: the target's latency point, the same for all.
    let rates = Rates {
        many_users: (host.many_users_max.published_per_sec / 2.0).max(100.0),
        fanout: (host.fanout_max.published_per_sec / 2.0).max(10.0),
    };
    let mut all = vec![host];
    for kind in peers {
        all.push(run_system(*kind, plan, paths, Some(rates)).await?);
    }
    Ok(all)
}

async fn run_system(
    kind: Kind,
    plan: &Plan,
    paths: &Paths,
    rates: Option<Rates>,
) -> Result<SystemFigures, BenchError> {
    eprintln!("[loadgen] {}: starting", kind.label());
    let (mut server, target) = start(kind, plan, paths).await?;
    let target = Arc::new(target);
    let pid = server.pid();
    tokio::time::sleep(plan.settle()).await;

    let before = server.usage()?;
    let users = workload::users("u", plan.users);
    let (group, storm) = workload::connect(
        target.clone(),
        users,
        1,
        plan.storm_concurrency,
        STORM_LIMIT,
    )
    .await;
    eprintln!(
        "[loadgen] {}: {} of {} sockets subscribed, {:.0} handshakes/s",
        kind.label(),
        storm.subscribed,
        storm.attempted,
        storm.per_sec
    );
    tokio::time::sleep(plan.settle()).await;
    let after = server.usage()?;
    let idle = Idle {
        sockets: storm.subscribed,
        rss_before_bytes: before.rss_bytes,
        rss_after_bytes: after.rss_bytes,
        bytes_per_socket: after.rss_bytes.saturating_sub(before.rss_bytes) as f64
            / storm.subscribed.max(1) as f64,
    };

    let window = match plan.many_users_window {
        0 => (group.sockets() as u64 * WINDOW_PER_SOCKET).min(MANY_USERS_WINDOW_MAX),
        w => w,
    };
    let shape = plan.shape(Pace::Window(window), plan.publishers);
    let many_users_max = repeated(kind, "many users, flat out", plan, &group, shape, pid).await?;
    let rate = rates.map_or(many_users_max.published_per_sec / 2.0, |r| r.many_users);
    let shape = plan.shape(Pace::Rate(rate), plan.publishers);
    let many_users_fixed =
        repeated(kind, "many users, fixed rate", plan, &group, shape, pid).await?;
    drop(group);
    server.check_alive()?;
    tokio::time::sleep(plan.settle()).await;

    let (fan, fanout_storm) = workload::connect(
        target.clone(),
        vec!["fan".to_owned(); plan.fanout],
        plan.fanout,
        plan.storm_concurrency,
        STORM_LIMIT,
    )
    .await;
    let window = FANOUT_WINDOW_MESSAGES * fan.sockets() as u64;
    let shape = plan.shape(Pace::Window(window), 1);
    let fanout_max = repeated(kind, "fan-out, flat out", plan, &fan, shape, pid).await?;
    let rate = rates.map_or(fanout_max.published_per_sec / 2.0, |r| r.fanout);
    let shape = plan.shape(Pace::Rate(rate), 1);
    let fanout_fixed = repeated(kind, "fan-out, fixed rate", plan, &fan, shape, pid).await?;
    drop(fan);
    server.check_alive()?;
    Ok(SystemFigures {
        kind,
        label: kind.label(),
        storm,
        idle,
        many_users_max,
        many_users_fixed,
        fanout_storm,
        fanout_max,
        fanout_fixed,
    })
}

/// Runs `shape` `plan.repeats` times and keeps the median: by delivery rate when publishing
/// flat out, by p99 latency at a fixed rate.
async fn repeated(
    kind: Kind,
    what: &str,
    plan: &Plan,
    group: &Group,
    shape: RunShape,
    pid: u32,
) -> Result<Run, BenchError> {
    let mut runs = Vec::with_capacity(plan.repeats);
    for _ in 0..plan.repeats.max(1) {
        let run = group.run(shape, pid).await?;
        report_run(kind, what, &run);
        runs.push(run);
    }
    Ok(match shape.pace {
        Pace::Window(_) => Run::median(runs, |r| r.delivered_per_sec),
        Pace::Rate(_) => Run::median(runs, |r| r.latency.p99_us as f64),
    })
}

fn report_run(kind: Kind, what: &str, run: &Run) {
    eprintln!(
        "[loadgen] {}: {what}: {:.0} delivered/s, p99 {:.2} ms, server cpu {:.0}%, lost {}, dup {}",
        kind.label(),
        run.delivered_per_sec,
        run.latency.p99_us as f64 / 1000.0,
        run.server_cpu_percent,
        run.lost,
        run.duplicated
    );
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Starts `kind` on free loopback ports and says how to reach it.
async fn start(kind: Kind, plan: &Plan, paths: &Paths) -> Result<(Server, Target), BenchError> {
    let port = free_port().map_err(io_err("finding a free port"))?;
    let log = paths.work.join(format!("{}.log", kind.label()));
    match kind {
        Kind::Host => {
            let secret = random_hex(32);
            let keys = TokenKeys::new(secret.as_bytes(), Duration::from_secs(3600))?;
            let publisher_token = keys.mint_publisher("loadgen", Duration::from_secs(3600))?;
            let mut command = match paths.host_wrapper.split_first() {
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg(&paths.server_bin);
                    c
                }
                None => Command::new(&paths.server_bin),
            };
            command
                .current_dir(&paths.work)
                .env("LEPTOS_SITE_ADDR", loopback(port).to_string())
                .env("LEPTOS_OUTPUT_NAME", "leptos-realtime")
                .env("LEPTOS_SITE_ROOT", &paths.site_root)
                .env("LEPTOS_ENV", "PROD")
                .env("REALTIME_TOKEN_SECRET", &secret)
                .env("REALTIME_DATA_DIR", paths.work.join("host-data"))
                .env("REALTIME_MAX_CONNS_PER_USER", (plan.fanout + 1).to_string())
                .env("REALTIME_SEND_QUEUE", send_queue(plan).to_string())
                // Per-socket `info` lines would time the logger, not the broker.
                .env("RUST_LOG", "warn");
            let server = Server::start(kind.label(), command, &log, loopback(port)).await?;
            let target = Target {
                kind,
                ws: loopback(port),
                publish: loopback(port),
                host_keys: Some(HostKeys {
                    keys,
                    publisher_token,
                }),
            };
            Ok((server, target))
        }
        Kind::Ceiling => {
            let exe = std::env::current_exe().map_err(io_err("finding the loadgen binary"))?;
            let mut command = Command::new(exe);
            command.args(["serve-ceiling", "--addr", &loopback(port).to_string()]);
            if plan.smoke {
                command.args(["--queue", &SMOKE_QUEUE.to_string()]);
            }
            let server = Server::start(kind.label(), command, &log, loopback(port)).await?;
            Ok((server, Target::unauthenticated(kind, loopback(port))))
        }
        Kind::Nats => {
            let client_port = free_port().map_err(io_err("finding a free port"))?;
            let conf = paths.work.join("nats.conf");
            let text = format!(
                "listen: \"127.0.0.1:{client_port}\"\n\
                 websocket {{\n  host: \"127.0.0.1\"\n  port: {port}\n  no_tls: true\n}}\n"
            );
            fs::write(&conf, text).map_err(io_err(conf.display().to_string()))?;
            let mut command = Command::new(&paths.nats_bin);
            command.arg("-c").arg(&conf);
            let server = Server::start(kind.label(), command, &log, loopback(port)).await?;
            Ok((server, Target::unauthenticated(kind, loopback(port))))
        }
    }
}

/// For the smoke run: every run of every system delivered everything exactly once.
pub fn smoke_checks(all: &[SystemFigures]) -> Vec<(String, Result<(), String>)> {
    let mut checks = Vec::new();
    for s in all {
        for (what, storm) in [("storm", &s.storm), ("fan-out storm", &s.fanout_storm)] {
            let ok = storm.failed == 0 && storm.subscribed == storm.attempted;
            let detail = format!(
                "{} of {} subscribed; {}",
                storm.subscribed,
                storm.attempted,
                storm.first_error.as_deref().unwrap_or("no error")
            );
            checks.push((
                format!("{}: {what}", s.label),
                ok.then_some(()).ok_or(detail),
            ));
        }
        for (what, run) in s.runs() {
            let detail = format!(
                "published {}, lost {}, duplicated {}, wrong offsets {}, disconnected {}, \
                 publish errors {} ({})",
                run.published,
                run.lost,
                run.duplicated,
                run.wrong_offsets,
                run.disconnected,
                run.publish_errors,
                run.first_publish_error.as_deref().unwrap_or("none")
            );
            let ok = run.clean() && run.published > 0;
            checks.push((
                format!("{}: {what}", s.label),
                ok.then_some(()).ok_or(detail),
            ));
        }
    }
    checks
}
