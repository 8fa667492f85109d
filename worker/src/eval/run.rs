//! `eqim eval`: samples a fixed, index-addressed image set (label, noise seed and file name are
//! functions of the index only), decodes and writes PNGs plus a manifest, with local workers
//! pulling index leases from the coordinator's lease table so the set does not depend on how many
//! workers run or which of them die. Optionally scores the set with FID.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use eqim_common::eval_plan::{Completion, EvalPlan, LeaseTable, DEFAULT_EVAL_LEASE_TIMEOUT};
use sha2::{Digest, Sha256};
use tch::{nn, Tensor};

use super::fid::FeatureMoments;
use super::inception::{Inception, INCEPTION_DIM};
use crate::imageio::{save_png, tensor_to_rgb};
use crate::model::generator::{EquivariantGenerativeModel, GeneratorConfig};
use crate::model::tokenizer::Parts;
use crate::model::weights;
use crate::sampling::{sample_cached, seeded_noise, CfgSchedule, SampleSpec};
use crate::tokenizer_cli::{load_tokenizer_parts, LoadedTokenizer, TokenizerArgs};

/// `eqim eval`
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
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
    /// Output folder for `{i:05}.png` and manifest.json.
    #[arg(long)]
    pub out: PathBuf,
    /// Local workers (threads, each with its own models) pulling index leases.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Most indices per lease.
    #[arg(long, default_value_t = 8)]
    pub lease_size: u64,
    /// Seconds a lease lives without progress before it is handed to another worker.
    #[arg(long, default_value_t = DEFAULT_EVAL_LEASE_TIMEOUT.as_secs())]
    pub lease_timeout_s: u64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Reference statistics (npz `mu`, `sigma`): also print the set's FID against them.
    #[arg(long)]
    pub fid_stats: Option<PathBuf>,
    /// Inception file for --fid-stats [default: the one scripts/fetch-inception caches].
    #[arg(long)]
    pub inception: Option<PathBuf>,
    /// Test hook: local worker `W` stops after `N` images without completing its lease
    /// (as if killed), given as `W:N`.
    #[arg(long, hide = true)]
    pub kill_worker_after: Option<String>,
}

/// What every worker needs, read once.
struct EvalJob {
    args: EvalArgs,
    generator_cfg: GeneratorConfig,
    plan: EvalPlan,
    num_iter: i64,
    num_steps: i64,
    device: tch::Device,
}

/// One worker's models.
struct WorkerModels {
    _generator_vs: nn::VarStore,
    generator: EquivariantGenerativeModel,
    tokenizer: LoadedTokenizer,
    /// Present with --fid-stats: features are computed where the images are made, and only
    /// their f64 partial sums travel.
    inception: Option<Inception>,
}

impl EvalJob {
    fn load_models(&self) -> Result<WorkerModels> {
        let mut vs = nn::VarStore::new(self.device);
        let generator = EquivariantGenerativeModel::new(vs.root(), &self.generator_cfg)?;
        weights::load_file_strict(&vs, &self.args.weights)?;
        vs.freeze();
        let tokenizer = load_tokenizer_parts(
            &TokenizerArgs {
                config: self.args.tokenizer_config.clone(),
                checkpoint: Some(self.args.tokenizer_checkpoint.clone()),
                weights: None,
                random_weights: false,
                seed: 0,
                device: self.args.device.clone(),
            },
            Parts::DecoderOnly,
        )?;
        let inception = match &self.args.fid_stats {
            Some(_) => Some(
                super::InceptionArgs {
                    inception: self.args.inception.clone(),
                    batch_size: 1,
                    device: Some(self.args.device.clone()),
                }
                .load()?,
            ),
            None => None,
        };
        Ok(WorkerModels {
            _generator_vs: vs,
            generator,
            tokenizer,
            inception,
        })
    }

    /// Image `index` alone (batch 1), so that its bytes cannot depend on batch neighbours.
    /// Writes the PNG and returns its pixels.
    fn render(&self, models: &WorkerModels, index: u64) -> Result<image::RgbImage> {
        let _guard = tch::no_grad_guard();
        let labels = Tensor::from_slice(&[self.plan.label(index) as i64]);
        let spec = SampleSpec {
            batch: 1,
            labels: Some(&labels),
            prefix: None,
            num_iter: self.num_iter,
            cfg: self.args.cfg,
            cfg_schedule: self.args.cfg_schedule,
            num_steps: self.num_steps,
            temperature: 1.0,
        };
        let channels = self.generator_cfg.vae_embed_dim;
        let mut noise = seeded_noise(self.plan.noise_seed(index), self.num_iter, 1, channels);
        let tokens = sample_cached(&models.generator, &spec, &mut noise, &mut |_| {})?;
        let z = tokens.to_device(models.tokenizer.vs.device()) / self.args.latent_scale;
        let image = models
            .tokenizer
            .model
            .decode(&z)
            .with_context(|| format!("decoding image {index}"))?;
        save_png(
            &image.get(0),
            &self.args.out.join(EvalPlan::file_name(index)),
        )?;
        tensor_to_rgb(&image.get(0))
    }
}

