//! The evaluation commands: `eqim fid-stats`, `eqim fid`, `eqim eval` (a local evaluation)
//! and `eqim eval-worker` (one worker of an evaluation job).

use crate::eval::run::{EvalOptions, EvalPlanOptions, EvalWorkerOptions};
use crate::eval::{FidOptions, FidStatsOptions, InceptionOptions};
use crate::sampling::CfgSchedule;
use anyhow::{Context, Result};
use eqim_common::eval_plan::DEFAULT_EVAL_LEASE_TIMEOUT;
use std::path::PathBuf;
use std::time::Duration;
use tch::Device;

/// Options shared by the FID commands.
#[derive(clap::Args, Debug, Clone)]
pub struct InceptionArgs {
    /// TorchScript Inception file [default: $EQIM_INCEPTION or
    /// ${EQIM_CACHE:-~/.cache/eqim}/inception/fid_inception_v3.pt, from scripts/fetch-inception].
    #[arg(long)]
    pub inception: Option<PathBuf>,
    /// Images per Inception forward.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// `cpu`, `cuda` or `cuda:N` [default: cuda if available].
    #[arg(long)]
    pub device: Option<String>,
    /// Classifier for the Inception Score on top of pool3: an npz with `weight` [C, 2048], e.g.
    /// the 1008-class `fc.weight` of the standard pt_inception weights (`scripts/make-fidelity-fixture
    /// classifier PTH OUT.npz` extracts it). The IS then follows torch-fidelity's protocol.
    #[arg(long)]
    pub inception_classifier: Option<PathBuf>,
}

/// `eqim fid-stats DIR --out stats.npz`
#[derive(clap::Args, Debug, Clone)]
pub struct FidStatsArgs {
    /// Folder of images (png, jpg; read in name order).
    pub dir: PathBuf,
    /// Statistics file to write (npz with `mu` [2048], `sigma` [2048, 2048], float64).
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub inception: InceptionArgs,
}

/// `eqim fid --images DIR --stats stats.npz`
#[derive(clap::Args, Debug, Clone)]
pub struct FidArgs {
    /// Folder of generated images.
    #[arg(long)]
    pub images: PathBuf,
    /// Reference statistics: an npz with `mu`, `sigma` (`eqim fid-stats`, pytorch-fid, ADM's
    /// reference batches) or torch-fidelity's cached `*-inception-v3-compat-stat-fid-2048.pt`.
    #[arg(long)]
    pub stats: PathBuf,
    /// Splits for the Inception Score (only when the Inception file has logits).
    #[arg(long, default_value_t = 10)]
    pub is_splits: usize,
    #[command(flatten)]
    pub inception: InceptionArgs,
}

/// What an image set is: the model, the sampler settings and the index layout. Shared by
/// `eqim eval` and `eqim eval-worker`; every worker of a job must be given the same values.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalPlanArgs {
    /// Generator weights (safetensors with the reference's parameter names).
    #[arg(long)]
    pub weights: PathBuf,
    /// Generator config JSON (the reference constructor's arguments).
    #[arg(long)]
    pub config: PathBuf,
    /// Tokenizer config (reference YAML or fixture JSON) [default: the released tokenizer].
    #[arg(long)]
    pub tokenizer_config: Option<PathBuf>,
    /// Tokenizer weights (safetensors, see `eqim convert-checkpoint`).
    #[arg(long)]
    pub tokenizer_checkpoint: PathBuf,
    /// Images in the set; a multiple of the generator's class_num (balanced labels).
    #[arg(long, default_value_t = 3000)]
    pub num_images: u64,
    /// Guidance scale (1.0 = no guidance).
    #[arg(long, default_value_t = 7.0)]
    pub cfg: f64,
    /// linear (1 -> cfg over the tokens) or constant.
    #[arg(long, default_value = "linear")]
    pub cfg_schedule: CfgSchedule,
    /// Tokens per image (more than the training length gives panoramas) [default: token_num].
    #[arg(long)]
    pub length: Option<i64>,
    /// Euler steps per token [default: the config's num_sampling_steps].
    #[arg(long)]
    pub steps: Option<i64>,
    /// Base seed; image i's noise seed is derived from (seed, i).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Generator latents are tokenizer latents times this (the reference's vae_norm).
    #[arg(long, default_value_t = 0.05493)]
    pub latent_scale: f64,
    /// Images sampled together (cond and uncond in one batch). Batch k is always indices
    /// [k*B, (k+1)*B), whichever worker computes it, so the bytes do not depend on the cluster.
    #[arg(long, default_value_t = 8)]
    pub batch_size: u64,
    /// Output folder for `{i:05}.png` (and, with `eqim eval`, manifest.json).
    #[arg(long)]
    pub out: PathBuf,
    /// cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Inception file for the FID features [default: the one scripts/fetch-inception caches].
    #[arg(long)]
    pub inception: Option<PathBuf>,
}

