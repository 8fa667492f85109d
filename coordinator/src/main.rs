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
struct Cli {
    #[command(flatten)]
    args: CoordinatorArgs,
    /// Parse the command line and exit without loading the config or starting (the cluster
    /// recipe test, worker/tests/cluster_commands.rs, checks each recipe's command line this way).
    #[arg(long, hide = true)]
    check_args: bool,
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
    if cli.check_args {
        return Ok(());
    }
    eqim_coordinator::cli::run(cli.args)
}
