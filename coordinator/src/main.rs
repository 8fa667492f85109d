//! `eqim-coordinator`: the coordinator as its own libtorch-free binary, for head nodes.

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "eqim-coordinator",
    version,
    about = "eqim's job coordinator (membership, scheduling, checkpoints, evaluation); needs no libtorch"
)]
struct Cli {}

fn main() -> Result<()> {
    let _cli = Cli::parse();
    Ok(())
}
