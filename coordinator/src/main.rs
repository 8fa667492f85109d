//! `eqim-coordinator`: the coordinator as its own libtorch-free binary, for head nodes.

use anyhow::Result;
use clap::Parser;
use eqim_coordinator::cli::CoordinatorArgs;

#[derive(Parser)]
#[command(
    name = "eqim-coordinator",
    version,
    about = "eqim's job coordinator (membership, scheduling, checkpoints, evaluation); needs no libtorch"
)]
// pub(crate): worker/tests/cluster_commands.rs compiles this file to parse the cluster recipes.
pub(crate) struct Cli {
    #[command(flatten)]
    args: CoordinatorArgs,
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
    eqim_coordinator::cli::run(cli.args)
}
