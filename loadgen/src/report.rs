//! The figures as `results.json` and as a Markdown table: the machine, each system's figures,
//! the host's as ratios to the ceiling and to NATS, and each target met or missed.

use std::fmt::Write as _;
use std::fs;

use crate::bench::{Plan, SystemFigures};
use crate::histogram::Percentiles;
use crate::systems::Kind;
use crate::workload::Run;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub open_files_limit: u64,
    pub nats_server: String,
    /// `/proc/loadavg` when the run began and ended: other work on the same cores.
    pub load_before: String,
    pub load_after: String,
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Machine {
    pub fn describe(open_files_limit: u64, nats_server: String, load_before: String) -> Self {
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or_else(|| "unknown".to_owned(), |(_, m)| m.trim().to_owned());
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_kib: f64 = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0);
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".to_owned(), |k| k.trim().to_owned());
        Self {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory_gib: mem_kib / (1024.0 * 1024.0),
            kernel,
            open_files_limit,
            nats_server,
            load_before,
            load_after: load_average(),
        }
    }
}

/// One target of the issue, met or missed, with the figure that decides it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Goal {
    pub target: &'static str,
    pub measured: String,
    pub met: bool,
    pub why: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub machine: Machine,
    pub plan: Plan,
    pub systems: Vec<SystemFigures>,
    pub goals: Vec<Goal>,
}

fn find(systems: &[SystemFigures], kind: Kind) -> Option<&SystemFigures> {
    systems.iter().find(|s| s.kind == kind)
}

/// Says so when a fixed-rate run did not keep up: then latency is the growing backlog.
fn behind(run: &Run) -> String {
    if run.offered_per_sec > 0.0 && run.delivered_per_sec < 0.98 * run.offered_per_sec {
        format!(
            "; fell behind: {:.0} msg/s offered, {:.0} published, {:.0} delivered, so the \
             backlog grew for the whole run",
            run.offered_per_sec, run.published_per_sec, run.delivered_per_sec
        )
    } else {
        String::new()
    }
}

