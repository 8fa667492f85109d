//! `eqim`: the one command line users meet first.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use eqim_worker::model::generator::GeneratorConfig;
use eqim_worker::precision::Precision;
use std::path::{Path, PathBuf};

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
    /// Fraction of generated images a nearest-class-mean Inception classifier labels as their class.
    ClassConsistency(eqim_worker::eval::class_consistency::ClassConsistencyArgs),
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
        /// Where to run the model: cpu, cuda, cuda:N (the reference outputs were made on the CPU;
        /// on CUDA, cuDNN's TF32 convolutions make the tokenizer's errors larger).
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Memory of a generator training step (weights, gradients, AdamW, EMA, activations) and the
    /// largest micro-batch that fits a device.
    PlanMemory(PlanMemoryArgs),
    /// Time a generator training step and sampling on a device in fp32 or bf16 (scripts/gpu-check).
    #[command(hide = true)]
    BenchStep(BenchStepArgs),
    /// Train the generator on one process by the reference recipe (AdamW, warm-up, clipping, EMA)
    /// as the only rank of the runtime, resuming from OUTPUT_DIR/checkpoints when present.
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
        Command::ClassConsistency(args) => eqim_worker::eval::class_consistency::print(&args)?,
        Command::Eval(args) => {
            eqim_worker::eval::run::run_eval(&args)?;
        }
        Command::EvalWorker(args) => eqim_worker::eval::run::run_worker(*args)?,
        Command::VerifyReference {
            prefix,
            tol,
            device,
        } => {
            let device = eqim_worker::device::parse_device(&device)?;
            eqim_worker::verify::run_cli(&prefix, tol, device)?;
        }
        Command::PlanMemory(args) => plan_memory(&args)?,
        Command::BenchStep(args) => bench_step(&args)?,
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

/// `eqim plan-memory`: the model from a training config (TOML/YAML, its `[model]` table and
/// `optim.micro_batch`), a generator JSON, or a preset.
#[derive(clap::Args)]
struct PlanMemoryArgs {
    /// A train-generator config (e.g. configs/generator-tiny.toml) or a generator JSON.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// A README preset instead of a config: small, base, large or huge.
    #[arg(long)]
    preset: Option<String>,
    /// Samples per forward/backward (default: the config's optim.micro_batch, else 32).
    #[arg(long)]
    batch: Option<u64>,
    /// fp32 or bf16 (default: the model's `precision`).
    #[arg(long, value_enum)]
    precision: Option<Precision>,
    /// Device memory in GiB, for the largest micro-batch that fits.
    #[arg(long)]
    device_memory: Option<f64>,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
    /// Also train N steps on the CPU and report the measured peak RSS above the RSS before the
    /// model was built, next to the plan.
    #[arg(long, value_name = "N")]
    measure: Option<usize>,
}

fn plan_model(args: &PlanMemoryArgs) -> Result<(String, GeneratorConfig, Option<u64>)> {
    match (&args.config, &args.preset) {
        (Some(path), None) => load_model_config(path),
        (None, Some(name)) => Ok((name.clone(), GeneratorConfig::preset(name)?, None)),
        _ => bail!("give --config FILE or --preset small|base|large|huge"),
    }
}

fn load_model_config(path: &Path) -> Result<(String, GeneratorConfig, Option<u64>)> {
    let name = path.display().to_string();
    if path.extension().is_some_and(|e| e == "json") {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {name}"))?;
        let cfg: GeneratorConfig =
            serde_json::from_str(&text).with_context(|| format!("parsing {name}"))?;
        cfg.validate()
            .with_context(|| format!("the generator config {name}"))?;
        return Ok((name, cfg, None));
    }
    let train: eqim_common::train_config::GeneratorTrainConfig =
        eqim_common::config::load_config(path)?;
    let cfg = eqim_worker::train::cli::resolve_model(&train.model)?;
    Ok((name, cfg, Some(train.optim.micro_batch())))
}

/// glibc keeps freed heap memory below its (growing) mmap threshold, so without this the peak RSS
/// also counts the allocator's retention (+50 % for the tiny model at micro-batch 256, measured);
/// with it, allocations of 64 KiB and more go to mmap and are returned when freed.
const MEASURE_MALLOC_ENV: (&str, &str) = ("MALLOC_MMAP_THRESHOLD_", "65536");

