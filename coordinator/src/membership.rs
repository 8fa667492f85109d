//! Who is in the job: members, heartbeats, generations and the job's phase, as plain data with
//! explicit transitions, and [`decide`], the pure function that says what to do next. The job
//! actor feeds events in (join, heartbeat, leave, ready, probe answers), asks [`decide`] on every
//! event and tick, and executes the decision.
//!
//! A generation is the identity of one c10d process group. It is bumped when the membership
//! changes, and also when the group of the current generation broke (a failed vote whose members
//! all turned out alive): gloo cannot reuse a group that threw, so the survivors need a fresh
//! rendezvous either way, and fencing by generation then covers both cases.

use eqim_common::coordinator_config::CoordinatorConfig;
use eqim_common::proto::{Generation, StoreEndpoint, WorkerId};
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

/// Identifies one connection of a worker, so that the end of an old connection does not remove
/// the worker's newer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionKey(pub u64);

/// Limits and timeouts of the membership decision.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    /// Start the first generation as soon as this many workers joined.
    pub expected_workers: u32,
    /// Never train with fewer; pause instead.
    pub min_workers: u32,
    /// Refuse joins beyond this.
    pub max_workers: u32,
    pub heartbeat_timeout: Duration,
    /// At start, train with `min_workers` after waiting this long for `expected_workers`.
    pub join_timeout: Duration,
    pub rendezvous_timeout: Duration,
    pub probe_timeout: Duration,
}

/// One admitted worker.
#[derive(Debug, Clone)]
pub struct Member {
    pub session: SessionKey,
    /// Admission order; newcomers get ranks after the survivors, in this order.
    pub joined_seq: u64,
    pub last_heartbeat: Instant,
    pub store: StoreEndpoint,
    /// Reported `GroupReady` for the current generation.
    pub ready: bool,
    /// Answered the current probe.
    pub probe_acked: bool,
}

/// Phase of the job as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobPhase {
    /// No generation is training: waiting for enough workers.
    WaitingForWorkers,
    /// Welcomes of the current generation are out; waiting for every rank's `GroupReady`.
    Forming { since: Instant },
    /// The current generation runs steps.
    Training,
    /// A vote failed: waiting for every member's probe answer to tell dead from alive.
    Probing { since: Instant, nonce: u64 },
    /// The schedule is complete.
    Finished,
}

impl JobPhase {
    pub fn is_training(self) -> bool {
        matches!(self, JobPhase::Training)
    }
    pub fn is_forming(self) -> bool {
        matches!(self, JobPhase::Forming { .. })
    }
    pub fn is_probing(self) -> bool {
        matches!(self, JobPhase::Probing { .. })
    }
    pub fn is_finished(self) -> bool {
        matches!(self, JobPhase::Finished)
    }
    fn name(self) -> &'static str {
        match self {
            JobPhase::WaitingForWorkers => "waiting_for_workers",
            JobPhase::Forming { .. } => "forming",
            JobPhase::Training => "training",
            JobPhase::Probing { .. } => "probing",
            JobPhase::Finished => "finished",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    #[error("the job already has its maximum of {max_workers} workers")]
    JobFull { max_workers: u32 },
    #[error("the job has finished")]
    Finished,
    #[error("worker {worker} is not a member")]
    UnknownWorker { worker: WorkerId },
    #[error("worker {worker} reported for generation {got}, but the current one is {current}")]
    StaleGeneration {
        worker: WorkerId,
        got: Generation,
        current: Generation,
    },
}

/// The membership, owned by the job actor.
#[derive(Debug, Clone)]
pub struct MembershipState {
    pub members: BTreeMap<WorkerId, Member>,
    pub generation: Generation,
    /// Ranks of the current generation: `roster[r]` is rank r.
    pub roster: Vec<WorkerId>,
    pub phase: JobPhase,
    /// A step of the current generation is assigned and neither committed nor aborted.
    pub step_open: bool,
    first_join: Option<Instant>,
    next_seq: u64,
}

impl Default for MembershipState {
    fn default() -> Self {
        Self::new()
    }
}

impl MembershipState {
    pub fn new() -> Self {
        Self {
            members: BTreeMap::new(),
            generation: Generation(0),
            roster: Vec::new(),
            phase: JobPhase::WaitingForWorkers,
            step_open: false,
            first_join: None,
            next_seq: 0,
        }
    }