/// Each repeat's delivery rate, for the record.
fn rates(run: &Run) -> String {
    let each: Vec<String> = run
        .delivered_per_sec_each
        .iter()
        .map(|r| format!("{:.0}", r))
        .collect();
    format!("[{}]", each.join(", "))
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// The targets, judged on the host's figures.
pub fn goals(plan: &Plan, systems: &[SystemFigures]) -> Vec<Goal> {
    let Some(host) = find(systems, Kind::Host) else {
        return Vec::new();
    };
    let mut goals = Vec::new();
    let cpu_note = |r: &Run| {
        format!(
            "server CPU {:.0}% of one core, loadgen {:.0}% (2 cores shared)",
            r.server_cpu_percent, r.loadgen_cpu_percent
        )
    };

    let held = host.storm.subscribed;
    let dropped = host.many_users_max.disconnected + host.many_users_fixed.disconnected;
    goals.push(Goal {
        target: ">= 10,000 concurrent subscribed connections",
        measured: format!("{held} subscribed, {dropped} dropped while publishing"),
        met: held >= 10_000 && dropped == 0,
        why: if plan.users < 10_000 {
            format!("this run opened only {} sockets", plan.users)
        } else {
            host.storm.first_error.clone().unwrap_or_default()
        },
    });

    let per = host.idle.bytes_per_socket;
    goals.push(Goal {
        target: "<= 16 KiB server memory per idle subscribed connection",
        measured: format!("{:.1} KiB", per / 1024.0),
        met: per > 0.0 && per <= 16.0 * 1024.0,
        why: format!(
            "RSS {:.1} MiB before and {:.1} MiB after {} sockets",
            host.idle.rss_before_bytes as f64 / 1048576.0,
            host.idle.rss_after_bytes as f64 / 1048576.0,
            host.idle.sockets
        ),
    });

    let ours = host.many_users_max.delivered_per_sec;
    for (kind, wanted, target) in [
        (
            Kind::Ceiling,
            0.7,
            "many-users throughput >= 0.7x the ceiling",
        ),
        (Kind::Nats, 1.0, "many-users throughput >= 1.0x NATS-WS"),
    ] {
        let Some(peer) = find(systems, kind) else {
            continue;
        };
        let theirs = peer.many_users_max.delivered_per_sec;
        let ratio = ours / theirs.max(1.0);
        goals.push(Goal {
            target,
            measured: format!("{ratio:.2}x ({ours:.0} vs {theirs:.0} msg/s)"),
            met: ratio >= wanted,
            why: format!(
                "server CPU per delivery {:.2} us vs {:.2} us; runs {} vs {}; {}",
                host.many_users_max.server_cpu_us_per_delivery,
                peer.many_users_max.server_cpu_us_per_delivery,
                rates(&host.many_users_max),
                rates(&peer.many_users_max),
                cpu_note(&host.many_users_max)
            ),
        });
    }

    let fixed = &host.many_users_fixed;
    let each: Vec<String> = fixed
        .p99_us_each
        .iter()
        .map(|us| format!("{:.1}", ms(*us)))
        .collect();
    goals.push(Goal {
        target: "p99 <= 20 ms at half the most sustained rate",
        measured: format!(
            "p99 {:.2} ms at {:.0} msg/s",
            ms(fixed.latency.p99_us),
            fixed.published_per_sec
        ),
        met: fixed.latency.count > 0 && fixed.latency.p99_us <= 20_000,
        why: format!(
            "p99 of each run {} ms; {}{}",
            each.join(", "),
            cpu_note(fixed),
            behind(fixed)
        ),
    });

    goals.push(Goal {
        target: ">= 2,000 token-verified handshakes/s",
        measured: format!("{:.0}/s", host.storm.per_sec),
        met: host.storm.per_sec >= 2000.0,
        why: format!(
            "{} handshakes, {} at a time, in {:.2} s",
            host.storm.subscribed, plan.storm_concurrency, host.storm.secs
        ),
    });

    let (lost, dup): (u64, u64) = host
        .runs()
        .iter()
        .fold((0, 0), |(l, d), (_, r)| (l + r.lost, d + r.duplicated));
    goals.push(Goal {
        target: "0 lost and 0 duplicated",
        measured: format!("{lost} lost, {dup} duplicated"),
        met: lost == 0 && dup == 0,
        why: String::new(),
    });
    goals
}

/// A figure of every system in one row; `higher` says which way is better.
struct Row {
    figure: String,
    values: Vec<Option<f64>>,
    unit: &'static str,
    higher_is_better: bool,
}

fn is_count(unit: &str) -> bool {
    unit == "messages"
}

fn rows(systems: &[SystemFigures]) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut add = |figure: String, unit, higher, get: &dyn Fn(&SystemFigures) -> f64| {
        rows.push(Row {
            figure,
            values: systems.iter().map(|s| Some(get(s))).collect(),
            unit,
            higher_is_better: higher,
        });
    };
    let host = &systems[0];
    add(
        format!("connect storm, {} sockets", host.storm.attempted),
        "handshakes/s",
        true,
        &|s| s.storm.per_sec,
    );
    add(
        "idle memory per subscribed socket".into(),
        "KiB (RSS delta / N)",
        false,
        &|s| s.idle.bytes_per_socket / 1024.0,
    );
    add(
        format!("many users ({} channels), flat out", host.storm.attempted),
        "delivered msg/s",
        true,
        &|s| s.many_users_max.delivered_per_sec,
    );
    add("  server CPU".into(), "% of one core", false, &|s| {
        s.many_users_max.server_cpu_percent
    });
    add("  server CPU per delivery".into(), "us", false, &|s| {
        s.many_users_max.server_cpu_us_per_delivery
    });
    let rate = host.many_users_fixed.published_per_sec;
    add(
        format!("many users at {rate:.0} msg/s"),
        "delivered msg/s",
        true,
        &|s| s.many_users_fixed.delivered_per_sec,
    );
    latency_rows(&mut add, &|s| s.many_users_fixed.latency);
    add("  server CPU".into(), "% of one core", false, &|s| {
        s.many_users_fixed.server_cpu_percent
    });
    add(
        format!(
            "fan-out (1 channel, {} sockets), flat out",
            host.fanout_storm.attempted
        ),
        "deliveries/s",
        true,
        &|s| s.fanout_max.delivered_per_sec,
    );
    add("  server CPU per delivery".into(), "us", false, &|s| {
        s.fanout_max.server_cpu_us_per_delivery
    });
    let rate = host.fanout_fixed.published_per_sec;
    add(
        format!("fan-out at {rate:.0} msg/s"),
        "deliveries/s",
        true,
        &|s| s.fanout_fixed.delivered_per_sec,
    );
    latency_rows(&mut add, &|s| s.fanout_fixed.latency);
    add("lost, all runs".into(), "messages", false, &|s| {
        s.runs().iter().map(|(_, r)| r.lost).sum::<u64>() as f64
    });
    add("duplicated, all runs".into(), "messages", false, &|s| {
        s.runs().iter().map(|(_, r)| r.duplicated).sum::<u64>() as f64
    });
    rows
}

type AddRow<'a> = dyn FnMut(String, &'static str, bool, &dyn Fn(&SystemFigures) -> f64) + 'a;

fn latency_rows(add: &mut AddRow<'_>, get: &dyn Fn(&SystemFigures) -> Percentiles) {
    add("  latency p50".into(), "ms", false, &|s| ms(get(s).p50_us));
    add("  latency p99".into(), "ms", false, &|s| ms(get(s).p99_us));
    add("  latency p99.9".into(), "ms", false, &|s| {
        ms(get(s).p999_us)
    });
}

