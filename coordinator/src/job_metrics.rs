//! The coordinator's Prometheus metrics as the job actor sees them: one call per event
//! (generation formed, worker joined or lost, step aborted or committed, checkpoint complete),
//! each a no-op when the coordinator serves no `/metrics`. The decisions that are more than a
//! copy (which death reason, when a recovery starts and ends, what the epoch progress is) are
//! pure functions here, so they are tested without an actor, a network or a clock.

use crate::membership::{MembershipState, Reason};
use crate::steps::{ScheduleConfig, StepState};
use eqim_common::coordinator_config::CoordinatorConfig;
use eqim_common::metrics as names;
use eqim_common::metrics_registry::CoordinatorMetrics;
use eqim_common::proto::{Cursor, Generation};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The `reason` label of a worker that [`crate::membership::decide`] declared dead for `reason`.
pub fn declared_dead_reason(reason: &Reason) -> &'static str {
    match reason {
        Reason::ProbeTimeout => names::DEATH_STEP_FAILED,
        Reason::RendezvousTimeout => names::DEATH_RENDEZVOUS_TIMEOUT,
        // HeartbeatTimeout, and any future reason for a silent worker.
        _ => names::DEATH_HEARTBEAT_TIMEOUT,
    }
}

/// What the progress gauges show for a cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Steps committed so far (the cursor's next step), comparable with a worker's
    /// `eqim_train_step` (the updates its model holds).
    pub committed_steps: u64,
    /// 0-based epoch.
    pub epoch: u32,
    /// Samples of `epoch` committed so far.
    pub epoch_samples_consumed: u64,
    /// Samples in one epoch.
    pub epoch_samples: u64,
}

/// Progress at `cursor`. Past the last epoch (the schedule is complete) it shows the last epoch
/// fully consumed rather than an epoch that never runs at 0 %.
pub fn progress(cursor: Cursor, schedule: &ScheduleConfig) -> Progress {
    let finished = cursor.epoch >= schedule.epochs;
    Progress {
        committed_steps: cursor.step,
        epoch: if finished {
            schedule.epochs.saturating_sub(1)
        } else {
            cursor.epoch
        },
        epoch_samples_consumed: if finished {
            schedule.dataset_len
        } else {
            cursor.offset.min(schedule.dataset_len)
        },
        epoch_samples: schedule.dataset_len,
    }
}

/// Times recoveries: from the first failure (an aborted step or a lost member) to the next
/// committed step. Failures while a recovery is already under way extend that recovery rather
/// than starting a new one.
#[derive(Debug, Default, Clone)]
pub struct RecoveryClock {
    failed_at: Option<Instant>,
}

impl RecoveryClock {
    /// A failure at `now`; the earliest unrecovered failure is kept.
    pub fn failed(&mut self, now: Instant) {
        self.failed_at.get_or_insert(now);
    }

    /// A step committed at `now`: the time since the failure if this ends a recovery.
    pub fn committed(&mut self, now: Instant) -> Option<Duration> {
        self.failed_at
            .take()
            .map(|since| now.saturating_duration_since(since))
    }

    /// Whether a failure is waiting for its recovery.
    pub fn recovering(&self) -> bool {
        self.failed_at.is_some()
    }
}

/// Whether losing a member at this point is a failure training must recover from: only once a
/// generation has formed and before the job has finished (workers let go at the end are not
/// lost, and a worker that leaves before any training interrupts nothing).
pub fn loss_interrupts_training(membership: &MembershipState) -> bool {
    membership.generation.0 > 0 && !membership.phase.is_finished()
}

/// The job actor's handle on the coordinator metrics; every method is a no-op without them.
pub struct JobMetrics {
    metrics: Option<CoordinatorMetrics>,
    schedule: ScheduleConfig,
    recovery: RecoveryClock,
    /// Recoveries so far and their total time, for the end-of-job summary (kept with or without
    /// a registry).
    recoveries: u64,
    recovery_seconds: f64,
}

