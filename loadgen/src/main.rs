//! Load generator for the leptos-realtime host: puts the host, a bare WebSocket ceiling and
//! NATS's WebSocket listener through the same workloads on loopback and writes the figures
//! side by side. `scripts/bench` builds and runs it; `loadgen --help` lists the options.

mod bench;
mod ceiling;
mod histogram;
mod http;
mod nats;
mod process;
mod report;
mod systems;
mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::bench::{Paths, Plan};
use crate::systems::Kind;

const USAGE: &str = "\
usage:
  loadgen bench --server-bin PATH --site-root DIR --out DIR [options]
      --smoke            tiny sizes; check that nothing is lost or duplicated, no timing
      --nats-bin PATH    nats-server to compare with (default: nats-server on PATH)
      --no-nats          leave NATS out
      --users N          sockets in the storm, idle and many-users workloads (default 10000)
      --fanout N         sockets on the fan-out channel (default 1000)
      --secs S           measured seconds of each run (default 6)
      --work DIR         scratch space for logs and configuration (default: OUT/work)
      --host-only        leave the ceiling and NATS out
      --window N         deliveries outstanding in the many-users flat-out run
      --wrap-host CMD    run the host under CMD (split at spaces), e.g. a profiler
  loadgen serve-ceiling --addr 127.0.0.1:PORT [--queue N]
      the bare broadcast server the host is measured against";

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error("{0}\n\n{USAGE}")]
    Usage(String),
    #[error(transparent)]
    Bench(#[from] bench::BenchError),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("ceiling: {0}")]
    Ceiling(std::io::Error),
    #[error("smoke: {0} checks failed")]
    SmokeFailed(usize),
    #[error("stopped by {0}; servers stopped")]
    Stopped(&'static str),
}

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Vec<String>) -> Result<(), CliError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CliError::Ceiling)?;
    match args.first().map(String::as_str) {
        Some("serve-ceiling") => {
            let addr = value_of(&args, "--addr")?
                .ok_or_else(|| CliError::Usage("serve-ceiling needs --addr".into()))?;
            let addr: SocketAddr = addr
                .parse()
                .map_err(|_| CliError::Usage(format!("not an address: {addr}")))?;
            if !addr.ip().is_loopback() {
                return Err(CliError::Usage(
                    "the ceiling listens on loopback only".into(),
                ));
            }
            let queue = number_of(&args, "--queue")?.unwrap_or(ceiling::QUEUE);
            runtime
                .block_on(ceiling::serve(addr, queue))
                .map_err(CliError::Ceiling)
        }
        Some("bench") => runtime.block_on(bench_command(&args)),
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(CliError::Usage(
            "expected `bench` or `serve-ceiling`".into(),
        )),
    }
}

fn value_of(args: &[String], flag: &str) -> Result<Option<String>, CliError> {
    match args.iter().position(|a| a == flag) {
        None => Ok(None),
        Some(i) => args
            .get(i + 1)
            .cloned()
            .map(Some)
            .ok_or_else(|| CliError::Usage(format!("{flag} needs a value"))),
    }
}

fn number_of<T: std::str::FromStr>(args: &[String], flag: &str) -> Result<Option<T>, CliError> {
    value_of(args, flag)?
        .map(|v| {
            v.parse()
                .map_err(|_| CliError::Usage(format!("{flag}: not a number: {v}")))
        })
        .transpose()
}

fn required(args: &[String], flag: &str) -> Result<PathBuf, CliError> {
    value_of(args, flag)?
        .map(PathBuf::from)
        .ok_or_else(|| CliError::Usage(format!("bench needs {flag}")))
}

