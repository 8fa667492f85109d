//! Distributed evaluation: a fixed, index-addressed image set (label, noise seed, batch and file
//! name are functions of the index only) sampled by `eqim eval-worker` processes that lease
//! whole batches of indices from a coordinator running an evaluation job, so the set does not
//! depend on how many workers run or which of them die. `eqim eval` is the one-machine launcher:
//! a coordinator and N eval workers as child processes, then the optional npz of all images.
//! The coordinator sums the workers' Inception features in f64 and computes the FID.

use std::ffi::OsString;
use std::ops::Range;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use eqim_common::client::{Client, ClientConfig, ClientError, ControlSender};
use eqim_common::device::DeviceSpec;
use eqim_common::eval_plan::EvalPlan;
use eqim_common::proto::{
    CoordinatorToWorker, EvalPlanInfo, LeaseId, Refusal, WorkerId, WorkerToCoordinator,
    WrittenFile, MAX_FEATURE_ROWS_PER_FRAME,
};
use sha2::{Digest, Sha256};
use tch::{nn, Tensor};
use tracing::{info, warn};

use super::inception::{Inception, INCEPTION_DIM};
use crate::imageio::tensor_to_rgb;
use crate::model::generator::{EquivariantGenerativeModel, GeneratorConfig};
use crate::model::tokenizer::Parts;
use crate::model::weights;
use crate::progress::{Activity, Progress};
use crate::sampling::{sample_cached, seeded_noise, CfgSchedule, FixedNoise, SampleSpec};
use crate::tokenizer_io::{load_tokenizer_parts, LoadedTokenizer, TokenizerOptions};

/// Lease renewals are sent on progress, at most this often per lease deadline (a quarter).
const RENEW_FRACTION: u32 = 4;
/// How long an eval worker waits for the coordinator's answer to a lease request: all work
/// may be leased to others, whose leases come back at the latest after the lease timeout.
const LEASE_ANSWER_TIMEOUT: Duration = Duration::from_secs(3600);

/// What an image set is: the model, the sampler settings and the index layout. Shared by
/// `eqim eval` and `eqim eval-worker`; every worker of a job must be given the same values.
#[derive(Debug, Clone)]
pub struct EvalPlanOptions {
    /// Generator weights (safetensors with the reference's parameter names).
    pub weights: PathBuf,
    /// Generator config JSON (the reference constructor's arguments).
    pub config: PathBuf,
    /// Tokenizer config (reference YAML or fixture JSON) [default: the released tokenizer].
    pub tokenizer_config: Option<PathBuf>,
    /// Tokenizer weights (safetensors, see `eqim convert-checkpoint`).
    pub tokenizer_checkpoint: PathBuf,
    /// Images in the set; a multiple of the generator's class_num (balanced labels).
    pub num_images: u64,
    /// Guidance scale (1.0 = no guidance).
    pub cfg: f64,
    /// linear (1 -> cfg over the tokens) or constant.
    pub cfg_schedule: CfgSchedule,
    /// Tokens per image (more than the training length gives panoramas) [default: token_num].
    pub length: Option<i64>,
    /// Euler steps per token [default: the config's num_sampling_steps].
    pub steps: Option<i64>,
    /// Base seed; image i's noise seed is derived from (seed, i).
    pub seed: u64,
    /// Generator latents are tokenizer latents times this (the reference's vae_norm).
    pub latent_scale: f64,
    /// Images sampled together (cond and uncond in one batch). Batch k is always indices
    /// [k*B, (k+1)*B), whichever worker computes it, so the bytes do not depend on the cluster.
    pub batch_size: u64,
    /// Output folder for `{i:05}.png` (and, with `eqim eval`, manifest.json).
    pub out: PathBuf,
    /// Where the models run (also given to every worker).
    pub device: DeviceSpec,
    /// Inception file for the FID features [default: the one scripts/fetch-inception caches].
    pub inception: Option<PathBuf>,
}