/// One local worker: lease, render, renew, complete, until no work is left.
fn worker_loop(
    job: &EvalJob,
    table: &Mutex<LeaseTable>,
    fid_moments: &Mutex<FeatureMoments>,
    start_line: &Barrier,
    name: &str,
    die_after: Option<u64>,
) -> Result<u64> {
    let models = job.load_models();
    // Start leasing together, so that work spreads over every worker (and a failed load does not
    // leave the others waiting).
    start_line.wait();
    let models = models?;
    let mut rendered = 0u64;
    loop {
        let lease = {
            let mut t = table.lock().expect("lease table lock poisoned");
            if t.is_finished() {
                return Ok(rendered);
            }
            t.grant(Instant::now(), name, job.args.lease_size)
        };
        let Some(lease) = lease else {
            // Everything left is leased to others; one may die and its lease come back.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let mut lease_moments = FeatureMoments::new(INCEPTION_DIM);
        for index in lease.indices.clone() {
            if die_after == Some(rendered) {
                bail!(
                    "injected death after {rendered} images (lease {})",
                    lease.id
                );
            }
            let rgb = job.render(&models, index)?;
            if let Some(net) = &models.inception {
                let (w, h) = rgb.dimensions();
                // [H, W, 3] -> [1, 3, H, W], the bytes the PNG holds
                let pixels = Tensor::from_slice(rgb.as_raw())
                    .view([h as i64, w as i64, 3])
                    .permute([2, 0, 1])
                    .unsqueeze(0);
                let (features, _) = net.forward(&pixels)?;
                lease_moments.add_batch(&features)?;
            }
            rendered += 1;
            let renewed = table
                .lock()
                .expect("lease table lock poisoned")
                .renew(Instant::now(), lease.id);
            if renewed.is_none() {
                tracing::warn!(worker = name, lease = lease.id, "lease lost; dropping it");
                break;
            }
        }
        let outcome = table
            .lock()
            .expect("lease table lock poisoned")
            .complete(Instant::now(), lease.id);
        match outcome {
            // Counted once per index: only accepted completions carry their sums in.
            Completion::Accepted { .. } => fid_moments
                .lock()
                .expect("moments lock poisoned")
                .merge(&lease_moments)?,
            Completion::Stale => {
                tracing::warn!(worker = name, lease = lease.id, "late completion ignored")
            }
        }
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn write_manifest(job: &EvalJob) -> Result<()> {
    let args = &job.args;
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&args.config)
            .with_context(|| format!("reading {}", args.config.display()))?,
    )
    .with_context(|| format!("parsing {}", args.config.display()))?;
    let images: Vec<serde_json::Value> = (0..job.plan.num_images)
        .map(|i| {
            serde_json::json!({
                "index": i,
                "file": EvalPlan::file_name(i),
                "label": job.plan.label(i),
                "noise_seed": job.plan.noise_seed(i),
            })
        })
        .collect();
    let manifest = serde_json::json!({
        "generator_weights": args.weights.display().to_string(),
        "generator_weights_sha256": sha256_file(&args.weights)?,
        "tokenizer_checkpoint": args.tokenizer_checkpoint.display().to_string(),
        "tokenizer_checkpoint_sha256": sha256_file(&args.tokenizer_checkpoint)?,
        "generator_config": config,
        "num_images": job.plan.num_images,
        "class_num": job.plan.class_num,
        "cfg": args.cfg,
        "cfg_schedule": args.cfg_schedule,
        "length": job.num_iter,
        "steps": job.num_steps,
        "base_seed": args.seed,
        "latent_scale": args.latent_scale,
        "noise": "per image: tch manual_seed(noise_seed), then randn(1, vae_embed_dim) per token",
        "images": images,
    });
    let path = args.out.join("manifest.json");
    let tmp = args.out.join(".manifest.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&manifest)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn parse_kill(spec: Option<&str>) -> Result<Option<(usize, u64)>> {
    let Some(spec) = spec else { return Ok(None) };
    let parsed = spec
        .split_once(':')
        .and_then(|(w, n)| Some((w.parse().ok()?, n.parse().ok()?)));
    parsed
        .map(Some)
        .with_context(|| format!("--kill-worker-after {spec}: expected WORKER:IMAGES"))
}

/// What an eval run did.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// Images per second of sampling + decoding (model loading included).
    pub images_per_second: f64,
    /// Workers that died, with the cause; their leases went to the others.
    pub dead_workers: Vec<String>,
    /// FID against --fid-stats, from the workers' merged feature sums.
    pub fid: Option<f64>,
}

/// Runs the whole eval.
pub fn run_eval(args: &EvalArgs) -> Result<EvalReport> {
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading generator config {}", args.config.display()))?;
    let generator_cfg: GeneratorConfig = serde_json::from_str(&text)
        .with_context(|| format!("parsing generator config {}", args.config.display()))?;
    let plan = EvalPlan::new(args.num_images, generator_cfg.class_num as u64, args.seed)?;
    let num_iter = args.length.unwrap_or(generator_cfg.token_num);
    let num_steps = args.steps.unwrap_or(generator_cfg.num_sampling_steps);
    if num_iter <= 0 || num_steps <= 0 || args.workers == 0 || args.lease_size == 0 {
        bail!("--length, --steps, --workers and --lease-size must be positive");
    }
    if !(args.latent_scale.is_finite() && args.latent_scale > 0.0) {
        bail!("--latent-scale must be positive, got {}", args.latent_scale);
    }
    let kill = parse_kill(args.kill_worker_after.as_deref())?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let job = Arc::new(EvalJob {
        args: args.clone(),
        generator_cfg,
        plan,
        num_iter,
        num_steps,
        device: crate::sample_tokens::parse_device(&args.device)?,
    });
    let table = Arc::new(Mutex::new(LeaseTable::new(
        args.num_images,
        Duration::from_secs(args.lease_timeout_s),
    )));
    let start = Instant::now();
    let start_line = Arc::new(Barrier::new(args.workers));
    let fid_moments = Arc::new(Mutex::new(FeatureMoments::new(INCEPTION_DIM)));
    let handles: Vec<_> = (0..args.workers)
        .map(|w| {
            let (job, table, start_line, fid_moments) = (
                Arc::clone(&job),
                Arc::clone(&table),
                Arc::clone(&start_line),
                Arc::clone(&fid_moments),
            );
            let die_after = kill.filter(|(k, _)| *k == w).map(|(_, n)| n);
            std::thread::spawn(move || {
                let name = format!("local-{w}");
                let result = worker_loop(&job, &table, &fid_moments, &start_line, &name, die_after);
                if result.is_err() {
                    // What the coordinator does when a worker's session ends.
                    table
                        .lock()
                        .expect("lease table lock poisoned")
                        .worker_lost(&name);
                }
                (name, result)
            })
        })
        .collect();
    let mut failures = Vec::new();
    for handle in handles {
        let (name, result) = handle
            .join()
            .map_err(|_| anyhow::anyhow!("an eval worker thread panicked"))?;
        match result {
            Ok(n) => tracing::info!(worker = name, images = n, "eval worker done"),
            Err(err) => {
                tracing::warn!(worker = name, cause = %format!("{err:#}"), "eval worker died");
                failures.push(format!("{name}: {err:#}"));
            }
        }
    }
    if !table
        .lock()
        .expect("lease table lock poisoned")
        .is_finished()
    {
        bail!("every eval worker died: {}", failures.join("; "));
    }
    let images_per_second = args.num_images as f64 / start.elapsed().as_secs_f64();
    write_manifest(&job)?;
    println!(
        "wrote {} images to {} ({images_per_second:.2} images/s, {} workers)",
        args.num_images,
        args.out.display(),
        args.workers
    );
    let mut fid = None;
    if let Some(stats) = &args.fid_stats {
        let reference = super::fid::FidStats::read(stats)?;
        let moments = fid_moments.lock().expect("moments lock poisoned").clone();
        anyhow::ensure!(
            moments.count == args.num_images,
            "feature sums cover {} of {} images",
            moments.count,
            args.num_images
        );
        super::warn_if_small(moments.count);
        let distance = super::fid::frechet_distance(&moments.stats()?, &reference)?;
        println!("fid {distance:.4} ({} images)", moments.count);
        fid = Some(distance);
    }
    Ok(EvalReport {
        images_per_second,
        dead_workers: failures,
        fid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        eval: EvalArgs,
    }

    fn fixtures() -> PathBuf {
        crate::verify::tokenizer::fixtures_dir()
    }

    fn eval_into(out: &Path, extra: &[&str]) -> EvalArgs {
        let f = fixtures();
        let mut argv: Vec<String> = vec!["eval".into()];
        for (k, v) in [
            ("--weights", f.join("generator_tiny.weights.safetensors")),
            ("--config", f.join("generator_tiny.json")),
            ("--tokenizer-config", f.join("tokenizer_tiny.json")),
            (
                "--tokenizer-checkpoint",
                f.join("tokenizer_tiny.weights.safetensors"),
            ),
            ("--out", out.to_path_buf()),
        ] {
            argv.push(k.into());
            argv.push(v.display().to_string());
        }
        for a in [
            "--num-images",
            "20",
            "--length",
            "4",
            "--steps",
            "3",
            "--cfg",
            "3.0",
            "--lease-size",
            "3",
        ]
        .iter()
        .chain(extra)
        {
            argv.push(a.to_string());
        }
        Cli::parse_from(argv).eval
    }

    fn read_all(dir: &Path) -> Vec<Vec<u8>> {
        (0..20)
            .map(|i| std::fs::read(dir.join(EvalPlan::file_name(i))).expect("png written"))
            .collect()
    }

    #[test]
    fn png_bytes_do_not_depend_on_workers_or_a_killed_worker() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (one, two, killed) = (
            dir.path().join("one"),
            dir.path().join("two"),
            dir.path().join("killed"),
        );
        run_eval(&eval_into(&one, &["--workers", "1"])).expect("1 worker");
        run_eval(&eval_into(&two, &["--workers", "2"])).expect("2 workers");
        let report = run_eval(&eval_into(
            &killed,
            &["--workers", "3", "--kill-worker-after", "1:1"],
        ))
        .expect("3 workers, one killed");
        assert_eq!(report.dead_workers.len(), 1, "{:?}", report.dead_workers);
        assert!(report.dead_workers[0].contains("injected death after 1 images"));
        let reference = read_all(&one);
        assert_eq!(read_all(&two), reference, "1 vs 2 workers");
        assert_eq!(read_all(&killed), reference, "with a killed worker");
        // Different indices really are different images (noise and labels vary).
        assert_ne!(reference[0], reference[1]);
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(one.join("manifest.json")).expect("manifest"))
                .expect("json");
        assert_eq!(manifest["images"][19]["label"], 9);
        assert_eq!(manifest["images"].as_array().map(Vec::len), Some(20));
    }

    #[test]
    fn fid_from_worker_sums_equals_fid_of_the_written_folder() {
        let inception = crate::eval::inception::default_inception_path();
        if !inception.is_file() {
            eprintln!(
                "skipping: Inception file {} absent (run scripts/fetch-inception)",
                inception.display()
            );
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = dir.path().join("ref.npz");
        // Reference statistics: a fixed random set of 10 feature vectors.
        let mut reference = FeatureMoments::new(INCEPTION_DIM);
        tch::manual_seed(3);
        reference
            .add_batch(&Tensor::rand(
                [10, INCEPTION_DIM as i64],
                tch::kind::FLOAT_CPU,
            ))
            .expect("add");
        reference
            .stats()
            .expect("stats")
            .write(&stats)
            .expect("write");
        let out = dir.path().join("set");
        let stats_arg = stats.display().to_string();
        let mut args = eval_into(
            &out,
            &[
                "--workers",
                "2",
                "--kill-worker-after",
                "0:1",
                "--fid-stats",
                &stats_arg,
            ],
        );
        args.num_images = 10;
        let report = run_eval(&args).expect("eval");
        assert_eq!(report.dead_workers.len(), 1);
        let from_workers = report.fid.expect("fid");
        let net = Inception::load(&inception, tch::Device::Cpu).expect("inception");
        let folder = crate::eval::folder_features(&net, &out, 4).expect("features");
        assert_eq!(folder.moments.count, 10);
        let reference = crate::eval::fid::FidStats::read(&stats).expect("read");
        let from_folder =
            crate::eval::fid::frechet_distance(&folder.moments.stats().expect("s"), &reference)
                .expect("fid");
        assert!(
            (from_workers - from_folder).abs() < 1e-3 * from_folder.abs().max(1.0),
            "{from_workers} vs {from_folder}"
        );
    }

    #[test]
    fn unbalanced_counts_and_bad_kill_specs_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut args = eval_into(dir.path(), &[]);
        args.num_images = 21;
        let err = run_eval(&args).expect_err("21 % 10");
        assert!(
            format!("{err:#}").contains("multiple of the 10 classes"),
            "{err:#}"
        );
        assert!(parse_kill(Some("x")).is_err());
        assert_eq!(parse_kill(Some("1:2")).expect("parse"), Some((1, 2)));
    }
}