/// `eqim eval`: the whole evaluation on this machine.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    #[command(flatten)]
    pub plan: EvalPlanArgs,
    /// Eval worker processes on this machine (each with its own models).
    #[arg(long, default_value_t = 1)]
    pub workers: u32,
    /// Intra-op threads per worker. Fixed (not derived from the worker count) so that the
    /// numbers, which on CPU may depend on how work is split over threads, are the same at any
    /// world size.
    #[arg(long, default_value_t = 1)]
    pub threads: i32,
    /// Most images per lease (whole batches).
    #[arg(long, default_value_t = 32)]
    pub lease_images: u64,
    /// Seconds a lease lives without progress before it is handed to another worker.
    #[arg(long, default_value_t = DEFAULT_EVAL_LEASE_TIMEOUT.as_secs())]
    pub lease_timeout_s: u64,
    /// Reference statistics (npz `mu`, `sigma` as `eqim fid-stats` and ADM write them, or
    /// torch-fidelity's cached `*-stat-fid-2048.pt`): workers compute
    /// Inception features and the coordinator prints the set's FID against them.
    #[arg(long)]
    pub fid_stats: Option<PathBuf>,
    /// Also write every image into one npz (`arr_0`, uint8 [N, H, W, 3], as the reference's
    /// and ADM's evaluation suites read it).
    #[arg(long)]
    pub npz: Option<PathBuf>,
    /// A worker silent this long is declared dead and its leases go to the others.
    #[arg(long, default_value_t = 3000)]
    pub heartbeat_timeout_ms: u64,
    /// Serve the coordinator's `/metrics` on 127.0.0.1 at this port and worker i's at port + 1 + i
    /// (the layout of `eqim launch` and configs/prometheus.yml).
    #[arg(long)]
    pub metrics_base_port: Option<u16>,
    /// Test hook: worker `W` kills itself (SIGKILL) after `N` images, mid-lease, given as `W:N`.
    #[arg(long, hide = true)]
    pub kill_worker_after: Option<String>,
}

/// `eqim eval-worker`: one worker of an evaluation job (local or on a cluster).
#[derive(clap::Args, Debug, Clone)]
pub struct EvalWorkerArgs {
    #[command(flatten)]
    pub plan: EvalPlanArgs,
    /// `HOST:PORT` of the coordinator (started with an `eval:` section in its config).
    #[arg(long, value_name = "HOST:PORT")]
    pub coordinator: String,
    /// The job's token file (the coordinator writes it into its job directory).
    #[arg(long, value_name = "FILE")]
    pub token: PathBuf,
    /// SHA-256 of the coordinator's certificate; by default read from `coordinator-cert.sha256`
    /// next to the token file.
    #[arg(long, value_name = "HEX")]
    pub fingerprint: Option<String>,
    /// Name of this worker, unique in the job (default `eval-PID`).
    #[arg(long)]
    pub worker_id: Option<String>,
    /// Give up when the coordinator cannot be reached for this long (seconds).
    #[arg(long, default_value_t = 60.0)]
    pub connect_timeout: f64,
    /// Intra-op threads for libtorch (give every worker of a job the same number).
    #[arg(long, default_value_t = 1)]
    pub threads: i32,
    /// Batches per lease request.
    #[arg(long, default_value_t = 4)]
    pub batches_per_lease: u64,
    /// Serve this worker's Prometheus `/metrics` here.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Test hook: SIGKILL this process after rendering this many images.
    #[arg(long, hide = true)]
    pub die_after_images: Option<u64>,
    /// Test hook: sleep this long after each image (to stretch a tiny job over seconds).
    #[arg(long, hide = true)]
    pub pause_after_each_image_ms: Option<u64>,
}

