//! Just-in-time checkpoints (spot preemption): when a worker leaves (SIGTERM) and no other member
//! holds the training state, every step committed since the newest checkpoint would be lost
//! with it. [`needs_jit_checkpoint`] decides, as a pure function of the membership and the step
//! counts, whether the job actor lets the worker go at once, orders it to checkpoint first, or
//! waits for the checkpoint it is already writing.

use crate::membership::MembershipState;
use eqim_common::proto::WorkerId;
use std::fmt;

/// What to do with a worker that announced it is leaving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JitDecision {
    /// Remove it now: the state survives elsewhere, or nothing new would be saved.
    RemoveNow(NoJitReason),
    /// Order it to write the state after `steps` committed steps, then remove it.
    Order { steps: u64 },
    /// Its checkpoint after `steps` committed steps is ordered but not reported yet: wait for
    /// the report, then remove it.
    AwaitPending { steps: u64 },
}

/// Why a leaving worker is removed without a just-in-time checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoJitReason {
    /// It holds no rank of the current generation, so it has no state the job needs.
    NotARank,
    /// Another rank of the current generation is still a member and holds the state.
    OtherHolder,
    /// No step was committed since the newest checkpoint (or the job has none).
    NothingNew,
    /// The schedule is complete; the final checkpoint was ordered with the last commit.
    Finished,
}

impl fmt::Display for NoJitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NoJitReason::NotARank => "not a rank of the current generation",
            NoJitReason::OtherHolder => "another member holds the training state",
            NoJitReason::NothingNew => "no step committed since the newest checkpoint",
            NoJitReason::Finished => "the schedule is complete",
        })
    }
}

/// Decides about `leaver`, which announced it is leaving while `committed_steps` steps are
/// committed. `newest_checkpoint` is the step count of the newest checkpoint that is complete
/// (or resumed from) or that the leaver itself is writing, and `pending` whether it is the
/// latter (not reported yet). A checkpoint ordered from a member already gone does not count:
/// it will never be written.
///
/// A holder of the state is another rank of the current generation that is still a member and
/// reported its group ready (it applied the state of the committed step). Newcomers still
/// syncing do not count: they would have received the state from the leaver.
pub fn needs_jit_checkpoint(
    leaver: &WorkerId,
    membership: &MembershipState,
    committed_steps: u64,
    newest_checkpoint: u64,
    pending: bool,
) -> JitDecision {
    if membership.phase.is_finished() {
        return JitDecision::RemoveNow(NoJitReason::Finished);
    }
    if membership.rank_of(leaver).is_none() {
        return JitDecision::RemoveNow(NoJitReason::NotARank);
    }
    let other_holder = membership
        .roster
        .iter()
        .any(|w| w != leaver && membership.members.get(w).is_some_and(|m| m.ready));
    if other_holder {
        return JitDecision::RemoveNow(NoJitReason::OtherHolder);
    }
    if committed_steps > newest_checkpoint {
        return JitDecision::Order {
            steps: committed_steps,
        };
    }
    if pending && committed_steps == newest_checkpoint && committed_steps > 0 {
        return JitDecision::AwaitPending {
            steps: committed_steps,
        };
    }
    JitDecision::RemoveNow(NoJitReason::NothingNew)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::{MembershipConfig, SessionKey};
    use eqim_common::proto::StoreEndpoint;
    use std::time::{Duration, Instant};

    fn cfg() -> MembershipConfig {
        MembershipConfig {
            expected_workers: 1,
            min_workers: 1,
            max_workers: 4,
            heartbeat_timeout: Duration::from_secs(1),
            join_timeout: Duration::from_secs(1),
            rendezvous_timeout: Duration::from_secs(1),
            probe_timeout: Duration::from_secs(1),
        }
    }

    /// A training generation of `ready` workers (all reported ready), plus `newcomers` admitted
    /// but not in the roster.
    fn training(ready: &[&str], newcomers: &[&str]) -> MembershipState {
        let now = Instant::now();
        let mut m = MembershipState::new();
        for (i, name) in ready.iter().enumerate() {
            m.join(now, (*name).into(), SessionKey(i as u64), store(), &cfg())
                .unwrap();
        }
        m.form_generation(now);
        let generation = m.generation;
        for name in ready {
            m.group_ready(&(*name).into(), generation).unwrap();
        }
        m.start_training();
        for (i, name) in newcomers.iter().enumerate() {
            m.join(
                now,
                (*name).into(),
                SessionKey(100 + i as u64),
                store(),
                &cfg(),
            )
            .unwrap();
        }
        m
    }

    fn store() -> StoreEndpoint {
        StoreEndpoint {
            host: "127.0.0.1".into(),
            port: 1,
        }
    }

    #[test]
    fn the_last_holder_with_new_steps_is_ordered_to_checkpoint_at_the_committed_step() {
        let m = training(&["a"], &[]);
        let d = needs_jit_checkpoint(&"a".into(), &m, 17, 10, false);
        assert_eq!(d, JitDecision::Order { steps: 17 });
        // Without any checkpoint so far.
        let d = needs_jit_checkpoint(&"a".into(), &m, 3, 0, false);
        assert_eq!(d, JitDecision::Order { steps: 3 });
    }

    #[test]
    fn a_newcomer_that_never_synced_does_not_hold_the_state() {
        let m = training(&["a"], &["late"]);
        let d = needs_jit_checkpoint(&"a".into(), &m, 17, 10, false);
        assert_eq!(d, JitDecision::Order { steps: 17 });
        // The newcomer itself holds no rank: it goes at once.
        let d = needs_jit_checkpoint(&"late".into(), &m, 17, 10, false);
        assert_eq!(d, JitDecision::RemoveNow(NoJitReason::NotARank));
    }

    #[test]
    fn another_ready_rank_keeps_the_state_so_the_leaver_goes_at_once() {
        let mut m = training(&["a", "b"], &[]);
        let d = needs_jit_checkpoint(&"a".into(), &m, 17, 10, false);
        assert_eq!(d, JitDecision::RemoveNow(NoJitReason::OtherHolder));
        // Once b is gone, a is the last holder.
        assert!(m.remove(&"b".into(), None));
        let d = needs_jit_checkpoint(&"a".into(), &m, 17, 10, false);
        assert_eq!(d, JitDecision::Order { steps: 17 });
    }

    #[test]
    fn nothing_committed_since_the_newest_checkpoint_needs_no_new_one() {
        let m = training(&["a"], &[]);
        let d = needs_jit_checkpoint(&"a".into(), &m, 10, 10, false);
        assert_eq!(d, JitDecision::RemoveNow(NoJitReason::NothingNew));
        let d = needs_jit_checkpoint(&"a".into(), &m, 0, 0, false);
        assert_eq!(d, JitDecision::RemoveNow(NoJitReason::NothingNew));
        // The newest one is still being written by the leaver: wait for it.
        let d = needs_jit_checkpoint(&"a".into(), &m, 10, 10, true);
        assert_eq!(d, JitDecision::AwaitPending { steps: 10 });
    }

    #[test]
    fn a_finished_job_lets_its_workers_go() {
        let mut m = training(&["a"], &[]);
        m.finish();
        let d = needs_jit_checkpoint(&"a".into(), &m, 40, 30, false);
        assert_eq!(d, JitDecision::RemoveNow(NoJitReason::Finished));
    }
}
