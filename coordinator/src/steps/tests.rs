//! Scheduler transitions: commits, aborts, the fixed global batch and exact epoch coverage.

use super::*;

fn schedule(dataset_len: u64, global_batch: u64, micro_batch: u64) -> ScheduleConfig {
    ScheduleConfig {
        dataset_len,
        global_batch,
        micro_batch,
        epochs: 2,
        seed: 5,
        checkpoint_every_steps: None,
    }
}

fn ws(names: &[&str]) -> Vec<WorkerId> {
    names.iter().map(|n| WorkerId::from(*n)).collect()
}

/// Votes ok for every rank of the open step and returns the last result.
fn all_vote_ok(s: &mut StepState, roster: &[WorkerId]) -> VoteResult {
    let open = s.open_step().expect("open step").clone();
    let mut last = None;
    for w in roster {
        last = Some(
            s.vote(w, open.generation, open.step, &VoteOutcome::Ok)
                .unwrap(),
        );
    }
    last.expect("non-empty roster")
}

#[test]
fn a_step_commits_only_when_every_rank_voted_ok() {
    let t = Instant::now();
    let roster = ws(&["a", "b"]);
    let mut s = StepState::new(schedule(10, 4, 2));
    s.open(t, Generation(1), &roster).unwrap();
    assert_eq!(
        s.vote(&roster[0], Generation(1), 0, &VoteOutcome::Ok),
        Ok(VoteResult::Pending { missing: 1 })
    );
    assert_eq!(s.cursor().step, 0, "no progress before the last vote");
    assert_eq!(
        s.vote(&roster[1], Generation(1), 0, &VoteOutcome::Ok),
        Ok(VoteResult::Commit {
            generation: Generation(1),
            step: 0
        })
    );
    assert_eq!(
        s.cursor(),
        Cursor {
            step: 1,
            epoch: 0,
            offset: 4
        }
    );
    assert_eq!(s.ledger().entries.len(), 1);
}

#[test]
fn one_failed_vote_aborts_and_consumes_nothing() {
    let t = Instant::now();
    let roster = ws(&["a", "b"]);
    let mut s = StepState::new(schedule(10, 4, 2));
    let first = s.open(t, Generation(1), &roster).unwrap();
    s.vote(&roster[0], Generation(1), 0, &VoteOutcome::Ok)
        .unwrap();
    let failed = VoteOutcome::Failed {
        reason: "peer closed".into(),
    };
    let r = s.vote(&roster[1], Generation(1), 0, &failed).unwrap();
    assert!(matches!(r, VoteResult::Abort { step: 0, .. }), "{r:?}");
    assert_eq!(s.cursor(), Cursor::default());
    assert!(s.ledger().entries.is_empty());
    // The same samples are re-run, re-split over the survivor.
    let again = s.open(t, Generation(2), &roster[..1]).unwrap();
    let before: Vec<u64> = first
        .iter()
        .flat_map(|a| a.micro_batches.concat())
        .collect();
    assert_eq!(again[0].micro_batches.concat(), before);
}

#[test]
fn votes_for_another_step_or_generation_or_from_outsiders_are_refused() {
    let t = Instant::now();
    let roster = ws(&["a", "b"]);
    let mut s = StepState::new(schedule(10, 4, 2));
    assert!(s
        .vote(&roster[0], Generation(1), 0, &VoteOutcome::Ok)
        .is_err());
    s.open(t, Generation(1), &roster).unwrap();
    assert!(matches!(
        s.vote(&roster[0], Generation(0), 0, &VoteOutcome::Ok),
        Err(StepError::NotTheOpenStep { .. })
    ));
    assert!(matches!(
        s.vote(&roster[0], Generation(1), 1, &VoteOutcome::Ok),
        Err(StepError::NotTheOpenStep { .. })
    ));
    assert_eq!(
        s.vote(&WorkerId::from("z"), Generation(1), 0, &VoteOutcome::Ok),
        Err(StepError::NotAVoter {
            worker: WorkerId::from("z")
        })
    );
    assert_eq!(
        s.open(t, Generation(1), &roster),
        Err(StepError::AlreadyOpen { step: 0 })
    );
}

#[test]
fn the_global_batch_stays_fixed_when_the_world_shrinks() {
    let t = Instant::now();
    let mut s = StepState::new(schedule(64, 16, 8));
    let two = s.open(t, Generation(1), &ws(&["a", "b"])).unwrap();
    assert!(two.iter().all(|a| a.micro_batches.len() == 1));
    assert!(two.iter().all(|a| a.step_samples == 16));
    s.abort(AbortReason::Timeout);
    let one = s.open(t, Generation(2), &ws(&["a"])).unwrap();
    assert_eq!(
        one[0].micro_batches.len(),
        2,
        "accumulates two micro-batches"
    );
    assert_eq!(one[0].micro_batches.concat().len(), 16);
}

#[test]
fn churn_with_aborts_still_covers_every_epoch_exactly_once() {
    let t = Instant::now();
    let cfg = schedule(23, 5, 2);
    let mut s = StepState::new(cfg.clone());
    let rosters = [ws(&["a", "b", "c"]), ws(&["a", "c"]), ws(&["c"])];
    let mut round = 0usize;
    while !s.is_finished() {
        let roster = &rosters[round % rosters.len()];
        let generation = Generation(round as u64);
        s.open(t, generation, roster).unwrap();
        if round % 4 == 3 {
            let open = s.open_step().unwrap().clone();
            let failed = VoteOutcome::Failed { reason: "x".into() };
            s.vote(&roster[0], generation, open.step, &failed).unwrap();
        } else {
            assert!(matches!(
                all_vote_ok(&mut s, roster),
                VoteResult::Commit { .. }
            ));
        }
        round += 1;
    }
    assert_eq!(s.cursor().step, cfg.total_steps());
    let summary = s.ledger().summary();
    assert_eq!(summary.len(), 2);
    for epoch in summary {
        assert!(epoch.is_exact(), "{epoch}");
    }
    assert_eq!(
        s.open(t, Generation(9), &rosters[0]),
        Err(StepError::Finished)
    );
}

#[test]
fn a_step_times_out_only_after_the_step_timeout() {
    let t = Instant::now();
    let mut s = StepState::new(schedule(10, 4, 2));
    s.open(t, Generation(1), &ws(&["a"])).unwrap();
    let timeout = Duration::from_secs(10);
    assert!(!s.timed_out(t + Duration::from_secs(9), timeout));
    assert!(s.timed_out(t + timeout, timeout));
}

#[test]
fn checkpoints_are_due_periodically_and_after_the_last_step() {
    let cfg = ScheduleConfig {
        checkpoint_every_steps: Some(2),
        ..schedule(10, 4, 2)
    };
    let s = StepState::new(cfg);
    let due: Vec<u64> = (0..6).filter(|step| s.checkpoint_due(*step)).collect();
    assert_eq!(due, vec![1, 3, 5]);
}

#[test]
fn invalid_schedules_name_the_key() {
    let bad = ScheduleConfig {
        global_batch: 0,
        ..schedule(10, 4, 2)
    };
    assert_eq!(bad.validate().unwrap_err().0, "schedule.global_batch");
    assert!(schedule(10, 4, 2).validate().is_ok());
}