impl InceptionArgs {
    /// The library's options; no `--device` means CUDA when available.
    pub fn options(self) -> Result<InceptionOptions> {
        let device = match &self.device {
            Some(spec) => crate::device::parse_device(spec)?,
            None => Device::cuda_if_available(),
        };
        Ok(InceptionOptions {
            inception: self.inception,
            batch_size: self.batch_size,
            device,
            inception_classifier: self.inception_classifier,
        })
    }
}

impl EvalPlanArgs {
    /// The library's options, with `--device` parsed.
    pub fn options(self) -> Result<EvalPlanOptions> {
        Ok(EvalPlanOptions {
            weights: self.weights,
            config: self.config,
            tokenizer_config: self.tokenizer_config,
            tokenizer_checkpoint: self.tokenizer_checkpoint,
            num_images: self.num_images,
            cfg: self.cfg,
            cfg_schedule: self.cfg_schedule,
            length: self.length,
            steps: self.steps,
            seed: self.seed,
            latent_scale: self.latent_scale,
            batch_size: self.batch_size,
            out: self.out,
            device: self.device.parse()?,
            inception: self.inception,
        })
    }
}

impl EvalArgs {
    /// The library's options: durations from the `_s`/`_ms` flags, the parsed test hook.
    pub fn options(self) -> Result<EvalOptions> {
        Ok(EvalOptions {
            kill_worker_after: parse_kill(self.kill_worker_after.as_deref())?,
            plan: self.plan.options()?,
            workers: self.workers,
            threads: self.threads,
            lease_images: self.lease_images,
            lease_timeout: Duration::from_secs(self.lease_timeout_s),
            fid_stats: self.fid_stats,
            npz: self.npz,
            heartbeat_timeout: Duration::from_millis(self.heartbeat_timeout_ms),
            metrics_base_port: self.metrics_base_port,
        })
    }
}

impl EvalWorkerArgs {
    /// The library's options, with durations from the seconds and milliseconds flags.
    pub fn options(self) -> Result<EvalWorkerOptions> {
        let connect_timeout = Duration::try_from_secs_f64(self.connect_timeout)
            .with_context(|| format!("--connect-timeout {}", self.connect_timeout))?;
        Ok(EvalWorkerOptions {
            plan: self.plan.options()?,
            coordinator: self.coordinator,
            token: self.token,
            fingerprint: self.fingerprint,
            worker_id: self.worker_id,
            connect_timeout,
            threads: self.threads,
            batches_per_lease: self.batches_per_lease,
            metrics_addr: self.metrics_addr,
            die_after_images: self.die_after_images,
            pause_after_each_image: self.pause_after_each_image_ms.map(Duration::from_millis),
        })
    }
}

/// `--kill-worker-after W:N`.
fn parse_kill(spec: Option<&str>) -> Result<Option<(u32, u64)>> {
    let Some(spec) = spec else { return Ok(None) };
    let parsed = spec
        .split_once(':')
        .and_then(|(w, n)| Some((w.parse().ok()?, n.parse().ok()?)));
    parsed
        .map(Some)
        .with_context(|| format!("--kill-worker-after {spec}: expected WORKER:IMAGES"))
}

/// Runs `eqim fid-stats`.
pub fn fid_stats(args: FidStatsArgs) -> Result<()> {
    crate::eval::run_fid_stats(&FidStatsOptions {
        dir: args.dir,
        out: args.out,
        inception: args.inception.options()?,
    })
}

