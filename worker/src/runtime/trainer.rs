//! The training thread of every training run: owns the model, the c10d store and process group,
//! and obeys commands one at a time. In a cluster the commands come from the worker agent (the
//! coordinator's orders); `eqim train-generator` drives the same thread from
//! [`super::local`] as the only rank, with no store and no process group. tch and c10d calls
//! block, so they live here and never in an async task; results go back as events.

use super::trainable::Trainable;
use crate::collective::ddp::{allreduce_sum_tensors, broadcast_tensors, DEFAULT_BUCKET_BYTES};
use crate::collective::overlap::{overlap_enabled, GradientReducer};
use crate::collective::{GroupOptions, ProcessGroup, Store};
use anyhow::{Context, Result};
use eqim_common::checkpoint;
use eqim_common::proto::{
    Assignment, CheckpointOrder, Cursor, Generation, Rendezvous, VoteOutcome, WrittenFile,
};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tch::Tensor;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, info, warn};

/// What the agent asks the training thread to do.
#[derive(Debug)]
pub enum Command {
    /// Build the process group of a generation and take the state from rank 0.
    Join {
        generation: Generation,
        rank: u32,
        world_size: u32,
        rendezvous: Rendezvous,
        resume: Cursor,
    },
    /// Be the only rank of `generation` (no store, no process group: nothing to all-reduce),
    /// resuming at `resume` from the checkpoint written after that many steps if this thread is
    /// not there yet.
    JoinAlone {
        generation: Generation,
        resume: Cursor,
    },
    /// Compute a step's gradients and all-reduce them; answer with a vote.
    Step(Assignment),
    /// Apply the pending update of `step`, then save a checkpoint if ordered.
    Commit {
        generation: Generation,
        step: u64,
        checkpoint: Option<CheckpointOrder>,
    },
    /// Drop the pending gradients of `step`.
    Abort { generation: Generation, step: u64 },
    /// Just-in-time checkpoint before this worker exits: write the state after `steps`
    /// committed steps into `name` synchronously, then report it.
    CheckpointNow {
        generation: Generation,
        steps: u64,
        name: String,
    },
    /// The job is over: write the final state if asked, then stop.
    Finish,
}

/// What the training thread reports.
#[derive(Debug)]
pub enum Event {
    GroupReady {
        generation: Generation,
    },
    Vote {
        generation: Generation,
        step: u64,
        outcome: VoteOutcome,
        loss: f64,
        step_seconds: f64,
        allreduce_seconds: f64,
        samples: u64,
    },
    /// The update of `step` is applied; `step + 1` steps are done.
    Applied {
        step: u64,
    },
    /// A checkpoint's state file is written and synced (after `steps` committed steps).
    CheckpointWritten {
        generation: Generation,
        steps: u64,
        files: Vec<WrittenFile>,
    },
    /// A just-in-time checkpoint was not written (wrong step or generation, or a write error).
    CheckpointFailed {
        reason: String,
    },
    Finished,
}

/// Settings of the training thread.
#[derive(Clone)]
pub struct TrainerConfig {
    /// Address of this machine other workers reach our TCPStore and gloo sockets at (unused by a
    /// thread that only ever joins alone).
    pub host: String,
    /// Bound on every collective and store wait (a hung peer is detected after it).
    pub collective_timeout: Duration,
    /// Where to write the final state (safetensors) at the end of the job.
    pub final_state: Option<PathBuf>,
    /// The job's checkpoint root (shared with the coordinator): checkpoints are written here
    /// when ordered, and read back when a generation resumes at a step this worker is not at.
    pub checkpoint_root: PathBuf,
    /// Where step, commit and checkpoint figures go (`/metrics`), if anywhere.
    pub metrics: Option<eqim_common::metrics_registry::WorkerMetrics>,
    /// Where rank 0 exports the trained model ([`Trainable::export`]) at the end of the job.
    pub export_dir: Option<PathBuf>,
    /// Steps of the whole run for the progress display, when known.
    pub progress_total: Option<u64>,
    /// Append one JSON line per `every` committed steps here (step, epoch, loss, lr, grad norm,
    /// samples/s), if set.
    pub step_log: Option<StepLogConfig>,
}