    /// Admits `worker`. A worker that reconnects under the same id replaces its old session,
    /// whose key is returned so the caller can close it; for the membership this is a leave and a
    /// join, so the worker gets a new generation (its old group state is gone).
    pub fn join(
        &mut self,
        now: Instant,
        worker: WorkerId,
        session: SessionKey,
        store: StoreEndpoint,
        cfg: &MembershipConfig,
    ) -> Result<Option<SessionKey>, MembershipError> {
        if self.phase.is_finished() {
            return Err(MembershipError::Finished);
        }
        let replaced = self.members.get(&worker).map(|m| m.session);
        if replaced.is_none() && self.members.len() >= cfg.max_workers as usize {
            return Err(MembershipError::JobFull {
                max_workers: cfg.max_workers,
            });
        }
        if replaced.is_some() {
            // Its old rank (if any) is gone: drop it from the roster so the change is seen.
            self.roster.retain(|w| w != &worker);
        }
        self.first_join.get_or_insert(now);
        self.next_seq += 1;
        self.members.insert(
            worker,
            Member {
                session,
                joined_seq: self.next_seq,
                last_heartbeat: now,
                store,
                ready: false,
                // Connecting just now is proof of life: a worker that joins during a probe
                // never received it and must not be declared dead for not answering.
                probe_acked: true,
            },
        );
        Ok(replaced)
    }

    /// Records a heartbeat; heartbeats of a replaced session are ignored.
    pub fn heartbeat(&mut self, now: Instant, worker: &WorkerId, session: SessionKey) {
        if let Some(m) = self.members.get_mut(worker) {
            if m.session == session {
                m.last_heartbeat = now;
            }
        }
    }

    /// Removes a worker that left, died or whose connection ended. Returns whether it was
    /// removed (false for an unknown worker or an already replaced session).
    pub fn remove(&mut self, worker: &WorkerId, session: Option<SessionKey>) -> bool {
        match self.members.get(worker) {
            Some(m) if session.is_none_or(|s| s == m.session) => {
                self.members.remove(worker);
                true
            }
            _ => false,
        }
    }

    /// Whether `worker` holds a rank in the current generation.
    pub fn rank_of(&self, worker: &WorkerId) -> Option<u32> {
        self.roster
            .iter()
            .position(|w| w == worker)
            .map(|r| u32::try_from(r).expect("rank fits in u32"))
    }

    /// Records `GroupReady` from a rank of the current generation.
    pub fn group_ready(
        &mut self,
        worker: &WorkerId,
        generation: Generation,
    ) -> Result<(), MembershipError> {
        self.check_generation(worker, generation)?;
        let member =
            self.members
                .get_mut(worker)
                .ok_or_else(|| MembershipError::UnknownWorker {
                    worker: worker.clone(),
                })?;
        member.ready = true;
        Ok(())
    }

    /// Refuses a message about training from a worker that is not a rank of the current
    /// generation (fencing).
    pub fn check_generation(
        &self,
        worker: &WorkerId,
        generation: Generation,
    ) -> Result<(), MembershipError> {
        if generation != self.generation || self.rank_of(worker).is_none() {
            return Err(MembershipError::StaleGeneration {
                worker: worker.clone(),
                got: generation,
                current: self.generation,
            });
        }
        Ok(())
    }

    /// Starts a liveness probe after a failed vote.
    pub fn start_probe(&mut self, now: Instant, nonce: u64) {
        for m in self.members.values_mut() {
            m.probe_acked = false;
        }
        self.phase = JobPhase::Probing { since: now, nonce };
    }

    /// Records a probe answer; answers to an older probe are ignored.
    pub fn probe_ack(&mut self, now: Instant, worker: &WorkerId, nonce: u64) {
        if let JobPhase::Probing { nonce: current, .. } = self.phase {
            if let Some(m) = self.members.get_mut(worker) {
                // A probe answer is also proof of life.
                m.last_heartbeat = now;
                m.probe_acked |= nonce == current;
            }
        }
    }

    /// Declares generation g+1 with the current members: survivors of the previous roster keep
    /// their order (so rank 0, which serves state to newcomers, is the oldest survivor), then
    /// newcomers in admission order. Returns the new roster.
    pub fn form_generation(&mut self, now: Instant) -> &[WorkerId] {
        let mut roster: Vec<WorkerId> = self
            .roster
            .iter()
            .filter(|w| self.members.contains_key(*w))
            .cloned()
            .collect();
        let mut newcomers: Vec<(&WorkerId, &Member)> = self
            .members
            .iter()
            .filter(|(w, _)| !roster.contains(w))
            .collect();
        newcomers.sort_by_key(|(_, m)| m.joined_seq);
        roster.extend(newcomers.into_iter().map(|(w, _)| w.clone()));
        for m in self.members.values_mut() {
            m.ready = false;
        }
        self.generation = self.generation.next();
        self.roster = roster;
        self.phase = JobPhase::Forming { since: now };
        &self.roster
    }