impl JobMetrics {
    /// Starts with the epoch size of `cfg`'s schedule; the rest of the progress is set when the
    /// first generation forms (from the cursor the job resumed at).
    pub fn new(metrics: Option<CoordinatorMetrics>, cfg: &CoordinatorConfig) -> Self {
        let job = Self {
            metrics,
            schedule: cfg.schedule.clone(),
            recovery: RecoveryClock::default(),
            recoveries: 0,
            recovery_seconds: 0.0,
        };
        job.set_progress(Cursor::default());
        job
    }

    /// The registry's typed handles, for gauges set elsewhere (evaluation progress).
    pub fn coordinator(&self) -> Option<&CoordinatorMetrics> {
        self.metrics.as_ref()
    }

    /// Evaluation progress: images accepted so far and images the evaluation needs.
    pub fn set_eval_progress(&self, completed: u64, target: u64) {
        if let Some(m) = &self.metrics {
            m.eval_images_completed.set(completed as f64);
            m.eval_images_target.set(target as f64);
        }
    }

    fn set_progress(&self, cursor: Cursor) {
        if let Some(m) = &self.metrics {
            let p = progress(cursor, &self.schedule);
            m.committed_step.set(p.committed_steps as f64);
            m.epoch.set(f64::from(p.epoch));
            m.epoch_samples_consumed
                .set(p.epoch_samples_consumed as f64);
            m.epoch_samples.set(p.epoch_samples as f64);
        }
    }

    /// A generation formed with `world_size` ranks, resuming at the cursor of `steps`.
    pub fn generation_formed(&self, generation: Generation, world_size: usize, steps: &StepState) {
        self.set_progress(steps.cursor());
        if let Some(m) = &self.metrics {
            m.membership_generation.set(generation.0 as f64);
            m.membership_size.set(world_size as f64);
        }
    }

    /// A worker was admitted into the membership.
    pub fn worker_joined(&self) {
        if let Some(m) = &self.metrics {
            m.worker_joins.inc();
        }
    }

    /// A member was removed for `reason` (one of `DEATH_REASONS`); starts a recovery when the
    /// loss interrupts training. Removals after the job finished are not deaths.
    pub fn worker_lost(
        &mut self,
        now: Instant,
        reason: &'static str,
        membership: &MembershipState,
    ) {
        if membership.phase.is_finished() {
            return;
        }
        debug_assert!(
            names::DEATH_REASONS.contains(&reason),
            "unknown reason {reason}"
        );
        if let Some(m) = &self.metrics {
            m.worker_deaths.with_label_values(&[reason]).inc();
        }
        if loss_interrupts_training(membership) {
            self.recovery.failed(now);
        }
    }

    /// A member's session stopped for `why`: a clean close of its streams is a worker that
    /// left (its `Leaving` message, if any, is handled after this), anything else a disconnect.
    pub fn session_ended(&mut self, now: Instant, why: &str, membership: &MembershipState) {
        let reason = if crate::net::session::ended_by_worker(why) {
            names::DEATH_LEFT
        } else {
            names::DEATH_DISCONNECTED
        };
        self.worker_lost(now, reason, membership);
    }

    /// A member's connection was replaced by a new connection under its id.
    pub fn worker_disconnected(&mut self, now: Instant, membership: &MembershipState) {
        self.worker_lost(now, names::DEATH_DISCONNECTED, membership);
    }

    /// A member said it is leaving.
    pub fn worker_left(&mut self, now: Instant, membership: &MembershipState) {
        self.worker_lost(now, names::DEATH_LEFT, membership);
    }

    /// [`crate::membership::decide`] declared a member dead for `reason`; `now` is when the
    /// fault's effect began (recoveries are timed from it).
    pub fn worker_declared_dead(&mut self, now: Instant, reason: &Reason, m: &MembershipState) {
        self.worker_lost(now, declared_dead_reason(reason), m);
    }

    /// A step was aborted: training is interrupted until the next commit.
    pub fn step_aborted(&mut self, now: Instant) {
        self.recovery.failed(now);
    }

    /// A step was committed: progress moves, and a recovery under way is complete.
    pub fn step_committed(&mut self, now: Instant, steps: &StepState) {
        let recovered = self.recovery.committed(now);
        self.set_progress(steps.cursor());
        if let Some(took) = recovered {
            self.recoveries += 1;
            self.recovery_seconds += took.as_secs_f64();
        }
        if let (Some(m), Some(took)) = (&self.metrics, recovered) {
            m.recoveries.inc();
            m.recovery_duration.observe(took.as_secs_f64());
        }
    }