async fn bench_command(args: &[String]) -> Result<(), CliError> {
    let known = [
        "bench",
        "--smoke",
        "--no-nats",
        "--server-bin",
        "--site-root",
        "--out",
        "--nats-bin",
        "--users",
        "--fanout",
        "--secs",
        "--work",
        "--host-only",
        "--window",
        "--wrap-host",
    ];
    let mut skip_value = false;
    for a in args {
        if skip_value {
            skip_value = false;
            continue;
        }
        if !known.contains(&a.as_str()) {
            return Err(CliError::Usage(format!("unknown argument {a}")));
        }
        skip_value = !matches!(
            a.as_str(),
            "bench" | "--smoke" | "--no-nats" | "--host-only"
        );
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    let mut plan = if smoke { Plan::smoke() } else { Plan::full() };
    if let Some(n) = number_of(args, "--users")? {
        plan.users = n;
    }
    if let Some(n) = number_of(args, "--fanout")? {
        plan.fanout = n;
    }
    if let Some(s) = number_of(args, "--secs")? {
        plan.measured_secs = s;
    }
    if let Some(w) = number_of(args, "--window")? {
        plan.many_users_window = w;
    }
    if plan.users == 0 || plan.fanout == 0 || plan.measured_secs <= 0.0 {
        return Err(CliError::Usage(
            "sizes and durations must be positive".into(),
        ));
    }
    let out = required(args, "--out")?;
    let paths = Paths {
        server_bin: absolute(required(args, "--server-bin")?)?,
        site_root: absolute(required(args, "--site-root")?)?,
        nats_bin: value_of(args, "--nats-bin")?.map_or_else(|| "nats-server".into(), PathBuf::from),
        work: value_of(args, "--work")?.map_or_else(|| out.join("work"), PathBuf::from),
        host_wrapper: value_of(args, "--wrap-host")?
            .map(|w| w.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
    };
    let peers: &[Kind] = if args.iter().any(|a| a == "--host-only") {
        &[]
    } else if args.iter().any(|a| a == "--no-nats") {
        &[Kind::Ceiling]
    } else {
        &[Kind::Ceiling, Kind::Nats]
    };

    let fd_limit = process::raise_fd_limit();
    let load_before = report::load_average();
    let nats_version = std::process::Command::new(&paths.nats_bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "not found".into());
    eprintln!("[loadgen] server logs in {}", paths.work.display());
    // Dropping the run on a signal drops its servers, which stops them.
    let systems = tokio::select! {
        systems = bench::run(&plan, &paths, peers) => systems?,
        signal = stop_requested() => return Err(CliError::Stopped(signal)),
    };
    let report = report::Report {
        machine: report::Machine::describe(fd_limit, nats_version, load_before),
        goals: if smoke {
            Vec::new()
        } else {
            report::goals(&plan, &systems)
        },
        plan,
        systems,
    };
    write(&out.join("results.json"), &report::json(&report))?;
    write(&out.join("results.md"), &report::markdown(&report))?;
    eprintln!(
        "[loadgen] wrote {}/results.md and results.json",
        out.display()
    );

    if smoke {
        let checks = bench::smoke_checks(&report.systems);
        let failed = checks.iter().filter(|(_, r)| r.is_err()).count();
        for (name, result) in &checks {
            match result {
                Ok(()) => println!("ok      {name}"),
                Err(why) => println!("FAILED  {name}: {why}"),
            }
        }
        println!(
            "bench smoke: {} passed, {failed} failed",
            checks.len() - failed
        );
        if failed > 0 {
            return Err(CliError::SmokeFailed(failed));
        }
    } else {
        for g in &report.goals {
            let verdict = if g.met { "met   " } else { "MISSED" };
            println!("{verdict} {}: {}", g.target, g.measured);
        }
    }
    Ok(())
}

/// Servers start in the scratch directory, so relative paths would point elsewhere there.
fn absolute(path: PathBuf) -> Result<PathBuf, CliError> {
    std::path::absolute(&path).map_err(|source| CliError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// Resolves on SIGINT or SIGTERM (`timeout` in scripts/bench sends the latter).
async fn stop_requested() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

fn write(path: &std::path::Path, text: &str) -> Result<(), CliError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| CliError::Write {
            path: dir.display().to_string(),
            source,
        })?;
    }
    std::fs::write(path, text).map_err(|source| CliError::Write {
        path: path.display().to_string(),
        source,
    })
}
