//! `eqim bench-allreduce` (hidden): times gloo (CPU tensors) or NCCL (CUDA tensors, rank r on
//! device r mod the device count) all-reduce of N floats across W local processes over loopback.
//! The parent hosts the TCPStore and re-invokes this binary once per rank.

use super::{GlooDevice, GroupOptions, ProcessGroup, Store};
use anyhow::{bail, ensure, Context, Result};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Rendezvous and collective timeout of the benchmark's group.
const BENCH_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Number of local processes (ranks).
    pub world: usize,
    /// Number of f32 elements per all-reduce.
    pub floats: i64,
    /// Timed all-reduces.
    pub iters: usize,
    /// Untimed all-reduces first (connection setup, page faults).
    pub warmup: usize,
    /// Collective backend: gloo (CPU tensors) or nccl (CUDA tensors; a `--features cuda` build).
    pub backend: BenchBackend,
    /// Where gloo's tensor lives: cpu, or cuda (rank r on device r mod the device count; gloo
    /// stages it through host memory). NCCL always uses cuda.
    pub gloo_tensor: String,
    /// gloo worker threads per group.
    pub gloo_threads: usize,
    /// Internal: this process is rank N of a benchmark (set by the parent).
    pub rank: Option<usize>,
    /// Internal: port of the parent's TCPStore.
    pub store_port: Option<u16>,
}

/// The backend `eqim bench-allreduce` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchBackend {
    Gloo,
    Nccl,
}

impl BenchBackend {
    fn name(self) -> &'static str {
        match self {
            BenchBackend::Gloo => "gloo",
            BenchBackend::Nccl => "nccl",
        }
    }
}

pub fn run(args: &BenchOptions) -> Result<()> {
    ensure!(args.world >= 1, "--world must be at least 1");
    ensure!(args.floats >= 1, "--floats must be at least 1");
    ensure!(args.iters >= 1, "--iters must be at least 1");
    match (args.rank, args.store_port) {
        (Some(rank), Some(port)) => run_rank(args, rank, port),
        (None, None) => run_parent(args),
        _ => bail!("--rank and --store-port are set together, by the parent only"),
    }
}

fn run_parent(args: &BenchOptions) -> Result<()> {
    let store = Store::host("127.0.0.1", 0, BENCH_TIMEOUT).context("hosting the bench store")?;
    let exe = std::env::current_exe().context("finding the eqim binary to re-invoke")?;
    let mut children: Vec<Child> = Vec::new();
    for rank in 0..args.world {
        let child = Command::new(&exe)
            .args(["bench-allreduce", "--world", &args.world.to_string()])
            .args(["--floats", &args.floats.to_string()])
            .args(["--iters", &args.iters.to_string()])
            .args(["--warmup", &args.warmup.to_string()])
            .args(["--gloo-threads", &args.gloo_threads.to_string()])
            .args(["--backend", args.backend.name()])
            .args(["--gloo-tensor", &args.gloo_tensor])
            .args(["--rank", &rank.to_string()])
            .args(["--store-port", &store.port().to_string()])
            .spawn()
            .with_context(|| format!("spawning bench rank {rank}"))?;
        children.push(child);
    }
    let mut failed = Vec::new();
    for (rank, mut child) in children.into_iter().enumerate() {
        let status = child
            .wait()
            .with_context(|| format!("waiting for rank {rank}"))?;
        if !status.success() {
            failed.push(format!("rank {rank}: {status}"));
        }
    }
    ensure!(
        failed.is_empty(),
        "bench ranks failed: {}",
        failed.join(", ")
    );
    Ok(())
}

/// CUDA device `rank` mod the device count.
fn cuda_device_of(rank: usize) -> Result<Device> {
    let devices = tch::Cuda::device_count();
    ensure!(
        devices > 0,
        "a CUDA tensor was asked for, and libtorch sees no CUDA device"
    );
    Ok(Device::Cuda(rank % devices as usize))
}

fn run_rank(args: &BenchOptions, rank: usize, port: u16) -> Result<()> {
    let store = Store::connect("127.0.0.1", port, BENCH_TIMEOUT)?;
    let (options, device) = match args.backend {
        BenchBackend::Gloo => (
            GroupOptions::gloo(rank, args.world, BENCH_TIMEOUT)
                .with_gloo_device(GlooDevice::Hostname("127.0.0.1".into()))
                .with_gloo_threads(args.gloo_threads),
            match args.gloo_tensor.as_str() {
                "cpu" => Device::Cpu,
                "cuda" => cuda_device_of(rank)?,
                other => bail!("--gloo-tensor {other:?}: use cpu or cuda"),
            },
        ),
        BenchBackend::Nccl => (
            GroupOptions::nccl(rank, args.world, BENCH_TIMEOUT),
            cuda_device_of(rank)?,
        ),
    };
    let group = ProcessGroup::with_options(&store, &options)?;
    let mut tensor = Tensor::ones([args.floats], (Kind::Float, device));
    let mut times_ms = Vec::with_capacity(args.iters);
    for i in 0..args.warmup + args.iters {
        let _ = tensor.fill_(1.0); // returns the tensor itself
        group.barrier()?;
        let start = Instant::now();
        group.allreduce_sum(&mut tensor)?;
        if let Device::Cuda(index) = device {
            // NCCL returns once the collective is queued; time it to completion.
            tch::Cuda::synchronize(index as i64);
        }
        let elapsed = start.elapsed();
        if i >= args.warmup {
            times_ms.push(elapsed.as_secs_f64() * 1e3);
        }
    }
    let got = tensor.double_value(&[args.floats - 1]);
    ensure!(
        got == args.world as f64,
        "wrong all-reduce result: {got}, expected {}",
        args.world
    );
    if rank == 0 {
        times_ms.sort_by(f64::total_cmp);
        let median = times_ms[times_ms.len() / 2];
        let mb = args.floats as f64 * 4.0 / 1e6;
        println!(
            "allreduce {} ({device:?} tensors) world={} floats={} ({mb:.1} MB) iters={}: median \
             {median:.2} ms, min {:.2} ms, max {:.2} ms, algbw {:.2} GB/s",
            args.backend.name(),
            args.world,
            args.floats,
            args.iters,
            times_ms[0],
            times_ms[times_ms.len() - 1],
            mb / 1e3 / (median / 1e3),
        );
    }
    group.destroy()?;
    Ok(())
}