impl EvalPlanOptions {
    /// The same values as `eqim eval-worker` flags, for launching workers.
    pub fn to_flags(&self) -> Vec<OsString> {
        let mut flags: Vec<OsString> = Vec::new();
        let mut push = |k: &str, v: OsString| {
            flags.push(k.into());
            flags.push(v);
        };
        push("--weights", self.weights.clone().into());
        push("--config", self.config.clone().into());
        if let Some(p) = &self.tokenizer_config {
            push("--tokenizer-config", p.clone().into());
        }
        push(
            "--tokenizer-checkpoint",
            self.tokenizer_checkpoint.clone().into(),
        );
        push("--num-images", self.num_images.to_string().into());
        push("--cfg", self.cfg.to_string().into());
        push(
            "--cfg-schedule",
            match self.cfg_schedule {
                CfgSchedule::Linear => "linear",
                CfgSchedule::Constant => "constant",
            }
            .into(),
        );
        if let Some(n) = self.length {
            push("--length", n.to_string().into());
        }
        if let Some(n) = self.steps {
            push("--steps", n.to_string().into());
        }
        push("--seed", self.seed.to_string().into());
        push("--latent-scale", self.latent_scale.to_string().into());
        push("--batch-size", self.batch_size.to_string().into());
        push("--out", self.out.clone().into());
        push("--device", self.device.to_string().into());
        if let Some(p) = &self.inception {
            push("--inception", p.clone().into());
        }
        flags
    }
}

/// `eqim eval`: the whole evaluation on this machine.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub plan: EvalPlanOptions,
    /// Eval worker processes on this machine (each with its own models).
    pub workers: u32,
    /// Intra-op threads per worker. Fixed (not derived from the worker count) so that the
    /// numbers, which on CPU may depend on how work is split over threads, are the same at any
    /// world size.
    pub threads: i32,
    /// Most images per lease (whole batches).
    pub lease_images: u64,
    /// How long a lease lives without progress before it is handed to another worker.
    pub lease_timeout: Duration,
    /// Reference statistics (npz `mu`, `sigma` as `eqim fid-stats` and ADM write them, or
    /// torch-fidelity's cached `*-stat-fid-2048.pt`): workers compute
    /// Inception features and the coordinator prints the set's FID against them.
    pub fid_stats: Option<PathBuf>,
    /// Also write every image into one npz (`arr_0`, uint8 [N, H, W, 3], as the reference's
    /// and ADM's evaluation suites read it).
    pub npz: Option<PathBuf>,
    /// A worker silent this long is declared dead and its leases go to the others.
    pub heartbeat_timeout: Duration,
    /// Serve the coordinator's `/metrics` on 127.0.0.1 at this port and worker i's at port + 1 + i
    /// (the layout of `eqim launch` and configs/prometheus.yml).
    pub metrics_base_port: Option<u16>,
    /// Test hook: worker `W` kills itself (SIGKILL) after `N` images, mid-lease, as `(W, N)`.
    pub kill_worker_after: Option<(u32, u64)>,
}

/// `eqim eval-worker`: one worker of an evaluation job (local or on a cluster).
#[derive(Debug, Clone)]
pub struct EvalWorkerOptions {
    pub plan: EvalPlanOptions,
    /// `HOST:PORT` of the coordinator (started with an `eval:` section in its config).
    pub coordinator: String,
    /// The job's token file (the coordinator writes it into its job directory).
    pub token: PathBuf,
    /// SHA-256 of the coordinator's certificate; by default read from `coordinator-cert.sha256`
    /// next to the token file.
    pub fingerprint: Option<String>,
    /// Name of this worker, unique in the job (default `eval-PID`).
    pub worker_id: Option<String>,
    /// Give up when the coordinator cannot be reached for this long.
    pub connect_timeout: Duration,
    /// Intra-op threads for libtorch (give every worker of a job the same number).
    pub threads: i32,
    /// Batches per lease request.
    pub batches_per_lease: u64,
    /// Serve this worker's Prometheus `/metrics` here.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Test hook: SIGKILL this process after rendering this many images.
    pub die_after_images: Option<u64>,
    /// Test hook: sleep this long after each image (to stretch a tiny job over seconds).
    pub pause_after_each_image: Option<Duration>,
}

/// The set's layout and sampler settings, resolved from the arguments and the model config.
struct Plan {
    args: EvalPlanOptions,
    generator_cfg: GeneratorConfig,
    layout: EvalPlan,
    num_iter: i64,
    num_steps: i64,
    device: tch::Device,
    info: EvalPlanInfo,
}

