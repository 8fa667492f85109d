//! Local clusters: starts a set of child processes (a coordinator and N workers), streams their
//! output with a name prefix, and stops them all together: on Ctrl-C, when a process marked
//! `ends_job` exits, or when any process fails.

use anyhow::{Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// How long children get between SIGTERM and SIGKILL when the cluster stops.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often the supervisor polls its children.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// One process of the local cluster.
#[derive(Debug)]
pub struct ProcessSpec {
    /// Prefix for its log lines, e.g. `coordinator` or `worker-1`.
    pub name: String,
    pub command: Command,
    /// When this process exits successfully the job is over and the others are stopped.
    pub ends_job: bool,
    /// A non-zero exit of this process stops the cluster with an error.
    pub required: bool,
    /// One of the job's workers: when every worker has failed, nothing can make progress any
    /// more and the cluster stops with an error.
    pub worker: bool,
}

/// How a cluster run ended.
#[derive(Debug)]
pub struct ClusterOutcome {
    /// (name, exit status) of every process, in start order.
    pub statuses: Vec<(String, Option<ExitStatus>)>,
    pub interrupted: bool,
}

impl ClusterOutcome {
    pub fn status_of(&self, name: &str) -> Option<ExitStatus> {
        self.statuses
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, s)| *s)
    }
}

struct Running {
    spec_name: String,
    child: Child,
    ends_job: bool,
    required: bool,
    worker: bool,
    status: Option<ExitStatus>,
    pumps: Vec<thread::JoinHandle<()>>,
}

fn pump(
    name: String,
    stream: impl std::io::Read + Send + 'static,
    to_stderr: bool,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let reader = BufReader::new(stream);
        for line in reader.split(b'\n') {
            let Ok(line) = line else { break };
            let text = String::from_utf8_lossy(&line);
            // Progress bars redraw with carriage returns; keep the last frame of such a line.
            let text = text.rsplit('\r').next().unwrap_or_default();
            if to_stderr {
                let mut err = std::io::stderr().lock();
                // Nothing to do if our own stderr is gone.
                let _ignored = writeln!(err, "[{name}] {text}");
            } else {
                let mut out = std::io::stdout().lock();
                let _ignored = writeln!(out, "[{name}] {text}");
            }
        }
    })
}

/// Starts one process with its output piped through prefixed log pumps.
fn start(mut spec: ProcessSpec) -> Result<Running> {
    spec.command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        // Each process leads its own group, so stopping it also stops what it started (a
        // shell's children would otherwise keep the log pipes open).
        .process_group(0);
    let mut child = spec
        .command
        .spawn()
        .with_context(|| format!("starting {} ({:?})", spec.name, spec.command))?;
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        pumps.push(pump(spec.name.clone(), out, false));
    }
    if let Some(err) = child.stderr.take() {
        pumps.push(pump(spec.name.clone(), err, true));
    }
    Ok(Running {
        spec_name: spec.name,
        child,
        ends_job: spec.ends_job,
        required: spec.required,
        worker: spec.worker,
        status: None,
        pumps,
    })
}

/// Reaps the processes that exited; `Some(reason)` once the cluster should stop: the job is
/// done, a required process failed, every worker failed, or nothing is left running.
fn poll(running: &mut [Running]) -> Result<Option<Result<(), String>>> {
    let mut job_done = false;
    let mut failure: Option<String> = None;
    for r in running.iter_mut().filter(|r| r.status.is_none()) {
        if let Some(status) = r
            .child
            .try_wait()
            .with_context(|| format!("waiting for {}", r.spec_name))?
        {
            r.status = Some(status);
            if r.required && !status.success() {
                failure = Some(format!("{} exited with {status}", r.spec_name));
            }
            if r.ends_job && status.success() {
                job_done = true;
            }
        }
    }
    let mut workers = running.iter().filter(|r| r.worker).peekable();
    if !job_done
        && failure.is_none()
        && workers.peek().is_some()
        && workers.all(|r| r.status.is_some_and(|s| !s.success()))
    {
        // (Workers told that the job is over exit 0 while the coordinator finishes up.)
        failure = Some("every worker failed before the job ended (see their logs above)".into());
    }
    Ok(match failure {
        Some(f) => Some(Err(f)),
        None if job_done || running.iter().all(|r| r.status.is_some()) => Some(Ok(())),
        None => None,
    })
}

/// Starts every process and supervises them until the job ends, one fails, or `stop` is set.
pub fn run_cluster(
    specs: Vec<ProcessSpec>,
    stop: Arc<AtomicBool>,
    grace: Duration,
) -> Result<ClusterOutcome> {
    let mut running = Vec::with_capacity(specs.len());
    for spec in specs {
        match start(spec) {
            Ok(r) => running.push(r),
            Err(e) => {
                shutdown(&mut running, grace);
                return Err(e);
            }
        }
    }
    let mut interrupted = false;
    let ended = loop {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break Ok(());
        }
        match poll(&mut running) {
            Ok(Some(ended)) => break ended,
            Ok(None) => thread::sleep(POLL_INTERVAL),
            Err(e) => {
                shutdown(&mut running, grace);
                return Err(e);
            }
        }
    };
    shutdown(&mut running, grace);
    let statuses = running
        .into_iter()
        .map(|r| (r.spec_name, r.status))
        .collect();
    if let Err(f) = ended {
        anyhow::bail!("local cluster stopped: {f}");
    }
    Ok(ClusterOutcome {
        statuses,
        interrupted,
    })
}