/// Where and how often committed steps are logged as JSON lines.
#[derive(Debug, Clone)]
pub struct StepLogConfig {
    pub path: PathBuf,
    pub every: u64,
}

struct Group {
    generation: Generation,
    rank: u32,
    /// `None` for a rank alone in its generation.
    collective: Option<Collective>,
}

struct Collective {
    /// Bucketed gradient all-reduce (`None` for a model that names no parameters); armed for
    /// the last micro-batch's backward when `overlap` is on.
    reducer: Option<GradientReducer>,
    overlap: bool,
    process_group: ProcessGroup,
    // Kept alive for the group's lifetime: the group's store view and, on non-zero ranks, the
    // connection to rank 0's TCPStore.
    _view: Store,
    _remote: Option<Store>,
}

struct Pending {
    generation: Generation,
    step: u64,
}

/// Runs the training loop until `Finish` or until the agent hangs up.
pub struct Trainer<T: Trainable> {
    cfg: TrainerConfig,
    model: T,
    /// The TCPStore this worker hosts for generations where it is rank 0 (`None` when it only
    /// ever trains alone).
    own_store: Option<Store>,
    group: Option<Group>,
    pending: Option<Pending>,
    recorder: Option<crate::metrics::StepRecorder>,
    /// Compute time of the pending step, counted as useful once it is committed.
    pending_seconds: f64,
    /// The data loader's process-wide count of unreadable files, as last exported.
    data_errors_seen: u64,
    /// Background checkpoint writers still running.
    writers: Vec<std::thread::JoinHandle<()>>,
    /// Number of steps applied (the next step to run).
    next_step: u64,
    events: UnboundedSender<Event>,
    /// Mean loss of the pending step over this rank's samples, and their number.
    pending_loss: f64,
    pending_samples: u64,
    display: StepDisplay,
}

impl<T: Trainable> Trainer<T> {
    /// Hosts this worker's TCPStore (used when it is rank 0 of a generation) on a free port.
    pub fn new(cfg: TrainerConfig, model: T, events: UnboundedSender<Event>) -> Result<Self> {
        let own_store = Store::host(&cfg.host, 0, cfg.collective_timeout)
            .with_context(|| format!("hosting this worker's TCPStore on {}", cfg.host))?;
        Self::build(cfg, model, events, Some(own_store))
    }

    /// A training thread that only ever joins alone ([`Command::JoinAlone`]): no TCPStore.
    pub fn alone(cfg: TrainerConfig, model: T, events: UnboundedSender<Event>) -> Result<Self> {
        Self::build(cfg, model, events, None)
    }

    fn build(
        cfg: TrainerConfig,
        model: T,
        events: UnboundedSender<Event>,
        own_store: Option<Store>,
    ) -> Result<Self> {
        let recorder = cfg.metrics.clone().map(crate::metrics::StepRecorder::new);
        let display = StepDisplay::new(cfg.progress_total, cfg.step_log.clone())?;
        Ok(Self {
            cfg,
            model,
            own_store,
            group: None,
            pending: None,
            writers: Vec::new(),
            recorder,
            pending_seconds: 0.0,
            data_errors_seen: crate::data::unreadable_files_skipped(),
            next_step: 0,
            events,
            pending_loss: 0.0,
            pending_samples: 0,
            display,
        })
    }

    /// Port of the TCPStore this worker hosts (0 for a thread that only trains alone).
    pub fn store_port(&self) -> u16 {
        self.own_store.as_ref().map_or(0, Store::port)
    }

    fn emit(&self, event: Event) {
        if self.events.send(event).is_err() {
            debug!("agent gone; event dropped");
        }
    }