    pub fn start_training(&mut self) {
        self.phase = JobPhase::Training;
    }

    /// Too few workers: stop training and forget the roster's readiness.
    pub fn pause(&mut self) {
        self.phase = JobPhase::WaitingForWorkers;
    }

    pub fn finish(&mut self) {
        self.phase = JobPhase::Finished;
    }

    /// Whether the members are exactly the roster of the current generation.
    pub fn roster_is_current(&self) -> bool {
        self.roster.len() == self.members.len()
            && self.roster.iter().all(|w| self.members.contains_key(w))
    }
}

/// What the job actor should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do until the next event or tick.
    Wait,
    /// Remove these workers (and close their sessions): they are dead or hung.
    DeclareDead { workers: Vec<WorkerId> },
    /// Call [`MembershipState::form_generation`] and welcome every member with its rank.
    FormGeneration,
    /// Every rank of the current generation is ready: start assigning steps.
    StartTraining,
    /// Fewer than `min_workers` remain: stop assigning steps and tell the members.
    Pause,
}

/// Why [`decide`] chose its action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Finished,
    Steady,
    HeartbeatTimeout,
    ProbeTimeout,
    RendezvousTimeout,
    /// All members answered the probe after a failed vote: the group broke, nobody died.
    GroupBroken,
    MembershipChanged {
        joined: usize,
        left: usize,
    },
    WaitingForStepBoundary,
    BelowMinWorkers {
        have: usize,
        need: u32,
    },
    WaitingForExpected {
        have: usize,
        expected: u32,
    },
    Forming {
        ready: usize,
        of: usize,
    },
    Probing {
        acked: usize,
        of: usize,
    },
    AllReady,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Finished => f.write_str("the job has finished"),
            Reason::Steady => f.write_str("steady"),
            Reason::HeartbeatTimeout => f.write_str("heartbeat timeout"),
            Reason::ProbeTimeout => f.write_str("no answer to the liveness probe"),
            Reason::RendezvousTimeout => f.write_str("rendezvous timeout"),
            Reason::GroupBroken => f.write_str("collective failed but every member is alive"),
            Reason::MembershipChanged { joined, left } => {
                write!(f, "membership changed ({joined} joined, {left} left)")
            }
            Reason::WaitingForStepBoundary => f.write_str("waiting for the open step to end"),
            Reason::BelowMinWorkers { have, need } => {
                write!(f, "{have} workers, fewer than the minimum {need}")
            }
            Reason::WaitingForExpected { have, expected } => {
                write!(f, "{have} of {expected} expected workers joined")
            }
            Reason::Forming { ready, of } => write!(f, "{ready} of {of} ranks ready"),
            Reason::Probing { acked, of } => write!(f, "{acked} of {of} probes answered"),
            Reason::AllReady => f.write_str("every rank is ready"),
        }
    }
}

/// An action, its reason, and the state it was decided in (for one log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub reason: Reason,
    pub generation: Generation,
    pub members: usize,
    pub phase: &'static str,
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} members={} phase={}: {}",
            self.generation, self.members, self.phase, self.reason
        )
    }
}

/// The membership decision: pure, so every rule is tested without a network or a clock.
impl MembershipConfig {
    /// The membership rules of a job's config.
    pub fn from_config(cfg: &CoordinatorConfig) -> Self {
        MembershipConfig {
            expected_workers: cfg.expected_workers,
            min_workers: cfg.min_workers,
            max_workers: cfg.max_workers,
            heartbeat_timeout: cfg.timeouts.heartbeat_timeout,
            join_timeout: cfg.timeouts.join_timeout,
            rendezvous_timeout: cfg.timeouts.rendezvous_timeout,
            probe_timeout: cfg.timeouts.probe_timeout,
        }
    }
}

pub fn decide(now: Instant, s: &MembershipState, c: &MembershipConfig) -> Decision {
    let (action, reason) = decide_action(now, s, c);
    Decision {
        action,
        reason,
        generation: s.generation,
        members: s.members.len(),
        phase: s.phase.name(),
    }
}