impl Plan {
    fn resolve(args: &EvalPlanOptions) -> Result<Self> {
        let text = std::fs::read_to_string(&args.config)
            .with_context(|| format!("reading generator config {}", args.config.display()))?;
        let generator_cfg: GeneratorConfig = serde_json::from_str(&text)
            .with_context(|| format!("parsing generator config {}", args.config.display()))?;
        let layout = EvalPlan::new(args.num_images, generator_cfg.class_num as u64, args.seed)?;
        let num_iter = args.length.unwrap_or(generator_cfg.token_num);
        let num_steps = args.steps.unwrap_or(generator_cfg.num_sampling_steps);
        if num_iter <= 0 || num_steps <= 0 || args.batch_size == 0 {
            bail!("--length, --steps and --batch-size must be positive");
        }
        if !(args.latent_scale.is_finite() && args.latent_scale > 0.0) {
            bail!("--latent-scale must be positive, got {}", args.latent_scale);
        }
        let device = crate::device::device_of(args.device);
        // Everything that changes the pixels, by content (paths differ between machines).
        let settings = serde_json::json!({
            "generator_weights_sha256": eqim_common::files::sha256_hex(&args.weights)?,
            "tokenizer_checkpoint_sha256": eqim_common::files::sha256_hex(&args.tokenizer_checkpoint)?,
            "generator_config": serde_json::from_str::<serde_json::Value>(&text)?,
            "cfg": args.cfg,
            "cfg_schedule": args.cfg_schedule,
            "length": num_iter,
            "steps": num_steps,
            "latent_scale": args.latent_scale,
            "device_kind": if device.is_cuda() { "cuda" } else { "cpu" },
        });
        let info = EvalPlanInfo {
            num_images: args.num_images,
            class_num: generator_cfg.class_num as u64,
            base_seed: args.seed,
            batch_size: args.batch_size,
            settings_json: settings.to_string(),
        };
        Ok(Self {
            args: args.clone(),
            generator_cfg,
            layout,
            num_iter,
            num_steps,
            device,
            info,
        })
    }
}

/// One worker's models.
struct Models {
    _generator_vs: nn::VarStore,
    generator: EquivariantGenerativeModel,
    tokenizer: LoadedTokenizer,
    /// Loaded at the first lease that asks for features.
    inception: Option<Inception>,
}

impl Models {
    fn load(plan: &Plan) -> Result<Self> {
        let args = &plan.args;
        let mut vs = nn::VarStore::new(plan.device);
        let generator = EquivariantGenerativeModel::new(vs.root(), &plan.generator_cfg)?;
        weights::load_file_strict(&vs, &args.weights)?;
        vs.freeze();
        let tokenizer = load_tokenizer_parts(
            &TokenizerOptions {
                config: args.tokenizer_config.clone(),
                checkpoint: Some(args.tokenizer_checkpoint.clone()),
                weights: None,
                random_weights: false,
                seed: 0,
                device: plan.device,
            },
            Parts::DecoderOnly,
        )?;
        Ok(Self {
            _generator_vs: vs,
            generator,
            tokenizer,
            inception: None,
        })
    }

    fn inception(&mut self, plan: &Plan) -> Result<&Inception> {
        if self.inception.is_none() {
            let net = super::InceptionOptions {
                inception: plan.args.inception.clone(),
                batch_size: 1,
                device: plan.device,
                inception_classifier: None,
            }
            .load()?;
            self.inception = Some(net);
        }
        Ok(self.inception.as_ref().expect("loaded above"))
    }
}

