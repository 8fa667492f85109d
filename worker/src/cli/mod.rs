//! The `eqim` command line: the parser ([`Cli`]), its subcommands (one file per command family:
//! [`train`], [`sample`], [`tokenizer`], [`eval`], [`demo`], [`bench`], [`verify`]), logging
//! set-up and dispatch. The clap types live here only; the library modules they call take plain
//! option structs.

pub mod bench;
pub mod cluster;
pub mod demo;
pub mod eval;
pub mod sample;
pub mod tokenizer;
pub mod train;
pub mod verify;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "eqim",
    version,
    about = "Equivariant Image Modeling: train and sample column-token image generators on elastic clusters",
    long_about = None
)]
pub struct Cli {
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
    BenchAllreduce(bench::BenchAllreduceArgs),
    /// Inception statistics (npz: mu, sigma) of a folder of images, for FID.
    FidStats(eval::FidStatsArgs),
    /// FID of a folder of images against a statistics file (and the IS when the network has logits).
    Fid(eval::FidArgs),
    /// Fraction of generated images a nearest-class-mean Inception classifier labels as their class.
    ClassConsistency(eval::ClassConsistencyArgs),
    /// Sample a fixed, index-addressed image set (PNGs + manifest), identical at any worker count.
    Eval(Box<eval::EvalArgs>),
    /// One worker of an evaluation job: leases batches of image indices from a coordinator
    /// whose config has an `eval:` section (`eqim eval` starts these for you on one machine).
    EvalWorker(Box<eval::EvalWorkerArgs>),
    /// Check the tch models against a reference fixture (PREFIX.json, PREFIX.weights.safetensors,
    /// PREFIX.io.safetensors): prints the max abs error per case, fails above --tol.
    VerifyReference(verify::VerifyReferenceArgs),
    /// Memory of a generator training step (weights, gradients, AdamW, EMA, activations) and the
    /// largest micro-batch that fits a device.
    PlanMemory(bench::PlanMemoryArgs),
    /// Time a generator training step and sampling on a device in fp32 or bf16 (scripts/gpu-check).
    #[command(hide = true)]
    BenchStep(bench::BenchStepArgs),
    /// Train the generator on one process by the reference recipe (AdamW, warm-up, clipping, EMA)
    /// as the only rank of the runtime, resuming from OUTPUT_DIR/checkpoints when present.
    TrainGenerator(train::TrainGeneratorArgs),
    /// Sample images: generator tokens, latent scaling, tokenizer decoder, PNGs.
    Sample(Box<sample::SampleArgs>),
    /// Sample latent tokens with a generator checkpoint into a safetensors file.
    SampleTokens(Box<sample::SampleTokensArgs>),
    /// Encode a class-per-folder image tree with a tokenizer into a latent cache (both flips).
    CacheLatents(Box<demo::CacheLatentsArgs>),
    /// Paste real images, samples (one row per class) and panoramas into one PNG.
    ContactSheet(demo::ContactSheetArgs),
    /// Cut the demo scene dataset out of unpacked Debian wallpaper packages (scripts/fetch-demo-data calls this).
    PrepareDemoData(demo::PrepareDemoDataArgs),
    /// Measure the data loader's images/s (decode + augment) on one core and threaded.
    #[command(hide = true)]
    BenchLoader(bench::BenchLoaderArgs),
    /// Run the job coordinator (membership, step commits, data schedule) on this machine.
    /// (Runs the `eqim-coordinator` binary installed next to `eqim`; `eqim coordinator --help`
    /// lists its flags.)
    #[command(disable_help_flag = true)]
    Coordinator {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<std::ffi::OsString>,
    },
    /// Train a tokenizer (stage 1, or stage 2 decoder fine-tuning) from a YAML config.
    TrainTokenizer(train::TrainTokenizerArgs),
    /// Encode images into column tokens (one token per 16-px column for the released tokenizer).
    Encode(tokenizer::EncodeArgs),
    /// Decode a tokens file into PNG images.
    Decode(tokenizer::DecodeArgs),
    /// Decode an image's first k tokens followed by random ones, k = 0..L, into one image strip.
    ExplainTokens(tokenizer::ExplainTokensArgs),
    /// Convert a reference PyTorch checkpoint (tokenizer.ckpt, places_large.ckpt) to safetensors.
    ConvertCheckpoint(tokenizer::ConvertArgs),
    /// Check the tokenizer against a reference parity fixture.
    #[command(hide = true)]
    VerifyTokenizer(tokenizer::VerifyTokenizerArgs),
    /// Join a job as a worker: connect to the coordinator, train what it assigns.
    Worker(Box<cluster::WorkerArgs>),
    /// Run a local cluster: a coordinator and N workers on this machine.
    Launch(cluster::LaunchArgs),
    /// Print per epoch how many samples a job's committed steps saw once, twice or never.
    Ledger(cluster::LedgerArgs),
}

impl Cli {
    /// Runs the parsed command.
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Doctor { json } => verify::doctor(json),
            Command::BenchAllreduce(args) => bench::bench_allreduce(args),
            Command::FidStats(args) => eval::fid_stats(args),
            Command::Fid(args) => eval::fid(args),
            Command::ClassConsistency(args) => eval::class_consistency(args),
            Command::Eval(args) => eval::eval(*args),
            Command::EvalWorker(args) => eval::eval_worker(*args),
            Command::VerifyReference(args) => verify::verify_reference(&args),
            Command::PlanMemory(args) => bench::plan_memory(&args),
            Command::BenchStep(args) => bench::bench_step(&args),
            Command::TrainGenerator(args) => train::train_generator(args),
            Command::Sample(args) => sample::sample(*args),
            Command::SampleTokens(args) => sample::sample_tokens(*args),
            Command::CacheLatents(args) => demo::cache_latents(*args),
            Command::ContactSheet(args) => demo::contact_sheet(args),
            Command::PrepareDemoData(args) => demo::prepare_demo_data(args),
            Command::BenchLoader(args) => bench::bench_loader(args),
            Command::Coordinator { args } => {
                crate::runtime::coordinator_process::exec_coordinator(&args)
            }
            Command::TrainTokenizer(args) => train::train_tokenizer(args),
            Command::Encode(args) => tokenizer::encode(&args),
            Command::Decode(args) => tokenizer::decode(&args).map(drop),
            Command::ExplainTokens(args) => tokenizer::explain_tokens(&args).map(drop),
            Command::ConvertCheckpoint(args) => tokenizer::convert_checkpoint(&args),
            Command::VerifyTokenizer(args) => tokenizer::verify_tokenizer(&args),
            Command::Worker(args) => crate::runtime::agent::run(args.into_config()?),
            Command::Launch(args) => crate::runtime::launch_cmd::run(&args.into()),
            Command::Ledger(args) => cluster::ledger(args),
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a terminal: redirected logs stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The `eqim` binary: logging, parsing, the command.
pub fn main() -> Result<()> {
    init_logging();
    Cli::parse().run()
}