fn decide_action(now: Instant, s: &MembershipState, c: &MembershipConfig) -> (Action, Reason) {
    if s.phase.is_finished() {
        return (Action::Wait, Reason::Finished);
    }
    let silent: Vec<WorkerId> = s
        .members
        .iter()
        .filter(|(_, m)| now.saturating_duration_since(m.last_heartbeat) > c.heartbeat_timeout)
        .map(|(w, _)| w.clone())
        .collect();
    if !silent.is_empty() {
        return (
            Action::DeclareDead { workers: silent },
            Reason::HeartbeatTimeout,
        );
    }
    if let JobPhase::Probing { since, .. } = s.phase {
        return decide_probe(now, since, s, c);
    }
    if !s.roster_is_current() {
        return decide_change(now, s, c);
    }
    match s.phase {
        JobPhase::Forming { since } => decide_forming(now, since, s, c),
        JobPhase::WaitingForWorkers if s.members.len() >= c.min_workers as usize => {
            // Paused with an intact roster that is large enough again cannot happen (a pause
            // needs a loss, and a loss changes the roster), but regrouping is the safe answer.
            (
                Action::FormGeneration,
                Reason::MembershipChanged { joined: 0, left: 0 },
            )
        }
        JobPhase::WaitingForWorkers => (
            Action::Wait,
            Reason::BelowMinWorkers {
                have: s.members.len(),
                need: c.min_workers,
            },
        ),
        _ => (Action::Wait, Reason::Steady),
    }
}

fn decide_probe(
    now: Instant,
    since: Instant,
    s: &MembershipState,
    c: &MembershipConfig,
) -> (Action, Reason) {
    let unanswered: Vec<WorkerId> = s
        .members
        .iter()
        .filter(|(_, m)| !m.probe_acked)
        .map(|(w, _)| w.clone())
        .collect();
    if unanswered.is_empty() {
        // Members that disconnected during the probe are gone from `members` already, so the
        // regroup below also covers "a peer died and everyone else answered".
        if s.members.len() < c.min_workers as usize {
            return (
                Action::Pause,
                Reason::BelowMinWorkers {
                    have: s.members.len(),
                    need: c.min_workers,
                },
            );
        }
        let reason = if s.roster_is_current() {
            Reason::GroupBroken
        } else {
            change_reason(s)
        };
        return (Action::FormGeneration, reason);
    }
    if now.saturating_duration_since(since) >= c.probe_timeout {
        return (
            Action::DeclareDead {
                workers: unanswered,
            },
            Reason::ProbeTimeout,
        );
    }
    let of = s.members.len();
    (
        Action::Wait,
        Reason::Probing {
            acked: of - unanswered.len(),
            of,
        },
    )
}

fn change_reason(s: &MembershipState) -> Reason {
    let left = s
        .roster
        .iter()
        .filter(|w| !s.members.contains_key(*w))
        .count();
    let joined = s.members.keys().filter(|w| !s.roster.contains(w)).count();
    Reason::MembershipChanged { joined, left }
}

fn decide_change(now: Instant, s: &MembershipState, c: &MembershipConfig) -> (Action, Reason) {
    if s.step_open {
        // Newcomers wait for the step boundary; a lost member aborts the step before we get here.
        return (Action::Wait, Reason::WaitingForStepBoundary);
    }
    let have = s.members.len();
    if have < c.min_workers as usize {
        let reason = Reason::BelowMinWorkers {
            have,
            need: c.min_workers,
        };
        return match s.phase {
            JobPhase::WaitingForWorkers => (Action::Wait, reason),
            _ => (Action::Pause, reason),
        };
    }
    let first_generation = s.generation == Generation(0);
    let waited_enough = s
        .first_join
        .is_some_and(|t| now.saturating_duration_since(t) >= c.join_timeout);
    if first_generation && have < c.expected_workers as usize && !waited_enough {
        return (
            Action::Wait,
            Reason::WaitingForExpected {
                have,
                expected: c.expected_workers,
            },
        );
    }
    (Action::FormGeneration, change_reason(s))
}

fn decide_forming(
    now: Instant,
    since: Instant,
    s: &MembershipState,
    c: &MembershipConfig,
) -> (Action, Reason) {
    let not_ready: Vec<WorkerId> = s
        .roster
        .iter()
        .filter(|w| s.members.get(*w).is_some_and(|m| !m.ready))
        .cloned()
        .collect();
    if not_ready.is_empty() {
        return (Action::StartTraining, Reason::AllReady);
    }
    if now.saturating_duration_since(since) >= c.rendezvous_timeout {
        return (
            Action::DeclareDead { workers: not_ready },
            Reason::RendezvousTimeout,
        );
    }
    let of = s.roster.len();
    (
        Action::Wait,
        Reason::Forming {
            ready: of - not_ready.len(),
            of,
        },
    )
}

#[cfg(test)]
mod tests;