fn plan_memory(args: &PlanMemoryArgs) -> Result<()> {
    use eqim_worker::plan_memory::{plan, render, PlanRequest};
    if args.measure.is_some() && std::env::var_os(MEASURE_MALLOC_ENV.0).is_none() {
        // glibc reads the setting at start-up: run the measurement in a fresh process.
        let exe = std::env::current_exe().context("finding the eqim binary to re-run")?;
        let status = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .env(MEASURE_MALLOC_ENV.0, MEASURE_MALLOC_ENV.1)
            .status()
            .context("re-running eqim plan-memory for the measurement")?;
        if !status.success() {
            bail!("the measuring eqim plan-memory failed ({status})");
        }
        return Ok(());
    }
    let (name, mut model, config_batch) = plan_model(args)?;
    if let Some(p) = args.precision {
        model.precision = p;
    }
    let micro_batch = args.batch.or(config_batch).unwrap_or(32);
    if micro_batch == 0 {
        bail!("--batch must be at least 1");
    }
    let device_memory = match args.device_memory {
        Some(g) if g > 0.0 && g.is_finite() => Some((g * (1u64 << 30) as f64) as u64),
        Some(g) => bail!("--device-memory {g}: give a positive number of GiB"),
        None => None,
    };
    let req = PlanRequest {
        precision: model.precision,
        model: model.clone(),
        micro_batch,
        device_memory,
    };
    let p = plan(&req);
    let measured = match args.measure {
        Some(steps) => Some(measure_cpu(&name, &model, micro_batch, steps)?),
        None => None,
    };
    if args.json {
        let mut v = serde_json::to_value(&p)?;
        v["model"] = serde_json::Value::String(name);
        if let Some(m) = measured {
            v["measured_peak_bytes"] = m.into();
            v["measured_over_planned"] = (m as f64 / p.peak_bytes as f64).into();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", render(&name, &p));
        if let Some(m) = measured {
            println!(
                "  measured on the CPU ({}={}): peak RSS above the pre-model RSS {:.1} MiB ({:+.1} % of the plan)",
                MEASURE_MALLOC_ENV.0,
                MEASURE_MALLOC_ENV.1,
                m as f64 / (1u64 << 20) as f64,
                (m as f64 / p.peak_bytes as f64 - 1.0) * 100.0
            );
        }
    }
    Ok(())
}

/// Peak RSS of `steps` training steps on the CPU above the RSS before the model was built (with
/// libtorch and its thread pool already warm).
fn measure_cpu(name: &str, model: &GeneratorConfig, batch: u64, steps: usize) -> Result<u64> {
    use eqim_worker::bench_step::{rss_bytes, run, BenchStepOptions};
    if steps == 0 {
        bail!("--measure needs at least 1 step");
    }
    {
        // Load libtorch's kernels and start its thread pool before the baseline is taken.
        let x = tch::Tensor::randn([64, 64], (tch::Kind::Float, tch::Device::Cpu));
        let _warm = x.matmul(&x).sum(tch::Kind::Float).double_value(&[]);
    }
    let before = rss_bytes()?;
    let report = run(&BenchStepOptions {
        model: model.clone(),
        model_name: name.to_owned(),
        batch: batch as i64,
        device: tch::Device::Cpu,
        steps,
        warmup: 1,
        sample_batch: 0,
        sample_steps: 0,
        seed: 0,
    })?;
    let peak = report
        .peak_rss_bytes
        .context("the CPU benchmark reported no peak RSS")?;
    Ok(peak.saturating_sub(before))
}

/// `eqim bench-step` (hidden).
#[derive(clap::Args)]
struct BenchStepArgs {
    /// A README preset (small, base, large, huge) or a train-generator config / generator JSON.
    #[arg(long, default_value = "base")]
    model: String,
    #[arg(long, default_value_t = 32)]
    batch: i64,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cuda")]
    device: String,
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
    /// Timed steps after --warmup untimed ones.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Images per sampling batch (0: no sampling).
    #[arg(long, default_value_t = 16)]
    sample_batch: i64,
    /// Euler steps per token when sampling.
    #[arg(long, default_value_t = 100)]
    sample_steps: i64,
}

fn bench_step(args: &BenchStepArgs) -> Result<()> {
    let (name, mut model) = if Path::new(&args.model).is_file() {
        let (name, cfg, _) = load_model_config(Path::new(&args.model))?;
        (name, cfg)
    } else {
        (args.model.clone(), GeneratorConfig::preset(&args.model)?)
    };
    model.precision = args.precision;
    let report = eqim_worker::bench_step::run(&eqim_worker::bench_step::BenchStepOptions {
        model,
        model_name: name,
        batch: args.batch,
        device: eqim_worker::device::parse_device(&args.device)?,
        steps: args.steps,
        warmup: args.warmup,
        sample_batch: args.sample_batch,
        sample_steps: args.sample_steps,
        seed: 0,
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