    /// Obeys commands until `Finish` or the channel closes.
    pub fn run(mut self, commands: mpsc::Receiver<Command>) -> Result<()> {
        while let Ok(command) = commands.recv() {
            if self.handle(command)? == Flow::Finished {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Carries out one command; `Flow::Finished` after `Finish`.
    pub fn handle(&mut self, command: Command) -> Result<Flow> {
        match command {
            Command::Join {
                generation,
                rank,
                world_size,
                rendezvous,
                resume,
            } => {
                let joined = self.join(generation, rank, world_size, &rendezvous, resume);
                self.enter(generation, resume, joined);
            }
            Command::JoinAlone { generation, resume } => {
                let joined = self.join_alone(generation, resume);
                self.enter(generation, resume, joined);
            }
            Command::Step(assignment) => self.step(assignment),
            Command::Commit {
                generation,
                step,
                checkpoint,
            } => self.commit(generation, step, checkpoint)?,
            Command::Abort { generation, step } => {
                debug!(%generation, step, "step aborted; gradients dropped");
                self.pending = None;
            }
            Command::CheckpointNow {
                generation,
                steps,
                name,
            } => {
                let event = match self.checkpoint_now(generation, steps, &name) {
                    Ok(file) => Event::CheckpointWritten {
                        generation,
                        steps,
                        files: vec![file],
                    },
                    Err(e) => Event::CheckpointFailed {
                        reason: format!("{e:#}"),
                    },
                };
                self.emit(event);
            }
            Command::Finish => {
                self.finish()?;
                return Ok(Flow::Finished);
            }
        }
        Ok(Flow::Continue)
    }

    /// Makes the group of a join current (or logs why there is none).
    fn enter(&mut self, generation: Generation, resume: Cursor, joined: Result<Group>) {
        match joined {
            Ok(group) => {
                info!(%generation, rank = group.rank, step = resume.step, "group ready");
                self.group = Some(group);
                self.next_step = resume.step;
                self.emit(Event::GroupReady { generation });
            }
            // The coordinator's rendezvous timeout forms the next generation.
            Err(e) => warn!(%generation, cause = format!("{e:#}"), "cannot build the group"),
        }
    }

    fn commit(
        &mut self,
        generation: Generation,
        step: u64,
        checkpoint: Option<CheckpointOrder>,
    ) -> Result<()> {
        match self.pending.take() {
            Some(p) if p.generation == generation && p.step == step => {}
            other => anyhow::bail!(
                "commit of step {step} ({generation}) but the pending step is {:?}: this worker's state no longer matches the job",
                other.map(|p| (p.generation, p.step))
            ),
        }
        let applying = Instant::now();
        self.model
            .apply_step()
            .context("applying a committed step")?;
        let optimizer_time = applying.elapsed();
        self.next_step = step + 1;
        let update = self.model.last_update();
        if let Some(r) = &self.recorder {
            r.record_commit(&crate::metrics::CommitReport {
                step_time: Duration::from_secs_f64(self.pending_seconds),
                optimizer_time,
                updates_held: step + 1,
                update,
            });
        }
        self.display
            .committed(step, self.pending_loss, self.pending_samples, update)?;
        self.emit(Event::Applied { step });
        let writer = self
            .group
            .as_ref()
            .is_some_and(|g| checkpoint.as_ref().is_some_and(|c| c.writer_rank == g.rank));
        if let (true, Some(order)) = (writer, checkpoint) {
            self.checkpoint(generation, step + 1, &order.name)?;
        }
        Ok(())
    }

    /// The end of the job: waits for the checkpoint writers, writes the final state and exports
    /// the model if asked, and leaves the group.
    fn finish(&mut self) -> Result<()> {
        for writer in self.writers.drain(..) {
            if writer.join().is_err() {
                warn!("a checkpoint writer panicked");
            }
        }
        self.display.finish();
        if let Some(path) = &self.cfg.final_state {
            save_state(&self.model, path)?;
            info!(path = %path.display(), "final state written");
        }
        let writer = self.group.as_ref().is_some_and(|g| g.rank == 0);
        if let (true, Some(dir)) = (writer, &self.cfg.export_dir) {
            let files = self
                .model
                .export(dir)
                .with_context(|| format!("exporting the trained model to {}", dir.display()))?;
            for file in &files {
                info!(path = %file.display(), "exported");
                println!("exported {}", file.display());
            }
        }
        if let Some(old) = self.group.take() {
            drop_group(old);
        }
        self.emit(Event::Finished);
        Ok(())
    }

    /// Copies the state to host memory, detached from the model's tensors.
    fn snapshot(&self) -> Vec<(String, tch::Tensor)> {
        self.model
            .state_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.to_device(tch::Device::Cpu).copy()))
            .collect()
    }

    /// Writes the state after `steps` committed steps now, in this thread (the process is about
    /// to exit, so the background writers are waited for too), and returns the synced file.
    fn checkpoint_now(
        &mut self,
        generation: Generation,
        steps: u64,
        name: &str,
    ) -> Result<WrittenFile> {
        for writer in self.writers.drain(..) {
            if writer.join().is_err() {
                warn!("a checkpoint writer panicked");
            }
        }
        anyhow::ensure!(
            self.group
                .as_ref()
                .is_some_and(|g| g.generation == generation),
            "just-in-time checkpoint of {generation}, but this worker is not synchronised in it"
        );
        anyhow::ensure!(
            steps == self.next_step,
            "just-in-time checkpoint after {steps} steps, but this worker has applied {}",
            self.next_step
        );
        let started = Instant::now();
        let dir = self.cfg.checkpoint_root.join(name);
        let metrics = self.recorder.as_ref().map(|r| r.metrics().clone());
        let file = persist_checkpoint(&self.snapshot(), &dir, started, metrics.as_ref())?;
        info!(dir = %dir.display(), steps, ms = started.elapsed().as_millis() as u64, "just-in-time checkpoint written");
        Ok(file)
    }

    /// Copies the state to host memory (the only pause training sees) and writes it in the
    /// background; the coordinator writes the manifest when told.
    fn checkpoint(&mut self, generation: Generation, steps: u64, name: &str) -> Result<()> {
        let started = Instant::now();
        let snapshot = self.snapshot();
        debug!(
            steps,
            ms = started.elapsed().as_millis() as u64,
            "checkpoint snapshot taken"
        );
        let dir = self.cfg.checkpoint_root.join(name);
        let events = self.events.clone();
        let metrics = self.recorder.as_ref().map(|r| r.metrics().clone());
        self.writers.retain(|w| !w.is_finished());
        let writer = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                match persist_checkpoint(&snapshot, &dir, started, metrics.as_ref()) {
                    Ok(file) => {
                        let _ignored = events.send(Event::CheckpointWritten {
                            generation,
                            steps,
                            files: vec![file],
                        });
                    }
                    Err(e) => warn!(dir = %dir.display(), cause = format!("{e:#}"), "checkpoint not written"),
                }
            })
            .context("spawning the checkpoint writer")?;
        self.writers.push(writer);
        Ok(())
    }

    /// Loads the state of the checkpoint after `steps` committed steps, if one verifies.
    fn load_checkpoint(&mut self, steps: u64) -> Result<bool> {
        let dir = self.cfg.checkpoint_root.join(checkpoint::dir_name(steps));
        if !dir.exists() {
            return Ok(false);
        }
        checkpoint::verify(&dir)?;
        let path = dir.join(checkpoint::STATE_FILE);
        let saved = crate::model::weights::read_safetensors(&path)?;
        let _no_grad = tch::no_grad_guard();
        for (name, mut tensor) in self.model.state_tensors() {
            let value = saved
                .get(&name)
                .with_context(|| format!("{} has no tensor {name}", path.display()))?;
            tensor
                .f_copy_(value)
                .with_context(|| format!("loading {name} from {}", path.display()))?;
        }
        info!(dir = %dir.display(), "state loaded from checkpoint");
        Ok(true)
    }

    /// Leaves the current group (if any) and drops a pending step: a new generation starts.
    fn leave_group(&mut self) {
        self.pending = None;
        if let Some(old) = self.group.take() {
            drop_group(old);
        }
    }

    fn join_alone(&mut self, generation: Generation, resume: Cursor) -> Result<Group> {
        self.leave_group();
        if resume.step != self.next_step && !self.load_checkpoint(resume.step)? {
            anyhow::bail!(
                "resuming at step {} needs the checkpoint {} under {}, which does not exist",
                resume.step,
                checkpoint::dir_name(resume.step),
                self.cfg.checkpoint_root.display()
            );
        }
        Ok(Group {
            generation,
            rank: 0,
            collective: None,
        })
    }

    fn join(
        &mut self,
        generation: Generation,
        rank: u32,
        world_size: u32,
        rendezvous: &Rendezvous,
        resume: Cursor,
    ) -> Result<Group> {
        self.leave_group();
        if resume.step != self.next_step && !self.load_checkpoint(resume.step)? {
            debug!(
                step = resume.step,
                "no checkpoint at the resume step; the state comes from rank 0"
            );
        }
        let own_store = self
            .own_store
            .as_ref()
            .context("this training thread hosts no TCPStore: it can only train alone")?;
        let timeout = self.cfg.collective_timeout;
        let is_own = rendezvous.store_port == own_store.port()
            && (rendezvous.store_host == self.cfg.host || rank == 0);
        let remote = if is_own {
            None
        } else {
            Some(
                Store::connect(&rendezvous.store_host, rendezvous.store_port, timeout)
                    .with_context(|| {
                        format!(
                            "connecting to the TCPStore of rank 0 at {}:{}",
                            rendezvous.store_host, rendezvous.store_port
                        )
                    })?,
            )
        };
        let base = remote.as_ref().unwrap_or(own_store);
        let view = base
            .prefixed(&rendezvous.prefix)
            .context("creating the generation's store view")?;
        let options = GroupOptions::for_training(
            rank as usize,
            world_size as usize,
            timeout,
            &self.cfg.host,
        )?;
        let process_group = ProcessGroup::with_options(&view, &options)
            .with_context(|| format!("creating the process group of {generation}"))?;
        // Newcomers take weights and optimizer moments from rank 0, which (old members come
        // first in the roster) holds the state of the committed step.
        let state: Vec<_> = self
            .model
            .state_tensors()
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        broadcast_tensors(&process_group, &state, 0, DEFAULT_BUCKET_BYTES)
            .context("receiving the training state from rank 0")?;
        debug!(%generation, step = resume.step, epoch = resume.epoch, "state synchronised");
        let params = self.model.parameters();
        let reducer = if params.is_empty() {
            None
        } else {
            Some(
                GradientReducer::new(&process_group, &params)
                    .context("hooking the parameters for the gradient all-reduce")?,
            )
        };
        Ok(Group {
            generation,
            rank,
            collective: Some(Collective {
                reducer,
                overlap: overlap_enabled(),
                process_group,
                _view: view,
                _remote: remote,
            }),
        })
    }

    fn step(&mut self, a: Assignment) {
        let started = Instant::now();
        let mut timer = crate::metrics::StepTimer::start_at(started);
        let samples: u64 = a.micro_batches.iter().map(|m| m.len() as u64).sum();
        let (outcome, loss, allreduce_seconds) = match self.compute(&a, &mut timer) {
            Ok((loss, allreduce_seconds)) => {
                let timing = timer.finish();
                self.pending_seconds = timing.total.as_secs_f64();
                if let Some(r) = &mut self.recorder {
                    r.record_step(&crate::metrics::StepReport {
                        timing,
                        images: samples,
                        global_step: a.step,
                        loss: if samples > 0 {
                            loss / samples as f64
                        } else {
                            0.0
                        },
                    });
                    let unreadable = crate::data::unreadable_files_skipped();
                    r.record_data_errors_total(unreadable, &mut self.data_errors_seen);
                }
                self.pending = Some(Pending {
                    generation: a.generation,
                    step: a.step,
                });
                self.pending_samples = samples;
                self.pending_loss = if samples > 0 {
                    loss / samples as f64
                } else {
                    0.0
                };
                (VoteOutcome::Ok, loss, allreduce_seconds)
            }
            Err(e) => {
                warn!(generation = %a.generation, step = a.step, cause = format!("{e:#}"), "step failed");
                self.pending = None;
                (
                    VoteOutcome::Failed {
                        reason: format!("{e:#}"),
                    },
                    f64::NAN,
                    0.0,
                )
            }
        };
        self.emit(Event::Vote {
            generation: a.generation,
            step: a.step,
            outcome,
            loss,
            step_seconds: started.elapsed().as_secs_f64(),
            allreduce_seconds,
            samples,
        });
    }

    fn compute(
        &mut self,
        a: &Assignment,
        timer: &mut crate::metrics::StepTimer,
    ) -> Result<(f64, f64)> {
        let group = self
            .group
            .as_ref()
            .filter(|g| g.generation == a.generation)
            .with_context(|| format!("no process group for {}", a.generation))?;
        anyhow::ensure!(
            a.step == self.next_step,
            "assigned step {} but this worker has applied {} steps",
            a.step,
            self.next_step
        );
        self.model.begin_step(a.step, u64::from(a.epoch))?;
        self.model.zero_grads()?;
        // Times left over from a step that failed half-way are not this step's.
        let _stale = self.model.take_phase_times();
        let mut loss = 0.0;
        // The last micro-batch's backward starts the all-reduce of full buckets (overlap on).
        let overlapped = group.collective.as_ref().filter(|c| c.overlap);
        let reducer = overlapped.and_then(|c| c.reducer.as_ref());
        let mut armed = None;
        for (i, micro_batch) in a.micro_batches.iter().enumerate() {
            if let (Some(r), true) = (reducer, i + 1 == a.micro_batches.len()) {
                armed = Some(r.arm(&self.model.gradients())?);
            }
            loss += self.model.accumulate_grads(micro_batch, a.step_samples)?;
        }
        // Data, forward and backward interleave per micro-batch: what the model timed apart
        // (data, and the forward where it can) moves out of backward.
        timer.end_phase(crate::metrics::StepPhase::Backward);
        let parts = self.model.take_phase_times();
        use crate::metrics::StepPhase;
        timer.reattribute(StepPhase::Backward, StepPhase::DataWait, parts.data_wait);
        timer.reattribute(StepPhase::Backward, StepPhase::Forward, parts.forward);
        let reduce_started = Instant::now();
        // Each rank's gradients are already divided by the step's sample count: sum them. A rank
        // alone in its generation holds the sum already.
        if let Some(collective) = &group.collective {
            let gradients = self.model.gradients();
            anyhow::ensure!(
                gradients.iter().all(Tensor::defined),
                "a gradient is undefined after the backward pass of step {}",
                a.step
            );
            let context = || format!("all-reduce of step {} (rank {})", a.step, group.rank);
            match &collective.reducer {
                Some(r) => r.finish(armed, &gradients).map(|_| ()),
                None => allreduce_sum_tensors(
                    &collective.process_group,
                    &gradients,
                    1.0,
                    DEFAULT_BUCKET_BYTES,
                ),
            }
            .with_context(context)?;
        }
        timer.end_phase(crate::metrics::StepPhase::AllReduce);
        Ok((loss, reduce_started.elapsed().as_secs_f64()))
    }
}