/// Samples and decodes the images `indices` (one batch, fixed by the plan) and returns their
/// pixels. `on_token` is called after every generated token (progress, lease renewal).
fn render_batch(
    plan: &Plan,
    models: &Models,
    indices: Range<u64>,
    on_token: &mut dyn FnMut(i64),
) -> Result<Vec<image::RgbImage>> {
    let _guard = tch::no_grad_guard();
    let batch = (indices.end - indices.start) as i64;
    let labels: Vec<i64> = indices
        .clone()
        .map(|i| plan.layout.label(i) as i64)
        .collect();
    let labels = Tensor::from_slice(&labels);
    let spec = SampleSpec {
        batch,
        labels: Some(&labels),
        prefix: None,
        num_iter: plan.num_iter,
        cfg: plan.args.cfg,
        cfg_schedule: plan.args.cfg_schedule,
        num_steps: plan.num_steps,
        temperature: 1.0,
    };
    let channels = plan.generator_cfg.vae_embed_dim;
    // Each image's noise comes from its own seed: [tokens, 1, C] per image, side by side.
    let per_image: Vec<Tensor> = indices
        .clone()
        .map(|i| seeded_noise(plan.layout.noise_seed(i), plan.num_iter, 1, channels).into_tensor())
        .collect();
    let mut noise = FixedNoise::new(Tensor::cat(&per_image, 1));
    let tokens = sample_cached(&models.generator, &spec, &mut noise, on_token)?;
    let z = tokens.to_device(models.tokenizer.vs.device()) / plan.args.latent_scale;
    let images = models
        .tokenizer
        .model
        .decode(&z)
        .with_context(|| format!("decoding images {indices:?}"))?;
    (0..batch).map(|k| tensor_to_rgb(&images.get(k))).collect()
}

/// Writes a PNG atomically (temp file, fsync, rename) and describes it for the coordinator.
fn write_png(image: &image::RgbImage, dir: &Path, index: u64) -> Result<WrittenFile> {
    let name = EvalPlan::file_name(index);
    let path = dir.join(&name);
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .with_context(|| format!("encoding {}", path.display()))?;
    eqim_common::files::write_atomic(&path, &bytes)?;
    Ok(WrittenFile {
        path: name,
        bytes: bytes.len() as u64,
        sha256: Sha256::digest(&bytes).into(),
    })
}

/// Inception features of a batch of same-sized images, [n, 2048] row-major.
fn features_of(net: &Inception, images: &[image::RgbImage]) -> Result<Vec<f32>> {
    let pixels: Vec<Tensor> = images
        .iter()
        .map(|rgb| {
            let (w, h) = rgb.dimensions();
            // [H, W, 3] -> [3, H, W]: the bytes the PNG holds
            Tensor::from_slice(rgb.as_raw())
                .view([h as i64, w as i64, 3])
                .permute([2, 0, 1])
        })
        .collect();
    let (features, _) = net.forward(&Tensor::stack(&pixels, 0))?;
    Ok(Vec::<f32>::try_from(
        features
            .to_device(tch::Device::Cpu)
            .to_kind(tch::Kind::Float)
            .flatten(0, -1),
    )?)
}

/// Sends a control message from this (non-async) thread.
fn send(
    rt: &tokio::runtime::Runtime,
    sender: &ControlSender,
    msg: WorkerToCoordinator,
) -> Result<()> {
    let kind = msg.kind();
    rt.block_on(sender.send(&msg))
        .map_err(|e| CoordinatorLost(format!("sending {kind}: {e}")).into())
}

/// Reads the job's credentials, waiting up to `timeout` for a coordinator that is still
/// starting to write them.
fn load_credentials(
    args: &EvalWorkerOptions,
    timeout: Duration,
) -> Result<eqim_common::net::credentials::ClientCredentials> {
    let deadline = Instant::now() + timeout;
    loop {
        match crate::runtime::agent::credentials_from(&args.token, args.fingerprint.as_deref()) {
            Ok(credentials) => return Ok(credentials),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(e),
        }
    }
}

