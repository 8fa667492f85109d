//! eqim's coordinator: owns the truth of a job (membership, generations, the data cursor and
//! ledger, checkpoints, evaluation leases) and serves the QUIC control plane and `/metrics`.
//! It never links libtorch, so it runs on a CPU head node.
//!
//! [`run`] is the whole coordinator (the `eqim-coordinator` binary); [`Coordinator::start`] gives
//! tests a handle on a running one. The message flow is described in [`net`]; workers use
//! `eqim_common::client`.
#![forbid(unsafe_code)]

pub mod checkpoints;
pub mod cli;
pub mod eval;
pub mod job;
pub mod membership;
pub mod net;
pub mod steps;
pub mod validate;

pub mod jit_checkpoint;
pub mod job_metrics;

use anyhow::{Context, Result};
use eqim_common::config::Validate;
use eqim_common::coordinator_config::CoordinatorConfig;
use eqim_common::net::credentials::JobCredentials;
use eqim_common::net::tls::{server_config, TransportTimeouts};
use job::evaluation::{EvalJobActor, EvalJobArgs};
use job::training::{TrainingJobActor, TrainingJobArgs};
use job::{ControlMsg, JobOutcome, JobStatus, PeerMsg, StopReason};
use net::listener::{accept_loop, Admission};
use ractor::{Actor, DerivedActorRef, RpcReplyPort};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::info;

/// A running coordinator: its QUIC endpoint, accept loop and job actor.
pub struct Coordinator {
    pub local_addr: SocketAddr,
    /// SHA-256 of the certificate workers must pin.
    pub cert_sha256: [u8; 32],
    /// The job's token file (with `coordinator-cert.sha256` next to it).
    pub token_path: PathBuf,
    /// Where `/metrics` is served (the bound port when port 0 was asked for), if it is.
    pub metrics_addr: Option<SocketAddr>,
    /// Kept for the job's lifetime; dropping it stops serving `/metrics`.
    metrics_server: Option<eqim_common::metrics_http::MetricsServer>,
    /// The job actor (training or evaluation), as the handle's status and shutdown see it.
    job: DerivedActorRef<ControlMsg>,
    endpoint: quinn::Endpoint,
    accept: JoinHandle<()>,
    job_handle: JoinHandle<()>,
    done: oneshot::Receiver<JobOutcome>,
}

impl Coordinator {
    /// Validates the config, creates or loads the job's credentials, binds the endpoint and
    /// starts the job actor.
    pub async fn start(cfg: CoordinatorConfig) -> Result<Self> {
        if let Err((key, message)) = cfg.validate() {
            anyhow::bail!("coordinator config: `{key}` {message}");
        }
        let creds = JobCredentials::load_or_create(&cfg.job_dir)
            .with_context(|| format!("preparing job credentials in {}", cfg.job_dir.display()))?;
        let transport = TransportTimeouts {
            keep_alive_interval: cfg.timeouts.heartbeat_interval,
            idle_timeout: cfg.timeouts.quic_idle_timeout,
        };
        let server =
            server_config(&creds, &transport).context("building the QUIC server config")?;
        let endpoint = quinn::Endpoint::server(server, cfg.bind)
            .with_context(|| format!("binding the control plane to {}", cfg.bind))?;
        let local_addr = endpoint.local_addr().context("reading the bound address")?;
        let admission = Arc::new(Admission {
            token: creds.token.clone(),
            cert_sha256: creds.fingerprint,
            handshake_timeout: cfg.timeouts.handshake_timeout,
        });
        let (metrics, metrics_server) = match cfg.metrics_addr {
            Some(addr) => {
                let metrics = eqim_common::metrics_registry::CoordinatorMetrics::new(
                    eqim_common::metrics::DEFAULT_JOB_LABEL,
                )
                .context("creating the coordinator's metrics")?;
                let server =
                    eqim_common::metrics_http::MetricsServer::start(addr, metrics.all.clone())
                        .await
                        .with_context(|| format!("serving /metrics on {addr} (metrics_addr)"))?;
                (Some(metrics), Some(server))
            }
            None => (None, None),
        };
        let metrics_addr = metrics_server.as_ref().map(|s| s.local_addr());
        let (done_tx, done) = oneshot::channel();
        let (job, peers, job_handle) = spawn_job(cfg, done_tx, metrics).await?;
        let accept = tokio::spawn(accept_loop(endpoint.clone(), admission, peers));
        info!(%local_addr, cert_sha256 = %hex::encode(creds.fingerprint), token = %creds.token_path.display(), "coordinator listening");
        Ok(Self {
            local_addr,
            cert_sha256: creds.fingerprint,
            token_path: creds.token_path.clone(),
            metrics_addr,
            metrics_server,
            job,
            endpoint,
            accept,
            job_handle,
            done,
        })
    }