fn number(v: f64) -> String {
    if v >= 1000.0 {
        let whole = v.round() as u64;
        let digits = whole.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn ratio(ours: f64, theirs: f64) -> String {
    if theirs == 0.0 {
        return if ours == 0.0 { "=".into() } else { "-".into() };
    }
    let r = ours / theirs;
    if r >= 0.1 {
        format!("{r:.2}x")
    } else {
        format!("{r:.3}x")
    }
}

pub fn markdown(report: &Report) -> String {
    let m = &report.machine;
    let p = &report.plan;
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmark results\n");
    let _ = writeln!(
        out,
        "Written by `scripts/bench`{}. Every server listened on 127.0.0.1 only, one at a \
         time, with the load generator on the same machine.\n",
        if p.smoke {
            " --smoke (tiny sizes: these figures mean nothing)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "## Machine\n");
    let _ = writeln!(out, "- cores (`nproc`): {}", m.cores);
    let _ = writeln!(out, "- CPU: {}", m.cpu_model);
    let _ = writeln!(out, "- memory: {:.1} GiB", m.memory_gib);
    let _ = writeln!(out, "- kernel: {}", m.kernel);
    let _ = writeln!(out, "- open-files limit: {}", m.open_files_limit);
    let _ = writeln!(out, "- peer: {}", m.nats_server);
    let _ = writeln!(
        out,
        "- load average (1, 5, 15 min) before: {}, after: {}. Other work shared these cores: \
         figures move by tens of percent from one run to the next\n",
        m.load_before, m.load_after
    );

    let _ = writeln!(out, "## Figures\n");
    let names: Vec<&str> = report.systems.iter().map(|s| s.label).collect();
    let has = |k| find(&report.systems, k).is_some();
    let _ = write!(out, "| figure | unit | {} |", names.join(" | "));
    let mut rule = "|---|---|".to_owned() + &"---:|".repeat(names.len());
    if has(Kind::Ceiling) {
        out.push_str(" host / ceiling |");
        rule.push_str("---:|");
    }
    if has(Kind::Nats) {
        out.push_str(" host / NATS |");
        rule.push_str("---:|");
    }
    let _ = writeln!(out, "\n{rule}");
    let ceiling = report.systems.iter().position(|s| s.kind == Kind::Ceiling);
    let nats = report.systems.iter().position(|s| s.kind == Kind::Nats);
    for row in rows(&report.systems) {
        let arrow = if row.higher_is_better { "↑" } else { "↓" };
        let cells: Vec<String> = row
            .values
            .iter()
            .map(|v| match v {
                None => "-".into(),
                Some(v) if is_count(row.unit) => format!("{v:.0}"),
                Some(v) => number(*v),
            })
            .collect();
        let _ = write!(
            out,
            "| {} | {} {arrow} | {} |",
            row.figure,
            row.unit,
            cells.join(" | ")
        );
        let host = row.values[0].unwrap_or(0.0);
        for peer in [ceiling, nats].into_iter().flatten() {
            let _ = write!(out, " {} |", ratio(host, row.values[peer].unwrap_or(0.0)));
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "\n↑: higher is better, ↓: lower is better; a ratio is the host's figure divided by the \
         peer's. Fixed-rate runs drive every system at half the host's own flat-out rate. \
         Latency runs from the publisher stamping a message to the subscriber reading it.\n"
    );

    if !report.goals.is_empty() {
        let _ = writeln!(out, "## Targets\n");
        let _ = writeln!(out, "| target | measured | | why |\n|---|---|---|---|");
        for g in &report.goals {
            let verdict = if g.met { "met" } else { "**missed**" };
            let _ = writeln!(
                out,
                "| {} | {} | {verdict} | {} |",
                g.target, g.measured, g.why
            );
        }
        out.push('\n');
    }

    let _ = writeln!(out, "## How it was run\n");
    let _ = writeln!(
        out,
        "- connect storm: {} sockets, one user each, {} handshakes in flight; a handshake \
         counts when the `subscribed` reply (NATS: the PONG after SUB) arrives",
        p.users, p.storm_concurrency
    );
    let _ = writeln!(
        out,
        "- idle memory: server RSS (`/proc/<pid>/status` VmRSS) before the storm and {:.1} s \
         after it, divided by the sockets",
        p.settle_secs
    );
    let _ = writeln!(
        out,
        "- many users: the storm's sockets, each on its own channel; {} publishers, batches \
         of up to 1000 messages of about 60 bytes of data; flat out keeps a {}",
        p.publishers, report.systems[0].many_users_max.pace
    );
    let _ = writeln!(
        out,
        "- fan-out: {} sockets on one channel, one publisher; flat out keeps a {}",
        p.fanout, report.systems[0].fanout_max.pace
    );
    let _ = writeln!(
        out,
        "- every publishing run: {:.1} s measured after {:.1} s of warm-up, done {} times; the \
         table shows the median run (by rate flat out, by p99 at a fixed rate), and lost and \
         duplicated add up all of them",
        p.measured_secs, p.warmup_secs, p.repeats
    );
    let _ = writeln!(
        out,
        "- lost and duplicated: every message carries its sequence number in its channel; \
         each subscriber checks it (and, on the host, that the envelope's offset equals it)"
    );
    let _ = writeln!(
        out,
        "- server CPU: utime + stime from `/proc/<pid>/stat` over the measured part of a run"
    );
    out
}

pub fn json(report: &Report) -> String {
    serde_json::to_string_pretty(report).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