/// Runs one eval worker until the coordinator says the set is done.
pub fn run_worker(args: EvalWorkerOptions) -> Result<()> {
    tch::set_num_threads(args.threads.max(1));
    let plan = Plan::resolve(&args.plan)?;
    std::fs::create_dir_all(&args.plan.out)
        .with_context(|| format!("creating {}", args.plan.out.display()))?;
    let worker_id = WorkerId(
        args.worker_id
            .clone()
            .unwrap_or_else(|| format!("eval-{}", std::process::id())),
    );
    let (metrics, _metrics_server) =
        crate::metrics::worker_metrics(&worker_id.0, args.metrics_addr)?;
    let mut models = Models::load(&plan)?;
    let connect_timeout = args.connect_timeout;
    let credentials = load_credentials(&args, connect_timeout)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let client_cfg = ClientConfig::new(args.coordinator.clone(), credentials, worker_id.clone())
        .with_device(args.plan.device.to_string());
    let max_images = plan.info.batch_size * args.batches_per_lease.max(1);
    let mut progress = Progress::new(Activity::Evaluation, None);
    let mut rendered = 0u64;
    let mut session = WorkerSession {
        args: &args,
        plan: &plan,
        rt: &rt,
        metrics: &metrics,
        models: &mut models,
        max_images,
        rendered: &mut rendered,
        progress: &mut progress,
    };
    // A lost coordinator (crash, restart, preempted head node) is reconnected to under
    // --connect-timeout; a restarted one continues the set from its saved leases.
    loop {
        let Some(mut client) =
            rt.block_on(connect_with_retry(client_cfg.clone(), connect_timeout))?
        else {
            info!(worker_id = %worker_id, "the evaluation is already complete; nothing to do");
            break;
        };
        info!(worker_id = %worker_id, coordinator = %args.coordinator, "eval worker connected");
        match session.serve(&mut client) {
            Ok(()) => {
                rt.block_on(client.close());
                break;
            }
            Err(e) if e.downcast_ref::<CoordinatorLost>().is_some() => {
                warn!(worker_id = %worker_id, cause = %e, "lost the coordinator; reconnecting (the current lease is dropped)");
            }
            Err(e) => return Err(e),
        }
    }
    progress.finish();
    info!(worker_id = %worker_id, images = rendered, "eval worker done");
    Ok(())
}

/// The control connection failed: reconnecting may help (unlike a refusal or a model error).
#[derive(Debug, thiserror::Error)]
#[error("lost the coordinator: {0}")]
struct CoordinatorLost(String);

/// One eval worker's lease loop over a connection.
struct WorkerSession<'a> {
    args: &'a EvalWorkerOptions,
    plan: &'a Plan,
    rt: &'a tokio::runtime::Runtime,
    metrics: &'a eqim_common::metrics_registry::WorkerMetrics,
    models: &'a mut Models,
    max_images: u64,
    rendered: &'a mut u64,
    progress: &'a mut Progress,
}

/// A lease the coordinator granted.
struct Grant {
    lease: LeaseId,
    indices: Range<u64>,
    deadline_ms: u64,
    want_features: bool,
}