/// SIGTERM to every live child, SIGKILL to those still alive after `grace`, then reap them all.
fn shutdown(running: &mut [Running], grace: Duration) {
    for r in running.iter_mut().filter(|r| r.status.is_none()) {
        signal_group(&r.child, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline
        && running
            .iter_mut()
            .any(|r| r.status.is_none() && r.child.try_wait().ok().flatten().is_none())
    {
        thread::sleep(POLL_INTERVAL);
    }
    for r in running.iter_mut() {
        // Past the grace period: whatever is left of the group ignored SIGTERM.
        signal_group(&r.child, Signal::SIGKILL);
        if r.status.is_none() {
            r.status = r.child.wait().ok();
        }
        for p in r.pumps.drain(..) {
            // A pump only ends with its pipe; a panic in it lost log lines, nothing else.
            let _ignored = p.join();
        }
    }
}

fn signal_group(child: &Child, signal: Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // The group may be gone already; ESRCH is fine.
        let _ignored = killpg(Pid::from_raw(pid), signal);
    }
}

/// Sets `stop` when the process receives Ctrl-C (SIGINT) or SIGTERM.
pub fn stop_on_signals() -> Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal-handling runtime")?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::warn!(cause = %e, "cannot listen for SIGTERM");
                            return;
                        }
                    };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                flag.store(true, Ordering::SeqCst);
            })
        })
        .context("spawning the signal thread")?;
    Ok(stop)
}

/// Threads each of `n` local processes should use so that together they fill the machine.
pub fn threads_per_process(n: usize) -> usize {
    let cores = thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    (cores / n.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(name: &str, script: &str, ends_job: bool, required: bool) -> ProcessSpec {
        let mut command = Command::new("sh");
        command.arg("-c").arg(script);
        ProcessSpec {
            name: name.into(),
            command,
            ends_job,
            required,
            worker: name.starts_with("worker"),
        }
    }

    #[test]
    fn cluster_ends_when_the_job_ending_process_exits_and_stops_the_rest() {
        let start = Instant::now();
        let out = run_cluster(
            vec![
                sh("coordinator", "sleep 0.3; echo done", true, true),
                sh("worker-0", "sleep 30", false, false),
            ],
            Arc::new(AtomicBool::new(false)),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the long-running worker was not stopped"
        );
        assert!(out.status_of("coordinator").unwrap().success());
        assert!(
            !out.status_of("worker-0").unwrap().success(),
            "worker should have been terminated"
        );
        assert!(!out.interrupted);
    }

    #[test]
    fn a_failing_required_process_stops_the_cluster_with_an_error() {
        let err = run_cluster(
            vec![
                sh("coordinator", "sleep 30", true, true),
                sh("worker-0", "exit 3", false, true),
            ],
            Arc::new(AtomicBool::new(false)),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(err.to_string().contains("worker-0"), "{err}");
    }

    #[test]
    fn the_cluster_stops_when_every_worker_failed_but_not_when_they_finished() {
        let start = Instant::now();
        let err = run_cluster(
            vec![
                sh("coordinator", "sleep 30", true, true),
                sh("worker-0", "exit 1", false, false),
                sh("worker-1", "sleep 0.2; exit 9", false, false),
            ],
            Arc::new(AtomicBool::new(false)),
            Duration::from_secs(5),
        )
        .unwrap_err();
        assert!(err.to_string().contains("every worker failed"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
        // Workers that finished (exit 0) leave the coordinator to finish up.
        let out = run_cluster(
            vec![
                sh("coordinator", "sleep 0.5; echo done", true, true),
                sh("worker-0", "exit 0", false, false),
                sh("worker-1", "exit 1", false, false),
            ],
            Arc::new(AtomicBool::new(false)),
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(out.status_of("coordinator").unwrap().success());
    }

    #[test]
    fn stop_flag_terminates_everything_and_sigterm_ignorers_are_killed() {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        thread::spawn(move || {
            thread::sleep(Duration::from_millis(200));
            s.store(true, Ordering::SeqCst);
        });
        let start = Instant::now();
        let out = run_cluster(
            vec![
                sh("coordinator", "sleep 30", true, true),
                sh("stubborn", "trap '' TERM; sleep 30", false, false),
            ],
            stop,
            Duration::from_millis(500),
        )
        .unwrap();
        assert!(out.interrupted);
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(out.statuses.len(), 2);
    }

    #[test]
    fn threads_are_divided_among_processes() {
        assert!(threads_per_process(1) >= threads_per_process(2));
        assert_eq!(threads_per_process(10_000), 1);
    }
}