    /// Recoveries completed so far and their total time in seconds.
    pub fn recoveries(&self) -> (u64, f64) {
        (self.recoveries, self.recovery_seconds)
    }

    /// A checkpoint's manifest was written just now (the checkpoint is good).
    pub fn checkpoint_completed(&self) {
        self.checkpoint_completed_at(SystemTime::now());
    }

    /// A checkpoint's manifest was written (the checkpoint is good) at `when`.
    pub fn checkpoint_completed_at(&self, when: SystemTime) {
        if let Some(m) = &self.metrics {
            m.checkpoints.inc();
            let unix = when
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default();
            m.last_good_checkpoint_timestamp.set(unix);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{JobPhase, MembershipConfig, SessionKey};
    use eqim_common::proto::{StoreEndpoint, VoteOutcome, WorkerId};

    fn schedule() -> ScheduleConfig {
        ScheduleConfig {
            dataset_len: 10,
            global_batch: 4,
            micro_batch: 4,
            epochs: 2,
            seed: 1,
            checkpoint_every_steps: None,
        }
    }

    /// Parsed from YAML, so optional keys added to the config later need no edit here.
    fn config() -> CoordinatorConfig {
        let yaml = "bind: 127.0.0.1:0\njob_dir: unused\nexpected_workers: 2\nmin_workers: 1\n\
                    max_workers: 4\nschedule:\n  dataset_len: 10\n  global_batch: 4\n  \
                    micro_batch: 4\n  epochs: 2\n  seed: 1\n";
        let cfg: CoordinatorConfig =
            eqim_common::config::parse_config(std::path::Path::new("test.yaml"), yaml)
                .expect("test config parses");
        assert_eq!(cfg.schedule, schedule());
        cfg
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn death_reasons_follow_the_decision_and_are_table_values() {
        assert_eq!(
            declared_dead_reason(&Reason::HeartbeatTimeout),
            names::DEATH_HEARTBEAT_TIMEOUT
        );
        assert_eq!(
            declared_dead_reason(&Reason::ProbeTimeout),
            names::DEATH_STEP_FAILED
        );
        assert_eq!(
            declared_dead_reason(&Reason::RendezvousTimeout),
            names::DEATH_RENDEZVOUS_TIMEOUT
        );
        for reason in [
            Reason::HeartbeatTimeout,
            Reason::ProbeTimeout,
            Reason::RendezvousTimeout,
        ] {
            assert!(names::DEATH_REASONS.contains(&declared_dead_reason(&reason)));
        }
    }

    #[test]
    fn progress_reports_the_epoch_position_and_a_full_last_epoch_at_the_end() {
        let s = schedule();
        let mid = Cursor {
            step: 4,
            epoch: 1,
            offset: 4,
        };
        assert_eq!(
            progress(mid, &s),
            Progress {
                committed_steps: 4,
                epoch: 1,
                epoch_samples_consumed: 4,
                epoch_samples: 10
            }
        );
        let done = Cursor {
            step: 6,
            epoch: 2,
            offset: 0,
        };
        let p = progress(done, &s);
        assert_eq!((p.epoch, p.epoch_samples_consumed), (1, 10));
    }

    #[test]
    fn a_recovery_runs_from_the_first_failure_to_the_next_commit() {
        let t0 = Instant::now();
        let mut clock = RecoveryClock::default();
        assert_eq!(clock.committed(t0), None, "no failure, no recovery");
        clock.failed(t0 + ms(100));
        // A second failure during the same recovery (the probe declares the worker dead).
        clock.failed(t0 + ms(400));
        assert!(clock.recovering());
        assert_eq!(clock.committed(t0 + ms(1100)), Some(ms(1000)));
        assert!(!clock.recovering());
        assert_eq!(clock.committed(t0 + ms(1200)), None, "counted once");
    }

    fn membership_with(workers: &[&str]) -> MembershipState {
        let cfg = MembershipConfig {
            expected_workers: 2,
            min_workers: 1,
            max_workers: 4,
            heartbeat_timeout: ms(1000),
            join_timeout: ms(1000),
            rendezvous_timeout: ms(1000),
            probe_timeout: ms(1000),
        };
        let mut m = MembershipState::new();
        let now = Instant::now();
        for (i, w) in workers.iter().enumerate() {
            m.join(
                now,
                WorkerId(w.to_string()),
                SessionKey(i as u64),
                StoreEndpoint {
                    host: "127.0.0.1".into(),
                    port: 1,
                },
                &cfg,
            )
            .expect("joins");
        }
        m
    }

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit_once(' '))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }

    #[test]
    fn events_move_the_exported_series() {
        let registry = CoordinatorMetrics::new("t").expect("registry");
        let mut steps = StepState::new(schedule());
        let mut job = JobMetrics::new(Some(registry.clone()), &config());
        let mut membership = membership_with(&["a", "b"]);
        let t0 = Instant::now();

        // Before any generation: a leave is a death but interrupts no training.
        job.worker_lost(t0, names::DEATH_LEFT, &membership);
        job.worker_joined();
        job.worker_joined();
        let roster = membership.form_generation(t0).len();
        job.generation_formed(membership.generation, roster, &steps);
        membership.start_training();

        // Step 0 commits; no recovery was under way.
        let roster_ids = membership.roster.clone();
        steps
            .open(t0, membership.generation, &roster_ids)
            .expect("opens");
        for w in &roster_ids {
            steps
                .vote(w, membership.generation, 0, &VoteOutcome::Ok)
                .expect("vote");
        }
        job.step_committed(t0 + ms(10), &steps);

        // A member is lost mid-training, then the next step commits 2.5 s later.
        job.worker_lost(t0 + ms(500), names::DEATH_DISCONNECTED, &membership);
        job.step_aborted(t0 + ms(600));
        steps
            .open(t0, membership.generation, &roster_ids)
            .expect("opens");
        for w in &roster_ids {
            steps
                .vote(w, membership.generation, 1, &VoteOutcome::Ok)
                .expect("vote");
        }
        job.step_committed(t0 + ms(3000), &steps);
        job.checkpoint_completed_at(UNIX_EPOCH + Duration::from_secs(1_700_000_000));

        // After the job finished, sessions closing are not deaths.
        membership.phase = JobPhase::Finished;
        job.worker_lost(t0 + ms(4000), names::DEATH_DISCONNECTED, &membership);

        let text = registry.all.encode_text().expect("encodes");
        assert_eq!(value(&text, "eqim_membership_size{"), 2.0);
        assert_eq!(value(&text, "eqim_membership_generation{"), 1.0);
        assert_eq!(value(&text, "eqim_worker_joins_total{"), 2.0);
        let deaths = |reason: &str| registry.worker_deaths.with_label_values(&[reason]).get();
        assert_eq!(deaths(names::DEATH_LEFT), 1.0);
        assert_eq!(deaths(names::DEATH_DISCONNECTED), 1.0);
        assert_eq!(value(&text, "eqim_recoveries_total{"), 1.0);
        assert_eq!(value(&text, "eqim_recovery_duration_seconds_sum{"), 2.5);
        assert_eq!(value(&text, "eqim_committed_step{"), 2.0);
        assert_eq!(value(&text, "eqim_epoch{"), 0.0);
        assert_eq!(value(&text, "eqim_epoch_samples_consumed{"), 8.0);
        assert_eq!(value(&text, "eqim_epoch_samples{"), 10.0);
        assert_eq!(value(&text, "eqim_checkpoints_total{"), 1.0);
        assert_eq!(
            value(&text, "eqim_last_good_checkpoint_timestamp_seconds{"),
            1.7e9
        );
    }

    #[test]
    fn without_a_registry_every_event_is_a_no_op() {
        let steps = StepState::new(schedule());
        let mut job = JobMetrics::new(None, &config());
        let membership = membership_with(&["a"]);
        job.worker_joined();
        job.worker_lost(Instant::now(), names::DEATH_LEFT, &membership);
        job.step_committed(Instant::now(), &steps);
        job.checkpoint_completed();
        assert!(job.coordinator().is_none());
    }
}