    /// A snapshot of the job.
    pub async fn status(&self) -> Result<JobStatus> {
        let (reply, answer) = oneshot::channel();
        self.job
            .send_message(ControlMsg::Status {
                reply: RpcReplyPort::from(reply),
            })
            .map_err(|_| anyhow::anyhow!("the job actor has stopped"))?;
        match tokio::time::timeout(STATUS_TIMEOUT, answer).await {
            Ok(answer) => answer.context("the job actor stopped before answering"),
            Err(_) => anyhow::bail!("the job actor did not answer within {STATUS_TIMEOUT:?}"),
        }
    }

    /// Waits until the job ends (schedule complete or shut down).
    pub async fn wait(self) -> Result<JobOutcome> {
        let outcome = self
            .done
            .await
            .context("job actor ended without an outcome")?;
        self.accept.abort();
        self.endpoint
            .close(eqim_common::net::close_code::FINISHED.into(), b"job over");
        if let Err(e) = self.job_handle.await {
            tracing::warn!(cause = %e, "job actor task ended abnormally");
        }
        if let Some(server) = self.metrics_server {
            server.shutdown().await;
        }
        Ok(outcome)
    }

    /// Closes every session and stops the job.
    pub async fn shutdown(self, reason: &str) -> Result<JobOutcome> {
        if self
            .job
            .send_message(ControlMsg::Shutdown {
                reason: StopReason::Shutdown(reason.to_owned()),
            })
            .is_err()
        {
            tracing::debug!("job actor already stopped");
        }
        self.wait().await
    }
}

/// How long [`Coordinator::status`] waits for the job actor's answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

type JobRefs = (
    DerivedActorRef<ControlMsg>,
    DerivedActorRef<PeerMsg>,
    JoinHandle<()>,
);

/// Starts the job actor the config asks for: an evaluation job when it has an `eval:` section,
/// otherwise a training job.
async fn spawn_job(
    cfg: CoordinatorConfig,
    done: oneshot::Sender<JobOutcome>,
    metrics: Option<eqim_common::metrics_registry::CoordinatorMetrics>,
) -> Result<JobRefs> {
    let cfg = Arc::new(cfg);
    if let Some(eval) = cfg.eval.clone() {
        let args = EvalJobArgs {
            cfg,
            eval,
            done,
            metrics,
        };
        let (job, handle) = Actor::spawn(None, EvalJobActor, args)
            .await
            .context("starting the evaluation job actor")?;
        return Ok((job.get_derived(), job.get_derived(), handle));
    }
    let args = TrainingJobArgs { cfg, done, metrics };
    let (job, handle) = Actor::spawn(None, TrainingJobActor, args)
        .await
        .context("starting the training job actor")?;
    Ok((job.get_derived(), job.get_derived(), handle))
}

/// Runs a coordinator until its schedule is complete or Ctrl-C.
pub async fn run(cfg: CoordinatorConfig) -> Result<JobOutcome> {
    let coordinator = Coordinator::start(cfg).await?;
    let job = coordinator.job.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok()
            && job
                .send_message(ControlMsg::Shutdown {
                    reason: StopReason::Interrupted,
                })
                .is_err()
        {
            tracing::debug!("job already over at Ctrl-C");
        }
    });
    let outcome = coordinator.wait().await?;
    info!(finished = outcome.finished, reason = %outcome.stop_reason, steps = outcome.cursor.step, aborted = outcome.aborted_steps, "coordinator stopped");
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    /// The coordinator must run on a head node without libtorch: neither it nor eqim-common
    /// may reach tch or torch-sys through any edge (normal, build or dev dependencies).
    #[test]
    fn coordinator_dependency_tree_has_no_libtorch() {
        let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
        for package in ["eqim-common", "eqim-coordinator"] {
            let out = std::process::Command::new(env!("CARGO"))
                .args(["tree", "--manifest-path", manifest, "-p", package])
                .args(["-e", "normal,build,dev", "--prefix", "none", "--offline"])
                .output()
                .expect("running cargo tree");
            assert!(
                out.status.success(),
                "cargo tree -p {package} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let tree = String::from_utf8_lossy(&out.stdout);
            assert!(
                tree.lines().next().is_some_and(|l| l.starts_with(package))
                    && tree.lines().any(|l| l.starts_with("tokio ")),
                "unexpected cargo tree output for {package}:\n{tree}"
            );
            for forbidden in ["torch-sys ", "tch "] {
                assert!(
                    !tree.lines().any(|l| l.starts_with(forbidden)),
                    "{package} depends on {forbidden}:\n{tree}"
                );
            }
        }
    }
}
