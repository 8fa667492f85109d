//! `eqim train-generator` and `eqim train-tokenizer`: their flags, turned into the options of
//! [`crate::train::setup::run`] and [`crate::tokenizer_train::run`].

use crate::tokenizer_train::TrainTokenizerOptions;
use crate::train::setup::TrainGeneratorOptions;
use anyhow::Result;
use std::path::PathBuf;

/// Command-line options of `eqim train-generator`.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainGeneratorArgs {
    /// Training config (TOML or YAML), e.g. configs/generator-tiny.toml.
    #[arg(long)]
    pub config: PathBuf,
    /// Start from scratch: delete OUTPUT_DIR/checkpoints first (otherwise the newest verified
    /// checkpoint there is resumed).
    #[arg(long)]
    pub fresh: bool,
    /// Stop after this many steps in total (overrides run.max_steps).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Hide the progress bar (log lines only).
    #[arg(long)]
    pub no_progress: bool,
    /// Compute precision of the forward and backward passes, overriding `[model] precision`
    /// (weights, optimizer, EMA, loss and gradient norm stay fp32).
    #[arg(long, value_enum)]
    pub precision: Option<crate::precision::Precision>,
    /// Serve Prometheus `/metrics` here (e.g. `127.0.0.1:9101`), as `eqim worker` does.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl From<TrainGeneratorArgs> for TrainGeneratorOptions {
    fn from(a: TrainGeneratorArgs) -> Self {
        Self {
            config: a.config,
            fresh: a.fresh,
            max_steps: a.max_steps,
            no_progress: a.no_progress,
            precision: a.precision,
            metrics_addr: a.metrics_addr,
        }
    }
}

/// `eqim train-tokenizer` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct TrainTokenizerArgs {
    /// Training config: the reference tokenizer YAML layout plus an `eqim:` section.
    #[arg(long)]
    pub config: PathBuf,
    /// Override `eqim.train.max_steps`.
    #[arg(long)]
    pub max_steps: Option<i64>,
    /// Override `eqim.train.precision` (fp32 or bf16).
    #[arg(long, value_enum)]
    pub precision: Option<crate::precision::Precision>,
}

impl From<TrainTokenizerArgs> for TrainTokenizerOptions {
    fn from(a: TrainTokenizerArgs) -> Self {
        Self {
            config: a.config,
            max_steps: a.max_steps,
            precision: a.precision,
        }
    }
}

/// Runs `eqim train-generator`.
pub fn train_generator(args: TrainGeneratorArgs) -> Result<()> {
    crate::train::setup::run(&args.into())
}

/// Runs `eqim train-tokenizer`.
pub fn train_tokenizer(args: TrainTokenizerArgs) -> Result<()> {
    crate::tokenizer_train::run(&args.into())
}