/// Runs `eqim fid`.
pub fn fid(args: FidArgs) -> Result<()> {
    crate::eval::run_fid(&FidOptions {
        images: args.images,
        stats: args.stats,
        is_splits: args.is_splits,
        inception: args.inception.options()?,
    })
}

/// Runs `eqim eval`.
pub fn eval(args: EvalArgs) -> Result<()> {
    crate::eval::run::run_eval(&args.options()?).map(drop)
}

/// Runs `eqim eval-worker`.
pub fn eval_worker(args: EvalWorkerArgs) -> Result<()> {
    crate::eval::run::run_worker(args.options()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::run::plan_info;
    use clap::Parser;
    use std::ffi::OsString;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        plan: EvalPlanArgs,
    }

    fn plan_args(extra: &[&str]) -> EvalPlanArgs {
        let f = crate::verify::tokenizer::fixtures_dir();
        let mut argv: Vec<String> = vec!["eval".into()];
        for (k, v) in [
            ("--weights", f.join("generator_tiny.weights.safetensors")),
            ("--config", f.join("generator_tiny.json")),
            ("--tokenizer-config", f.join("tokenizer_tiny.json")),
            (
                "--tokenizer-checkpoint",
                f.join("tokenizer_tiny.weights.safetensors"),
            ),
            ("--out", PathBuf::from("/tmp/unused")),
        ] {
            argv.push(k.into());
            argv.push(v.display().to_string());
        }
        argv.extend(extra.iter().map(|s| s.to_string()));
        Cli::parse_from(argv).plan
    }

    #[test]
    fn plan_flags_round_trip_through_the_parser() {
        let args = plan_args(&[
            "--num-images",
            "20",
            "--length",
            "4",
            "--cfg-schedule",
            "constant",
            "--device",
            "cpu",
        ])
        .options()
        .expect("options");
        let mut argv: Vec<OsString> = vec!["eval".into()];
        argv.extend(args.to_flags());
        let again = Cli::parse_from(argv).plan.options().expect("options");
        let (a, b) = (
            plan_info(&args).expect("plan"),
            plan_info(&again).expect("plan"),
        );
        assert_eq!(a, b, "workers get exactly the launcher's plan");
        assert_eq!(a.class_num, 10);
        assert!(plan_args(&["--device", "gpu"]).options().is_err());
    }

    #[test]
    fn the_kill_hook_is_worker_colon_images() {
        assert!(parse_kill(Some("x")).is_err());
        assert_eq!(parse_kill(Some("1:2")).expect("parse"), Some((1, 2)));
        assert_eq!(parse_kill(None).expect("parse"), None);
    }
}

/// `eqim class-consistency`.
#[derive(clap::Args, Debug, Clone)]
pub struct ClassConsistencyArgs {
    /// Class-per-folder tree of real images (e.g. the output of scripts/fetch-demo-data).
    #[arg(long)]
    pub real: PathBuf,
    /// Generated images `{i:05}.png` in the balanced label order of `eqim eval` (image i has
    /// label i / (N / classes)), e.g. `eqim eval --out DIR`.
    #[arg(long)]
    pub samples: PathBuf,
    /// Real images per class that fit the class means (spread over the class's files).
    #[arg(long, default_value_t = 20)]
    pub fit_per_class: usize,
    /// Other real images per class, never used for fitting, that measure the ceiling.
    #[arg(long, default_value_t = 20)]
    pub heldout_per_class: usize,
    #[command(flatten)]
    pub inception: InceptionArgs,
}

/// `eqim class-consistency`: runs it and prints the report's lines.
pub fn class_consistency(args: ClassConsistencyArgs) -> Result<()> {
    let options = crate::eval::class_consistency::ClassConsistencyOptions {
        real: args.real,
        samples: args.samples,
        fit_per_class: args.fit_per_class,
        heldout_per_class: args.heldout_per_class,
        inception: args.inception.options()?,
    };
    for line in crate::eval::class_consistency::run_class_consistency(&options)?.lines() {
        println!("{line}");
    }
    Ok(())
}
