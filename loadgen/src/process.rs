//! The servers under test as child processes: started on a free loopback port, read through
//! `/proc` for memory and CPU, and killed when dropped, whatever way the run ends.

use std::fs;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("could not start {what}: {source}")]
    Spawn { what: String, source: io::Error },
    #[error("{what} did not listen on {addr} within {secs} s (see {log})")]
    NotListening {
        what: String,
        addr: SocketAddr,
        secs: u64,
        log: String,
    },
    #[error("{what} exited early with {status} (see {log})")]
    Exited {
        what: String,
        status: std::process::ExitStatus,
        log: String,
    },
    #[error("reading /proc for pid {pid}: {source}")]
    Proc { pid: u32, source: io::Error },
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub struct Server {
    pub name: String,
    child: Child,
    log: String,
}

impl Server {
    /// Starts `command` with its output in `log`, and waits until `ready` accepts connections.
    pub async fn start(
        name: &str,
        mut command: Command,
        log: &Path,
        ready: SocketAddr,
    ) -> Result<Self, ProcessError> {
        let spawn_err = |source| ProcessError::Spawn {
            what: name.to_owned(),
            source,
        };
        let out = fs::File::create(log).map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        // SAFETY: the hook runs in the forked child before exec and only makes one syscall.
        // Should the load generator die without cleaning up, its servers go with it.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(spawn_err)?;
        let mut server = Self {
            name: name.to_owned(),
            child,
            log: log.display().to_string(),
        };
        server
            .wait_listening(ready, Duration::from_secs(30))
            .await?;
        Ok(server)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn wait_listening(
        &mut self,
        addr: SocketAddr,
        limit: Duration,
    ) -> Result<(), ProcessError> {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(ProcessError::Exited {
                    what: self.name.clone(),
                    status,
                    log: self.log.clone(),
                });
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(ProcessError::NotListening {
                    what: self.name.clone(),
                    addr,
                    secs: limit.as_secs(),
                    log: self.log.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether it is still running: a server that died mid-run invalidates the run.
    pub fn check_alive(&mut self) -> Result<(), ProcessError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(ProcessError::Exited {
                what: self.name.clone(),
                status,
                log: self.log.clone(),
            }),
            _ => Ok(()),
        }
    }

    pub fn usage(&self) -> Result<Usage, ProcessError> {
        Usage::of(self.pid())
    }
}

/// How long a server gets to exit after SIGTERM (a profiler writes its data then).
const STOP_GRACE: Duration = Duration::from_secs(20);

impl Drop for Server {
    /// Asks politely, then kills.
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: signals only our own child, which has not been reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let asked = Instant::now();
            while asked.elapsed() < STOP_GRACE {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory and CPU time of one process at one moment.
#[derive(Clone, Copy, Debug)]
pub struct Usage {
    pub rss_bytes: u64,
    pub cpu: Duration,
    pub at: Instant,
}

impl Usage {
    pub fn of(pid: u32) -> Result<Self, ProcessError> {
        let proc_err = |source| ProcessError::Proc { pid, source };
        let status = fs::read_to_string(format!("/proc/{pid}/status")).map_err(proc_err)?;
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).map_err(proc_err)?;
        let malformed = || {
            proc_err(io::Error::new(
                io::ErrorKind::InvalidData,
                "unexpected format",
            ))
        };
        Ok(Self {
            rss_bytes: vm_rss(&status).ok_or_else(malformed)?,
            cpu: cpu_time(&stat).ok_or_else(malformed)?,
            at: Instant::now(),
        })
    }

    pub fn own() -> Result<Self, ProcessError> {
        Self::of(std::process::id())
    }

    /// Share of one core used between `earlier` and `self`, in percent.
    pub fn cpu_percent_since(&self, earlier: &Usage) -> f64 {
        let wall = self.at.duration_since(earlier.at).as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        100.0 * self.cpu.saturating_sub(earlier.cpu).as_secs_f64() / wall
    }
}

/// `VmRSS` from `/proc/<pid>/status`, in bytes.
fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `utime + stime` from `/proc/<pid>/stat`. The command name may hold spaces and parentheses,
/// so fields are counted from the last `)`.
fn cpu_time(stat: &str) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the man page, utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf only reads a constant of the running system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    Some(Duration::from_secs_f64((utime + stime) as f64 / ticks))
}

/// Raises this process's open-file limit to its hard limit; children inherit it.
pub fn raise_fd_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: both calls only read or write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        }
    }
    limit.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        let stat = "4242 (my (odd) name) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 100 0 0";
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert_eq!(
            cpu_time(stat).unwrap(),
            Duration::from_secs_f64(300.0 / ticks)
        );
        assert_eq!(
            vm_rss("Name:\tx\nVmRSS:\t  2048 kB\n"),
            Some(2 * 1024 * 1024)
        );
    }

    #[test]
    fn own_usage_is_readable() {
        let u = Usage::own().unwrap();
        assert!(u.rss_bytes > 0);
    }
}