impl WorkerSession<'_> {
    /// Leases, renders and completes until the coordinator says the set is done.
    fn serve(&mut self, client: &mut Client) -> Result<()> {
        let sender = client.sender();
        while let Some(grant) = self.next_lease(client, &sender)? {
            let files = self.render_lease(&sender, &grant)?;
            send(
                self.rt,
                &sender,
                WorkerToCoordinator::EvalLeaseComplete {
                    lease: grant.lease,
                    files,
                },
            )?;
        }
        Ok(())
    }

    /// Asks for a lease; `None` when the set is done.
    fn next_lease(&self, client: &mut Client, sender: &ControlSender) -> Result<Option<Grant>> {
        send(
            self.rt,
            sender,
            WorkerToCoordinator::EvalLeaseRequest {
                plan: self.plan.info.clone(),
                max_images: self.max_images,
            },
        )?;
        let answer = self
            .rt
            .block_on(async { tokio::time::timeout(LEASE_ANSWER_TIMEOUT, client.recv()).await })
            .map_err(|_| {
                anyhow::anyhow!("no answer to a lease request within {LEASE_ANSWER_TIMEOUT:?}")
            })?;
        match answer {
            Some(CoordinatorToWorker::EvalLeaseGrant {
                lease,
                indices,
                deadline_ms,
                want_features,
            }) => Ok(Some(Grant {
                lease,
                indices,
                deadline_ms,
                want_features,
            })),
            Some(CoordinatorToWorker::EvalDone) | Some(CoordinatorToWorker::Finished { .. }) => {
                Ok(None)
            }
            Some(CoordinatorToWorker::EvalRefused { reason }) => {
                bail!("the coordinator refused this eval worker: {reason}")
            }
            Some(other) => bail!(
                "unexpected {} from the coordinator (is it running an evaluation job, with an eval: section?)",
                other.kind()
            ),
            None => Err(CoordinatorLost("the connection closed".into()).into()),
        }
    }

    /// Renders a lease batch by batch (renewing it on progress), writes the PNGs and sends
    /// the features the coordinator asked for; returns the files for the completion.
    fn render_lease(&mut self, sender: &ControlSender, grant: &Grant) -> Result<Vec<WrittenFile>> {
        let (plan, rt, lease) = (self.plan, self.rt, grant.lease);
        let renew_every = Duration::from_millis(grant.deadline_ms) / RENEW_FRACTION;
        let mut last_renewal = Instant::now();
        let mut files = Vec::new();
        let mut start = grant.indices.start;
        while start < grant.indices.end {
            let end = (start + plan.info.batch_size).min(grant.indices.end);
            let mut renew_error = None;
            let images = render_batch(plan, &*self.models, start..end, &mut |_| {
                if last_renewal.elapsed() >= renew_every && renew_error.is_none() {
                    last_renewal = Instant::now();
                    renew_error =
                        send(rt, sender, WorkerToCoordinator::EvalLeaseRenew { lease }).err();
                }
            })?;
            if let Some(e) = renew_error {
                return Err(e);
            }
            for (k, image) in images.iter().enumerate() {
                files.push(self.write_image(image, start + k as u64)?);
            }
            if grant.want_features {
                self.send_features(sender, lease, start, &images)?;
            }
            start = end;
        }
        Ok(files)
    }

    /// Writes image `index` (after the test hooks) and counts it.
    fn write_image(&mut self, image: &image::RgbImage, index: u64) -> Result<WrittenFile> {
        let args = self.args;
        if args.die_after_images == Some(*self.rendered) {
            warn!(
                rendered = *self.rendered,
                "test hook: killing this eval worker mid-lease"
            );
            // SIGKILL: no goodbye on the connection, as when a machine is preempted.
            nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL)
                .context("raising SIGKILL")?;
        }
        let file = write_png(image, &args.plan.out, index)?;
        *self.rendered += 1;
        self.metrics.eval_images.inc();
        self.progress.inc(1);
        if let Some(pause) = args.pause_after_each_image {
            std::thread::sleep(pause);
        }
        Ok(file)
    }

    /// Sends the Inception features of images `first_index..`, in frames of bounded size.
    fn send_features(
        &mut self,
        sender: &ControlSender,
        lease: LeaseId,
        first_index: u64,
        images: &[image::RgbImage],
    ) -> Result<()> {
        let net = self.models.inception(self.plan)?;
        let rows = features_of(net, images)?;
        for (c, chunk) in rows
            .chunks(MAX_FEATURE_ROWS_PER_FRAME * INCEPTION_DIM)
            .enumerate()
        {
            send(
                self.rt,
                sender,
                WorkerToCoordinator::EvalFeatures {
                    lease,
                    first_index: first_index + (c * MAX_FEATURE_ROWS_PER_FRAME) as u64,
                    dim: INCEPTION_DIM as u32,
                    rows: chunk.to_vec(),
                },
            )?;
        }
        Ok(())
    }
}

/// Connects, retrying while the coordinator may still be starting; `None` when the job has
/// already finished (a late worker has nothing to do).
async fn connect_with_retry(cfg: ClientConfig, timeout: Duration) -> Result<Option<Client>> {
    match Client::connect_with_retry(cfg.clone(), timeout).await {
        Ok(client) => Ok(Some(client)),
        Err(ClientError::Refused(Refusal::JobFinished)) => Ok(None),
        Err(e) => Err(e).with_context(|| {
            format!(
                "connecting to the coordinator at {} (waited up to {timeout:?})",
                cfg.coordinator
            )
        }),
    }
}

/// What an eval run did.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// Images per second, from the coordinator's first lease to its last completion.
    pub images_per_second: f64,
    /// Workers that exited abnormally; their leases went to the others.
    pub dead_workers: Vec<String>,
    /// FID against --fid-stats, computed by the coordinator from every image's features.
    pub fid: Option<f64>,
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

