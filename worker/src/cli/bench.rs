//! The measuring commands: `eqim plan-memory`, and the hidden benchmarks `eqim bench-step`,
//! `eqim bench-loader` and `eqim bench-allreduce`.

use crate::collective::bench::{BenchBackend, BenchOptions};
use crate::data::bench::BenchLoaderOptions;
use crate::model::generator::GeneratorConfig;
use crate::precision::Precision;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchAllreduceArgs {
    /// Number of local processes (ranks).
    #[arg(long, default_value_t = 2)]
    pub world: usize,
    /// Number of f32 elements per all-reduce.
    #[arg(long, default_value_t = 1_000_000)]
    pub floats: i64,
    /// Timed all-reduces.
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed all-reduces first (connection setup, page faults).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Collective backend: gloo (CPU tensors) or nccl (CUDA tensors; a `--features cuda` build).
    #[arg(long, value_enum, default_value_t = BenchBackend::Gloo)]
    pub backend: BenchBackend,
    /// Where gloo's tensor lives: cpu, or cuda (rank r on device r mod the device count; gloo
    /// stages it through host memory). NCCL always uses cuda.
    #[arg(long, default_value = "cpu")]
    pub gloo_tensor: String,
    /// gloo worker threads per group.
    #[arg(long, default_value_t = crate::collective::DEFAULT_GLOO_THREADS)]
    pub gloo_threads: usize,
    /// Internal: this process is rank N of a benchmark (set by the parent).
    #[arg(long, hide = true)]
    pub rank: Option<usize>,
    /// Internal: port of the parent's TCPStore.
    #[arg(long, hide = true)]
    pub store_port: Option<u16>,
}

impl From<BenchAllreduceArgs> for BenchOptions {
    fn from(a: BenchAllreduceArgs) -> Self {
        Self {
            world: a.world,
            floats: a.floats,
            iters: a.iters,
            warmup: a.warmup,
            backend: a.backend,
            gloo_tensor: a.gloo_tensor,
            gloo_threads: a.gloo_threads,
            rank: a.rank,
            store_port: a.store_port,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct BenchLoaderArgs {
    /// A class-per-folder image tree to read.
    #[arg(long)]
    pub images: PathBuf,
    /// First write this many synthetic 500x375 JPEGs (ImageNet's typical size) into --images,
    /// if it has no images yet.
    #[arg(long, default_value_t = 0)]
    pub generate: usize,
    /// Output side (the reference trains at 256).
    #[arg(long, default_value_t = 256)]
    pub size: u32,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Loader threads for the multi-threaded pass (default: all cores but one).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl From<BenchLoaderArgs> for BenchLoaderOptions {
    fn from(a: BenchLoaderArgs) -> Self {
        Self {
            images: a.images,
            generate: a.generate,
            size: a.size,
            batch: a.batch,
            threads: a.threads,
        }
    }
}

/// `eqim plan-memory`: the model from a training config (TOML/YAML, its `[model]` table and
/// `optim.micro_batch`), a generator JSON, or a preset.
#[derive(clap::Args)]
pub struct PlanMemoryArgs {
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
    let cfg = crate::train::setup::resolve_model(&train.model)?;
    Ok((name, cfg, Some(train.optim.micro_batch())))
}

/// glibc keeps freed heap memory below its (growing) mmap threshold, so without this the peak RSS
/// also counts the allocator's retention (+50 % for the tiny model at micro-batch 256, measured);
/// with it, allocations of 64 KiB and more go to mmap and are returned when freed.
const MEASURE_MALLOC_ENV: (&str, &str) = ("MALLOC_MMAP_THRESHOLD_", "65536");

/// Runs `eqim plan-memory`.
pub fn plan_memory(args: &PlanMemoryArgs) -> Result<()> {
    use crate::plan_memory::{plan, render, PlanRequest};
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
    use crate::bench_step::{rss_bytes, run, BenchStepOptions};
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
pub struct BenchStepArgs {
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

/// Runs `eqim bench-step`.
pub fn bench_step(args: &BenchStepArgs) -> Result<()> {
    let (name, mut model) = if Path::new(&args.model).is_file() {
        let (name, cfg, _) = load_model_config(Path::new(&args.model))?;
        (name, cfg)
    } else {
        (args.model.clone(), GeneratorConfig::preset(&args.model)?)
    };
    model.precision = args.precision;
    let report = crate::bench_step::run(&crate::bench_step::BenchStepOptions {
        model,
        model_name: name,
        batch: args.batch,
        device: crate::device::parse_device(&args.device)?,
        steps: args.steps,
        warmup: args.warmup,
        sample_batch: args.sample_batch,
        sample_steps: args.sample_steps,
        seed: 0,
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Runs `eqim bench-allreduce`.
pub fn bench_allreduce(args: BenchAllreduceArgs) -> Result<()> {
    crate::collective::bench::run(&args.into())
}

/// Runs `eqim bench-loader`.
pub fn bench_loader(args: BenchLoaderArgs) -> Result<()> {
    crate::data::bench::run(&args.into())
}