/// Writes a checkpoint's state file (temp file, fsync, rename) and returns it for the manifest.
fn persist_checkpoint(
    snapshot: &[(String, tch::Tensor)],
    dir: &std::path::Path,
    started: Instant,
    metrics: Option<&eqim_common::metrics_registry::WorkerMetrics>,
) -> Result<WrittenFile> {
    crate::model::weights::write_safetensors_atomic(snapshot, &dir.join(checkpoint::STATE_FILE))?;
    let file = checkpoint::written_file(dir, checkpoint::STATE_FILE)?;
    info!(dir = %dir.display(), bytes = file.bytes, "checkpoint state written");
    if let Some(m) = metrics {
        // From the snapshot to the synced, renamed file.
        crate::metrics::record_checkpoint(m, started.elapsed(), file.bytes);
    }
    Ok(file)
}

fn drop_group(group: Group) {
    if let Some(collective) = group.collective {
        // Unhooks the parameters before the group goes.
        drop(collective.reducer);
        if let Err(e) = collective.process_group.destroy() {
            debug!(cause = %e, "destroying the old process group");
        }
    }
}

/// What [`Trainer::handle`] leaves the loop to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Finished,
}

/// What a person sees of committed steps: the progress display (a bar on a terminal, periodic
/// log lines otherwise) and, if configured, a JSON line per `every` steps.
struct StepDisplay {
    total: Option<u64>,
    progress: Option<crate::progress::Progress>,
    log: Option<(std::fs::File, u64)>,
    /// Start and samples of the window since the last JSON line (for samples/s).
    window: (Instant, u64),
}