/// The shortest heartbeat interval `eqim eval` gives its coordinator.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(50);

/// Writes the coordinator config of a local evaluation (`<out>/.eval-job/coordinator.yaml`)
/// and returns its path.
fn write_coordinator_config(args: &EvalOptions, plan: &Plan, out: &Path) -> Result<PathBuf> {
    let job_dir = out.join(".eval-job");
    let fid_stats = args.fid_stats.as_deref().map(absolute).transpose()?;
    let interval = Duration::from_millis(args.heartbeat_timeout.as_millis() as u64 / 6)
        .max(MIN_HEARTBEAT_INTERVAL);
    let coordinator_cfg = serde_json::json!({
        "bind": "127.0.0.1:0",
        "job_dir": job_dir,
        "expected_workers": args.workers,
        "min_workers": 1,
        "max_workers": args.workers,
        "timeouts": {
            "heartbeat_interval": interval.as_secs_f64(),
            "heartbeat_timeout": args.heartbeat_timeout.as_secs_f64(),
            "quic_idle_timeout": args.heartbeat_timeout.as_secs_f64(),
        },
        "eval": {
            "num_images": plan.info.num_images,
            "lease_images": args.lease_images,
            "lease_timeout": args.lease_timeout.as_secs_f64(),
            "fid_stats": fid_stats,
            "out": out,
        },
    });
    std::fs::create_dir_all(&job_dir).with_context(|| format!("creating {}", job_dir.display()))?;
    let config_path = job_dir.join("coordinator.yaml");
    // JSON is YAML: the coordinator's loader reads it by extension.
    std::fs::write(&config_path, serde_json::to_vec_pretty(&coordinator_cfg)?)
        .with_context(|| format!("writing {}", config_path.display()))?;
    Ok(config_path)
}

/// Runs the coordinator and the eval workers as a local cluster; returns the workers that
/// died (not those stopped after the coordinator finished).
fn launch_local(
    args: &EvalOptions,
    plan: &Plan,
    plan_args: &EvalPlanOptions,
    config_path: PathBuf,
) -> Result<Vec<String>> {
    // The same local cluster as `eqim launch --config <this config> -- <plan flags>`.
    let mut eval_worker_args = plan_args.to_flags();
    eval_worker_args.extend(
        [
            "--threads".to_string(),
            args.threads.to_string(),
            "--batches-per-lease".to_string(),
            (args.lease_images / plan.info.batch_size)
                .max(1)
                .to_string(),
        ]
        .map(OsString::from),
    );
    let launch_args = crate::runtime::launch_cmd::LaunchConfig {
        config: config_path,
        workers: args.workers,
        final_state_dir: None,
        metrics_base_port: args.metrics_base_port,
        train_config: None,
        export_dir: None,
        connect_timeout: 60.0,
        eval_worker_args,
    };
    info!(
        workers = args.workers,
        threads = args.threads,
        images = plan.info.num_images,
        "launching a local evaluation"
    );
    let kill = args.kill_worker_after;
    let outcome = crate::runtime::launch_cmd::launch(&launch_args, &|i| match kill {
        Some((w, n)) if w == i => vec!["--die-after-images".into(), n.to_string().into()],
        _ => Vec::new(),
    })?;
    // Workers still running when the coordinator finished were stopped with SIGTERM: late
    // starters with nothing left to do, not deaths.
    Ok(outcome
        .statuses
        .iter()
        .filter(|(name, status)| {
            name != "coordinator"
                && !status.is_some_and(|s| s.success() || s.signal() == Some(libc::SIGTERM))
        })
        .map(|(name, status)| format!("{name}: {status:?}"))
        .collect())
}

