//! `eqim-hostile`: attacks a running coordinator the way a hostile peer would (issue 21) and
//! prints one `key=value` line per attack: whether the coordinator refused or closed the attacker,
//! how long that took, and whether a legitimate worker could still join (and how fast) and
//! `/metrics` could still be scraped meanwhile. Every attack is bounded in connections and time.
//! `scripts/hostile-clients` runs it against a real `eqim-coordinator` and adds the RSS.

mod attacks;
mod peer;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use eqim_common::client::ClientConfig;
use eqim_common::net::credentials::ClientCredentials;
use eqim_common::proto::WorkerId;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "eqim-hostile",
    about = "hostile-peer attacks against an eqim coordinator (for tests on 127.0.0.1)"
)]
struct Cli {
    /// Coordinator address, HOST:PORT.
    #[arg(long)]
    coordinator: String,
    /// The job's token file (`coordinator-cert.sha256` next to it); attackers that authenticate
    /// use it, the legitimate joiner too.
    #[arg(long)]
    token: PathBuf,
    /// The coordinator's /metrics address, scraped during each attack.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    #[command(subcommand)]
    attack: Attack,
}

#[derive(Subcommand)]
enum Attack {
    /// Unauthenticated connections that never say hello and push data on every stream they
    /// may open.
    Flood {
        #[arg(long, default_value_t = 40)]
        connections: usize,
        #[arg(long, default_value_t = 5_000)]
        duration_ms: u64,
    },
    /// An authenticated peer that heartbeats but leaves a control frame half-sent.
    HalfFrame {
        /// Give up waiting for the coordinator to drop it after this long.
        #[arg(long, default_value_t = 20_000)]
        limit_ms: u64,
    },
    /// A join proof made on one connection, replayed on another.
    Replay,
    /// Frames announcing more than the limit, before and after authentication.
    Oversize,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let creds = ClientCredentials::from_token_file(&cli.token).with_context(|| {
        format!(
            "reading the job credentials next to {}",
            cli.token.display()
        )
    })?;
    let target = attacks::Target {
        cfg: ClientConfig::new(cli.coordinator, creds, WorkerId::from("hostile")),
        metrics: cli.metrics,
    };
    let report = match cli.attack {
        Attack::Flood {
            connections,
            duration_ms,
        } => attacks::flood(&target, connections, Duration::from_millis(duration_ms)).await?,
        Attack::HalfFrame { limit_ms } => {
            attacks::half_frame(&target, Duration::from_millis(limit_ms)).await?
        }
        Attack::Replay => attacks::replay(&target).await?,
        Attack::Oversize => attacks::oversize(&target).await?,
    };
    println!("{report}");
    Ok(())
}
