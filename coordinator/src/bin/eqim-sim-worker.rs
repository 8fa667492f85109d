//! `eqim-sim-worker`: a libtorch-free stand-in for a training worker. It joins a coordinator,
//! reports ready on every welcome, "computes" each assigned step by sleeping, votes ok, and
//! leaves on SIGTERM. For exercising the coordinator, `eqim launch` and chaos scripts with real
//! processes before (or without) the training loop.

use anyhow::{Context, Result};
use clap::Parser;
use eqim_common::client::{Client, ClientConfig, HeartbeatStatus};
use eqim_common::net::credentials::ClientCredentials;
use eqim_common::proto::{
    CoordinatorToWorker, Generation, VoteOutcome, WorkerId, WorkerPhase, WorkerToCoordinator,
};
use std::path::PathBuf;
use std::time::Duration;
use tracing::info;

#[derive(Parser)]
#[command(
    name = "eqim-sim-worker",
    about = "a simulated eqim worker (no libtorch)"
)]
struct Cli {
    /// Coordinator address, HOST:PORT.
    #[arg(long)]
    coordinator: String,
    /// The job's token file (`coordinator-cert.sha256` must be next to it).
    #[arg(long)]
    token: PathBuf,
    /// Worker id (default: sim-PID).
    #[arg(long)]
    id: Option<String>,
    /// Simulated compute time per step.
    #[arg(long, default_value_t = 20)]
    step_ms: u64,
    /// How long to keep trying to reach the coordinator.
    #[arg(long, default_value_t = 30_000)]
    connect_patience_ms: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let creds = ClientCredentials::from_token_file(&cli.token)?;
    let id = cli
        .id
        .unwrap_or_else(|| format!("sim-{}", std::process::id()));
    let cfg = ClientConfig::new(cli.coordinator, creds, WorkerId(id.clone()));
    let patience = Duration::from_millis(cli.connect_patience_ms);
    let mut client = Client::connect_with_retry(cfg, patience)
        .await
        .context("joining the coordinator")?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let mut generation = Generation(0);
    loop {
        let msg = tokio::select! {
            msg = client.recv() => msg,
            _ = sigterm.recv() => {
                info!(worker_id = %id, "SIGTERM: leaving");
                client.leave(generation, "SIGTERM").await?;
                return Ok(());
            }
        };
        let Some(msg) = msg else {
            anyhow::bail!(
                "connection to the coordinator ended: {:?}",
                client.close_reason()
            );
        };
        match msg {
            CoordinatorToWorker::Welcome {
                generation: g,
                rank,
                world_size,
                ..
            } => {
                generation = g;
                info!(worker_id = %id, %g, rank, world_size, "welcome");
                client.set_status(HeartbeatStatus {
                    generation,
                    phase: WorkerPhase::Training,
                    step: 0,
                });
                client
                    .send(&WorkerToCoordinator::GroupReady { generation })
                    .await?;
            }
            CoordinatorToWorker::Assign(a) => {
                tokio::time::sleep(Duration::from_millis(cli.step_ms)).await;
                client
                    .send(&WorkerToCoordinator::Vote {
                        generation: a.generation,
                        step: a.step,
                        outcome: VoteOutcome::Ok,
                    })
                    .await?;
            }
            CoordinatorToWorker::Finished { reason } => {
                info!(worker_id = %id, %reason, "finished");
                client.close().await;
                return Ok(());
            }
            other => tracing::debug!(kind = other.kind(), "message"),
        }
    }
}