/// Runs a whole evaluation on this machine: a coordinator and `--workers` eval workers as child
/// processes (the same programs as on a cluster), then the optional npz.
pub fn run_eval(args: &EvalOptions) -> Result<EvalReport> {
    if args.workers == 0 || args.lease_images == 0 {
        bail!("--workers and --lease-images must be positive");
    }
    // Fail early, in this process, on a bad config or plan.
    let plan = Plan::resolve(&args.plan)?;
    let mut plan_args = args.plan.clone();
    plan_args.out = absolute(&args.plan.out)?;
    std::fs::create_dir_all(&plan_args.out)
        .with_context(|| format!("creating {}", plan_args.out.display()))?;
    let config_path = write_coordinator_config(args, &plan, &plan_args.out)?;
    let manifest = plan_args.out.join("manifest.json");
    if manifest.exists() {
        std::fs::remove_file(&manifest)
            .with_context(|| format!("removing the old {}", manifest.display()))?;
    }
    let dead_workers = launch_local(args, &plan, &plan_args, config_path)?;
    let written: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&manifest).with_context(|| format!("reading {}", manifest.display()))?,
    )
    .with_context(|| format!("parsing {}", manifest.display()))?;
    let seconds = written["seconds"].as_f64().unwrap_or(f64::NAN);
    let images_per_second = plan.info.num_images as f64 / seconds;
    let fid = written["fid"].as_f64();
    println!(
        "wrote {} images to {} ({images_per_second:.2} images/s with {} workers{})",
        plan.info.num_images,
        plan_args.out.display(),
        args.workers,
        if dead_workers.is_empty() {
            String::new()
        } else {
            format!(", {} died", dead_workers.len())
        }
    );
    if let Some(f) = fid {
        super::warn_if_small(plan.info.num_images);
        println!("fid {f:.4} ({} images)", plan.info.num_images);
    }
    if let Some(npz) = &args.npz {
        write_images_npz(&plan_args.out, plan.info.num_images, npz)?;
        println!("wrote {}", npz.display());
    }
    Ok(EvalReport {
        images_per_second,
        dead_workers,
        fid,
    })
}

/// Packs `{i:05}.png` for i in 0..n into one uint8 npz `arr_0` [N, H, W, 3].
pub fn write_images_npz(dir: &Path, n: u64, out: &Path) -> Result<()> {
    let read = |i: u64| -> Result<image::RgbImage> {
        let path = dir.join(EvalPlan::file_name(i));
        Ok(image::open(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .to_rgb8())
    };
    let first = read(0)?;
    let (w, h) = first.dimensions();
    eqim_common::npz::write_image_npz(out, "arr_0", n as usize, h as usize, w as usize, |i| {
        read(i as u64).map(image::RgbImage::into_raw).map_err(|e| {
            eqim_common::npz::NpyError::Format {
                what: out.display().to_string(),
                reason: format!("{e:#}"),
            }
        })
    })
    .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// The plan every worker of a job must agree on (what the coordinator compares), resolved
/// from the options and the model config.
pub fn plan_info(args: &EvalPlanOptions) -> Result<EvalPlanInfo> {
    Ok(Plan::resolve(args)?.info)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny_plan() -> EvalPlanOptions {
        let f = crate::verify::tokenizer::fixtures_dir();
        EvalPlanOptions {
            weights: f.join("generator_tiny.weights.safetensors"),
            config: f.join("generator_tiny.json"),
            tokenizer_config: Some(f.join("tokenizer_tiny.json")),
            tokenizer_checkpoint: f.join("tokenizer_tiny.weights.safetensors"),
            num_images: 20,
            cfg: 7.0,
            cfg_schedule: CfgSchedule::Constant,
            length: Some(4),
            steps: None,
            seed: 1,
            latent_scale: 0.05493,
            batch_size: 8,
            out: PathBuf::from("/tmp/unused"),
            device: DeviceSpec::Cpu,
            inception: None,
        }
    }

    #[test]
    fn plans_resolve_from_the_model_config_and_bad_plans_are_refused() {
        let info = plan_info(&tiny_plan()).expect("plan");
        assert_eq!(info.class_num, 10);
        assert!(info.settings_json.contains("\"cfg_schedule\":\"constant\""));
        let err = plan_info(&EvalPlanOptions {
            num_images: 21,
            ..tiny_plan()
        })
        .expect_err("21 % 10");
        assert!(
            format!("{err:#}").contains("multiple of the 10 classes"),
            "{err:#}"
        );
        assert!(plan_info(&EvalPlanOptions {
            batch_size: 0,
            ..tiny_plan()
        })
        .is_err());
    }
}
