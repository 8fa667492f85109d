//! What `scripts/check-prometheus` may expect of each metric while scraping a short local training
//! job (2 workers, a few epochs, periodic checkpoints), in two phases: `training` (the job runs
//! undisturbed) and `recovery` (then one worker is killed and the job carries on). Most metrics
//! must move during training; deaths and recoveries once the worker is lost; a few rightly stay
//! at their starting value in such a job (no bad data); the GPU ones need an NVIDIA GPU; the
//! evaluation ones belong to the check's evaluation phase (an `eqim eval` run on the same ports). Every metric of the table has
//! exactly one entry, so a new metric cannot be left out of the check silently (a test fails
//! until it is classified here).

use eqim_common::metrics::{self as names, MetricDesc, MetricKind};

/// What the training phase of the check requires of one metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainingExpectation {
    /// Some series of it must have been above zero during the job.
    Moves,
    /// Moves once a worker is lost: checked in the recovery phase, after the check kills one.
    MovesAfterLoss,
    /// Exported from the start, but rightly at its starting value in a short healthy job; the
    /// text says why (printed by the check).
    StaysAtStart(&'static str),
    /// Moves only on an NVIDIA GPU: required to move when `nvidia-smi` works, else skipped
    /// (and the check prints that it was).
    NeedsGpu,
    /// Moves during an evaluation job: checked in the evaluation phase (`eqim eval`), which
    /// follows the training job.
    EvalPhase,
}

/// The expectation for metric `name` (a table name, not a histogram series).
pub fn training_expectation(name: &str) -> Option<TrainingExpectation> {
    use TrainingExpectation::*;
    let expectation = match name {
        names::EMA_LAG_STEPS => StaysAtStart("the generator updates its EMA in every step"),
        names::DATA_ERRORS_TOTAL => StaysAtStart("the job's synthetic data has no unreadable file"),
        names::WORKER_DEATHS_TOTAL | names::RECOVERIES_TOTAL | names::RECOVERY_DURATION_SECONDS => {
            MovesAfterLoss
        }
        names::GPU_MEMORY_USED_BYTES
        | names::GPU_MEMORY_TOTAL_BYTES
        | names::GPU_UTILIZATION_RATIO => NeedsGpu,
        names::EVAL_IMAGES_TOTAL | names::EVAL_IMAGES_COMPLETED | names::EVAL_IMAGES_TARGET => {
            EvalPhase
        }
        names::BUILD_INFO
        | names::PROCESS_RESIDENT_MEMORY_BYTES
        | names::STEP_DURATION_SECONDS
        | names::STEP_PHASE_DURATION_SECONDS
        | names::STEPS_TOTAL
        | names::COMMITTED_STEP_SECONDS_TOTAL
        | names::IMAGES_TOTAL
        | names::IMAGES_PER_SECOND
        | names::TRAIN_STEP
        | names::TRAIN_LOSS
        | names::LEARNING_RATE
        | names::GRAD_NORM
        | names::CHECKPOINT_DURATION_SECONDS
        | names::CHECKPOINT_SIZE_BYTES
        | names::MEMBERSHIP_SIZE
        | names::MEMBERSHIP_GENERATION
        | names::WORKER_JOINS_TOTAL
        | names::COMMITTED_STEP
        | names::EPOCH
        | names::EPOCH_SAMPLES_CONSUMED
        | names::EPOCH_SAMPLES
        | names::CHECKPOINTS_TOTAL
        | names::LAST_GOOD_CHECKPOINT_TIMESTAMP_SECONDS => Moves,
        _ => return None,
    };
    Some(expectation)
}

/// A PromQL query that returns a sample only if some series of `desc` (with `job`) was above
/// zero in the last `window`. A histogram must have observations; one with a label (the step
/// phases) must have observed time above zero for every label value on some worker, so a phase
/// that is recorded but never timed (always 0 s) fails.
pub fn moved_query(desc: &MetricDesc, job: &str, window: &str) -> String {
    let selector = |series: &str| format!("{series}{{job=\"{job}\"}}");
    match desc.kind {
        MetricKind::Histogram if desc.labels.is_empty() => format!(
            "max(max_over_time({}[{window}])) > 0",
            selector(&format!("{}_count", desc.name))
        ),
        MetricKind::Histogram => {
            let label = desc.labels[0].name;
            format!(
                "min(max by ({label}) (max_over_time({}[{window}]))) > 0",
                selector(&format!("{}_sum", desc.name))
            )
        }
        _ => format!("max(max_over_time({}[{window}])) > 0", selector(desc.name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_a_training_expectation() {
        let missing: Vec<_> = names::METRICS
            .iter()
            .filter(|m| training_expectation(m.name).is_none())
            .map(|m| m.name)
            .collect();
        assert!(
            missing.is_empty(),
            "classify these in eqim_dashboards::expectations: {missing:?}"
        );
    }

    #[test]
    fn only_the_eval_metrics_are_left_to_the_eval_phase() {
        let eval: Vec<_> = names::METRICS
            .iter()
            .filter(|m| training_expectation(m.name) == Some(TrainingExpectation::EvalPhase))
            .map(|m| m.name)
            .collect();
        assert!(eval.iter().all(|n| n.starts_with("eqim_eval_")), "{eval:?}");
        assert_eq!(eval.len(), 3);
    }

    #[test]
    fn the_recovery_phase_checks_deaths_and_recoveries() {
        for name in [
            names::WORKER_DEATHS_TOTAL,
            names::RECOVERIES_TOTAL,
            names::RECOVERY_DURATION_SECONDS,
        ] {
            assert_eq!(
                training_expectation(name),
                Some(TrainingExpectation::MovesAfterLoss)
            );
        }
    }

    #[test]
    fn moved_queries_look_at_counts_for_histograms() {
        let step = names::describe(names::STEP_DURATION_SECONDS).expect("in the table");
        assert_eq!(
            moved_query(step, "j", "5m"),
            "max(max_over_time(eqim_step_duration_seconds_count{job=\"j\"}[5m])) > 0"
        );
        let phases = names::describe(names::STEP_PHASE_DURATION_SECONDS).expect("in the table");
        assert_eq!(
            moved_query(phases, "j", "5m"),
            "min(max by (phase) (max_over_time(eqim_step_phase_duration_seconds_sum{job=\"j\"}[5m]))) > 0"
        );
        let loss = names::describe(names::TRAIN_LOSS).expect("in the table");
        assert_eq!(
            moved_query(loss, "j", "1m"),
            "max(max_over_time(eqim_train_loss{job=\"j\"}[1m])) > 0"
        );
    }
}
