//! The coordinator as the worker's end-to-end tests meet it: the real `eqim-coordinator` binary
//! (the worker crate does not link the coordinator), started with a config file, watched through
//! its `/metrics` endpoint, and judged by the `outcome.json` it leaves in its job directory.

#![allow(dead_code)] // each test file uses its own part of this harness

use eqim_common::coordinator_config::CoordinatorConfig;
use eqim_common::outcome::JobOutcomeRecord;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the coordinator may take to listen and serve `/metrics`.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one `/metrics` scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// The `eqim-coordinator` binary of this build (`cargo test --workspace` builds it), found the
/// way `eqim` finds it (next to the running executable, or one level up from `deps/`).
pub fn coordinator_binary() -> PathBuf {
    eqim_worker::runtime::coordinator_process::coordinator_binary()
        .unwrap_or_else(|e| panic!("{e:#} (or run the tests with `cargo test --workspace`)"))
}

fn free_tcp_port() -> u16 {
    let s = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

/// What `/metrics` says of a running job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Status {
    pub step: u64,
    pub generation: u64,
    /// Ranks of the current generation.
    pub world_size: u64,
}

/// A running `eqim-coordinator` process.
pub struct CoordinatorProcess {
    child: Option<Child>,
    pub local_addr: SocketAddr,
    pub token_path: PathBuf,
    pub job_dir: PathBuf,
    pub config: CoordinatorConfig,
    metrics_addr: SocketAddr,
    log: PathBuf,
}

impl CoordinatorProcess {
    /// Starts a coordinator for `cfg` (its port 0 replaced by a free one; `/metrics` on a free
    /// loopback port), logging to `<job_dir>.coordinator.log`, and waits until it serves.
    pub fn start(cfg: &CoordinatorConfig) -> Self {
        let mut cfg = cfg.clone();
        if cfg.bind.port() == 0 {
            cfg.bind
                .set_port(eqim_worker::runtime::launch_cmd::free_udp_port().unwrap());
        }
        let metrics_addr: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        cfg.metrics_addr = Some(metrics_addr);
        Self::spawn(cfg, metrics_addr)
    }

    fn spawn(cfg: CoordinatorConfig, metrics_addr: SocketAddr) -> Self {
        std::fs::create_dir_all(&cfg.job_dir).unwrap();
        let config_path = cfg.job_dir.with_extension("coordinator.yaml");
        std::fs::write(&config_path, serde_yaml::to_string(&cfg).unwrap()).unwrap();
        let log = cfg.job_dir.with_extension("coordinator.log");
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(coordinator_binary())
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawning eqim-coordinator");
        let mut me = Self {
            child: Some(child),
            local_addr: cfg.bind,
            token_path: cfg.job_dir.join("token"),
            job_dir: cfg.job_dir.clone(),
            config: cfg,
            metrics_addr,
            log,
        };
        let start = Instant::now();
        while me.scrape().is_none() {
            if let Some(status) = me.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "eqim-coordinator exited at start ({status}):\n{}",
                    me.log_text()
                );
            }
            assert!(
                start.elapsed() < START_TIMEOUT,
                "eqim-coordinator did not serve /metrics within {START_TIMEOUT:?}:\n{}",
                me.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        me
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn scrape(&self) -> Option<String> {
        let mut stream = TcpStream::connect_timeout(&self.metrics_addr, SCRAPE_TIMEOUT).ok()?;
        stream.set_read_timeout(Some(SCRAPE_TIMEOUT)).ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        text.starts_with("HTTP/1.").then_some(text)
    }

    fn value(text: &str, name: &str) -> u64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}")) as u64
    }

    /// The job as `/metrics` shows it now.
    pub fn status(&self) -> Status {
        let text = self.scrape().expect("scraping the coordinator's /metrics");
        Status {
            step: Self::value(&text, eqim_common::metrics::COMMITTED_STEP),
            generation: Self::value(&text, eqim_common::metrics::MEMBERSHIP_GENERATION),
            world_size: Self::value(&text, eqim_common::metrics::MEMBERSHIP_SIZE),
        }
    }

    /// Waits until `done(status)` holds, failing after `timeout` with `what`.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Status) -> bool,
    ) -> Status {
        let start = Instant::now();
        loop {
            let status = self.status();
            if done(&status) {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "{what} not reached within {timeout:?} ({status:?}):\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn wait_for_step(&self, step: u64, timeout: Duration) -> Status {
        self.wait_until(&format!("step {step}"), timeout, |s| s.step >= step)
    }

    /// Waits for the process to exit on its own and returns its `outcome.json`.
    pub fn finish(mut self, timeout: Duration) -> JobOutcomeRecord {
        self.wait_exit(timeout);
        self.outcome()
    }

    /// Interrupts the coordinator (SIGINT, as Ctrl-C) and returns its `outcome.json`.
    pub fn shutdown(mut self) -> JobOutcomeRecord {
        self.interrupt();
        self.outcome()
    }

    /// SIGINT (as Ctrl-C), then waits for the process to exit.
    fn interrupt(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.as_ref().unwrap().id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
        self.wait_exit(START_TIMEOUT);
    }

    /// The same coordinator again, as a new process on the same address (a restart).
    pub fn restart(mut self) -> Self {
        self.interrupt();
        let cfg = self.config.clone();
        Self::spawn(cfg, self.metrics_addr)
    }

    fn wait_exit(&mut self, timeout: Duration) {
        let child = self.child.as_mut().unwrap();
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if start.elapsed() > timeout {
                let _ = child.kill();
                panic!(
                    "eqim-coordinator did not exit within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = None;
    }

    fn outcome(&self) -> JobOutcomeRecord {
        JobOutcomeRecord::read(&self.job_dir)
            .unwrap_or_else(|e| panic!("{e}\ncoordinator log:\n{}", self.log_text()))
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Fails unless the job finished with every sample of every epoch taken exactly once.
pub fn assert_exact_ledger(outcome: &JobOutcomeRecord) {
    assert!(outcome.finished, "job stopped: {}", outcome.stop_reason);
    assert!(outcome.ledger_exact(), "{:?}", outcome.coverage);
}

/// Where a test's files go: `job_dir.with_extension(..)` must stay inside the test's directory.
pub fn job_dir(dir: &Path) -> PathBuf {
    dir.join("job")
}