impl StepDisplay {
    fn new(total: Option<u64>, log: Option<StepLogConfig>) -> Result<Self> {
        let log = match log {
            Some(StepLogConfig { path, every }) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("opening the step log {}", path.display()))?;
                Some((file, every.max(1)))
            }
            None => None,
        };
        Ok(Self {
            total,
            progress: None,
            log,
            window: (Instant::now(), 0),
        })
    }

    fn committed(
        &mut self,
        step: u64,
        loss: f64,
        samples: u64,
        update: Option<crate::metrics::UpdateReport>,
    ) -> Result<()> {
        let total = self.total;
        let progress = self.progress.get_or_insert_with(|| {
            crate::progress::Progress::new(crate::progress::Activity::Training, total)
        });
        progress.set_message(match update {
            Some(u) => format!(
                "loss {loss:.4} lr {:.2e} gnorm {:.3}",
                u.learning_rate, u.grad_norm
            ),
            None => format!("loss {loss:.4}"),
        });
        progress.set_position(step + 1);
        self.window.1 += samples;
        let Some((file, every)) = &mut self.log else {
            return Ok(());
        };
        if !(step + 1).is_multiple_of(*every) && Some(step + 1) != total {
            return Ok(());
        }
        let samples_per_sec = self.window.1 as f64 / self.window.0.elapsed().as_secs_f64();
        self.window = (Instant::now(), 0);
        // `loss` is the mean over this rank's `samples` of the step (all of it on one rank).
        let line = serde_json::json!({
            "step": step + 1, "loss": loss, "samples": samples,
            "lr": update.map(|u| u.learning_rate), "grad_norm": update.map(|u| u.grad_norm),
            "samples_per_sec": samples_per_sec,
        });
        use std::io::Write;
        writeln!(file, "{line}").context("writing the step log")
    }

    fn finish(&mut self) {
        if let Some(progress) = self.progress.take() {
            progress.finish();
        }
    }
}

/// Writes every state tensor to `path` as safetensors (temp file, fsync, rename).
pub fn save_state<T: Trainable>(model: &T, path: &std::path::Path) -> Result<()> {
    let named = model.state_tensors();
    crate::model::weights::write_safetensors_atomic(&named, path)
        .with_context(|| format!("writing the state to {}", path.display()))
}
