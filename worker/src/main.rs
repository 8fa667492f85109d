//! `eqim`: the one command line users meet first.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "eqim",
    version,
    about = "Equivariant Image Modeling: train and sample column-token image generators on elastic clusters",
    long_about = None
)]
// pub(crate): worker/tests/cluster_commands.rs compiles this file to parse the cluster recipes.
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the libtorch version, threads, CUDA availability and where libtorch was found.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Time gloo all-reduce across local processes (a benchmark, see scripts/bench-allreduce).
    #[command(hide = true)]
    BenchAllreduce(eqim_worker::collective::bench::BenchArgs),
    /// Inception statistics (npz: mu, sigma) of a folder of images, for FID.
    FidStats(eqim_worker::eval::FidStatsArgs),
    /// FID of a folder of images against a statistics file (and the IS when the network has logits).
    Fid(eqim_worker::eval::FidArgs),
    /// Sample a fixed, index-addressed image set (PNGs + manifest), identical at any worker count.
    Eval(Box<eqim_worker::eval::run::EvalArgs>),
    /// One worker of an evaluation job: leases batches of image indices from a coordinator
    /// whose config has an `eval:` section (`eqim eval` starts these for you on one machine).
    EvalWorker(Box<eqim_worker::eval::run::EvalWorkerArgs>),
    /// Check the tch models against a reference fixture (PREFIX.json, PREFIX.weights.safetensors,
    /// PREFIX.io.safetensors): prints the max abs error per case, fails above --tol.
    VerifyReference {
        /// Fixture prefix, e.g. ../shared/fixtures/generator_tiny
        prefix: std::path::PathBuf,
        /// Largest allowed max-abs error per case.
        #[arg(long, default_value_t = 1e-4)]
        tol: f64,
    },
    /// Train the generator on one process by the reference recipe (AdamW, warm-up, clipping, EMA),
    /// resuming from OUTPUT_DIR/checkpoint-last when present.
    TrainGenerator(eqim_worker::train::cli::TrainGeneratorArgs),
    /// Sample images: generator tokens, latent scaling, tokenizer decoder, PNGs.
    Sample(Box<eqim_worker::sample_images::SampleArgs>),
    /// Sample latent tokens with a generator checkpoint into a safetensors file.
    SampleTokens(Box<eqim_worker::sample_tokens::SampleTokensArgs>),
    /// Encode a class-per-folder image tree with a tokenizer into a latent cache (both flips).
    CacheLatents(Box<eqim_worker::demo::CacheLatentsArgs>),
    /// Paste real images, samples (one row per class) and panoramas into one PNG.
    ContactSheet(eqim_worker::demo::ContactSheetArgs),
    /// Cut the demo scene dataset out of unpacked Debian wallpaper packages (scripts/fetch-demo-data calls this).
    PrepareDemoData(eqim_worker::data::demo::PrepareDemoDataArgs),
    /// Measure the data loader's images/s (decode + augment) on one core and threaded.
    #[command(hide = true)]
    BenchLoader(eqim_worker::data::bench::BenchLoaderArgs),
    /// Run the job coordinator (membership, step commits, data schedule) on this machine.
    Coordinator(Box<eqim_coordinator::cli::CoordinatorArgs>),
    /// Train a tokenizer (stage 1, or stage 2 decoder fine-tuning) from a YAML config.
    TrainTokenizer(eqim_worker::tokenizer_train::TrainTokenizerArgs),
    /// Encode images into column tokens (one token per 16-px column for the released tokenizer).
    Encode(eqim_worker::tokenizer_cli::EncodeArgs),
    /// Decode a tokens file into PNG images.
    Decode(eqim_worker::tokenizer_cli::DecodeArgs),
    /// Decode an image's first k tokens followed by random ones, k = 0..L, into one image strip.
    ExplainTokens(eqim_worker::tokenizer_cli::ExplainTokensArgs),
    /// Convert a reference PyTorch checkpoint (tokenizer.ckpt, places_large.ckpt) to safetensors.
    ConvertCheckpoint(eqim_worker::convert::ConvertArgs),
    /// Check the tokenizer against a reference parity fixture.
    #[command(hide = true)]
    VerifyTokenizer(eqim_worker::tokenizer_cli::VerifyTokenizerArgs),
    /// Join a job as a worker: connect to the coordinator, train what it assigns.
    Worker(Box<eqim_worker::runtime::agent::WorkerArgs>),
    /// Run a local cluster: a coordinator and N workers on this machine.
    Launch(eqim_worker::runtime::launch_cmd::LaunchArgs),
    /// Print per epoch how many samples a job's committed steps saw once, twice or never.
    Ledger(eqim_worker::runtime::ledger_cmd::LedgerArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Doctor { json } => {
            let r = eqim_worker::doctor::report()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                eqim_worker::doctor::print(&r);
            }
            if !r.smoke_forward_ok {
                anyhow::bail!(
                    "libtorch loaded but a tiny forward pass failed: reinstall with scripts/setup"
                );
            }
        }
        Command::BenchAllreduce(args) => eqim_worker::collective::bench::run(&args)?,
        Command::FidStats(args) => eqim_worker::eval::run_fid_stats(&args)?,
        Command::Fid(args) => eqim_worker::eval::run_fid(&args)?,
        Command::Eval(args) => {
            eqim_worker::eval::run::run_eval(&args)?;
        }
        Command::EvalWorker(args) => eqim_worker::eval::run::run_worker(*args)?,
        Command::VerifyReference { prefix, tol } => {
            eqim_worker::verify::run_cli(&prefix, tol)?;
        }
        Command::TrainGenerator(args) => eqim_worker::train::cli::run(&args)?,
        Command::Sample(args) => {
            eqim_worker::sample_images::run(*args)?;
        }
        Command::SampleTokens(args) => eqim_worker::sample_tokens::run(&args)?,
        Command::CacheLatents(args) => {
            eqim_worker::demo::cache_latents(&args)?;
        }
        Command::ContactSheet(args) => eqim_worker::demo::contact_sheet(&args)?,
        Command::PrepareDemoData(args) => eqim_worker::data::demo::run(&args)?,
        Command::BenchLoader(args) => eqim_worker::data::bench::run(&args)?,
        Command::Coordinator(args) => eqim_coordinator::cli::run(*args)?,
        Command::TrainTokenizer(args) => eqim_worker::tokenizer_train::run(&args)?,
        Command::Encode(args) => eqim_worker::tokenizer_cli::encode(&args)?,
        Command::Decode(args) => {
            eqim_worker::tokenizer_cli::decode(&args)?;
        }
        Command::ExplainTokens(args) => {
            let _strip = eqim_worker::tokenizer_cli::explain_tokens(&args)?;
        }
        Command::ConvertCheckpoint(args) => {
            eprint!("{}", eqim_worker::convert::run(&args)?);
        }
        Command::VerifyTokenizer(args) => eqim_worker::tokenizer_cli::verify_tokenizer(&args)?,
        Command::Worker(args) => eqim_worker::runtime::agent::run(*args)?,
        Command::Launch(args) => eqim_worker::runtime::launch_cmd::run(args)?,
        Command::Ledger(args) => eqim_worker::runtime::ledger_cmd::run(args)?,
    }
    Ok(())
}
