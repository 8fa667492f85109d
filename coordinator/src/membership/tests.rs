//! Membership transitions and decisions, with an injected clock.

use super::*;

fn cfg() -> MembershipConfig {
    MembershipConfig {
        expected_workers: 2,
        min_workers: 1,
        max_workers: 3,
        heartbeat_timeout: Duration::from_secs(3),
        join_timeout: Duration::from_secs(10),
        rendezvous_timeout: Duration::from_secs(20),
        probe_timeout: Duration::from_millis(500),
    }
}

fn store() -> StoreEndpoint {
    StoreEndpoint {
        host: "127.0.0.1".into(),
        port: 1,
    }
}

fn w(name: &str) -> WorkerId {
    WorkerId::from(name)
}

/// Test clock: `t.at(1500)` is 1.5 s after the start.
struct Clock(Instant);

impl Clock {
    fn at(&self, ms: u64) -> Instant {
        self.0 + Duration::from_millis(ms)
    }
}

/// A state with `names` joined at time 0, one session each.
fn joined(t: &Clock, names: &[&str]) -> MembershipState {
    let mut s = MembershipState::new();
    for (i, n) in names.iter().enumerate() {
        s.join(t.at(0), w(n), SessionKey(i as u64), store(), &cfg())
            .unwrap();
    }
    s
}

/// A state training generation 1 with `names`, every rank ready.
fn training(t: &Clock, names: &[&str]) -> MembershipState {
    let mut s = joined(t, names);
    s.form_generation(t.at(0));
    for n in names {
        s.group_ready(&w(n), Generation(1)).unwrap();
    }
    s.start_training();
    s
}

fn heartbeat_all(s: &mut MembershipState, now: Instant) {
    let keys: Vec<(WorkerId, SessionKey)> = s
        .members
        .iter()
        .map(|(w, m)| (w.clone(), m.session))
        .collect();
    for (worker, session) in keys {
        s.heartbeat(now, &worker, session);
    }
}

#[test]
fn first_generation_waits_for_the_expected_workers() {
    let t = Clock(Instant::now());
    let s = joined(&t, &["a"]);
    let d = decide(t.at(100), &s, &cfg());
    assert_eq!(d.action, Action::Wait);
    assert_eq!(
        d.reason,
        Reason::WaitingForExpected {
            have: 1,
            expected: 2
        }
    );
    let s = joined(&t, &["a", "b"]);
    assert_eq!(decide(t.at(100), &s, &cfg()).action, Action::FormGeneration);
}

#[test]
fn after_the_join_timeout_the_minimum_is_enough() {
    let t = Clock(Instant::now());
    let mut s = joined(&t, &["a"]);
    heartbeat_all(&mut s, t.at(10_000));
    assert_eq!(
        decide(t.at(10_000), &s, &cfg()).action,
        Action::FormGeneration
    );
}

#[test]
fn forming_a_generation_bumps_it_and_orders_ranks_by_admission() {
    let t = Clock(Instant::now());
    let mut s = joined(&t, &["zed", "amy"]);
    let roster = s.form_generation(t.at(0)).to_vec();
    assert_eq!(roster, vec![w("zed"), w("amy")]);
    assert_eq!(s.generation, Generation(1));
    assert!(s.phase.is_forming());
    assert_eq!(s.rank_of(&w("amy")), Some(1));
}

#[test]
fn training_starts_only_when_every_rank_is_ready() {
    let t = Clock(Instant::now());
    let mut s = joined(&t, &["a", "b"]);
    s.form_generation(t.at(0));
    s.group_ready(&w("a"), Generation(1)).unwrap();
    let d = decide(t.at(50), &s, &cfg());
    assert_eq!(d.reason, Reason::Forming { ready: 1, of: 2 });
    s.group_ready(&w("b"), Generation(1)).unwrap();
    assert_eq!(decide(t.at(50), &s, &cfg()).action, Action::StartTraining);
}

#[test]
fn a_ready_report_for_an_old_generation_is_refused() {
    let t = Clock(Instant::now());
    let mut s = joined(&t, &["a", "b"]);
    s.form_generation(t.at(0));
    s.form_generation(t.at(0));
    let err = s.group_ready(&w("a"), Generation(1)).unwrap_err();
    assert_eq!(
        err,
        MembershipError::StaleGeneration {
            worker: w("a"),
            got: Generation(1),
            current: Generation(2)
        }
    );
}

#[test]
fn a_rank_that_never_gets_ready_is_dropped_at_the_rendezvous_timeout() {
    let t = Clock(Instant::now());
    let mut s = joined(&t, &["a", "b"]);
    s.form_generation(t.at(0));
    s.group_ready(&w("a"), Generation(1)).unwrap();
    heartbeat_all(&mut s, t.at(20_000));
    let d = decide(t.at(20_000), &s, &cfg());
    assert_eq!(
        d.action,
        Action::DeclareDead {
            workers: vec![w("b")]
        }
    );
    assert_eq!(d.reason, Reason::RendezvousTimeout);
}

#[test]
fn a_steady_generation_does_nothing() {
    let t = Clock(Instant::now());
    let mut s = training(&t, &["a", "b"]);
    heartbeat_all(&mut s, t.at(2_000));
    let d = decide(t.at(4_000), &s, &cfg());
    assert_eq!((d.action, d.reason), (Action::Wait, Reason::Steady));
}

#[test]
fn a_silent_worker_is_declared_dead_just_after_the_heartbeat_timeout() {
    let t = Clock(Instant::now());
    let mut s = training(&t, &["a", "b"]);
    s.heartbeat(t.at(2_500), &w("a"), SessionKey(0));
    assert_eq!(decide(t.at(3_000), &s, &cfg()).action, Action::Wait);
    let d = decide(t.at(3_001), &s, &cfg());
    assert_eq!(
        d.action,
        Action::DeclareDead {
            workers: vec![w("b")]
        }
    );
    assert_eq!(d.reason, Reason::HeartbeatTimeout);
}

#[test]
fn losing_a_member_forms_the_next_generation_with_the_survivors() {
    let t = Clock(Instant::now());
    let mut s = training(&t, &["a", "b", "c"]);
    assert!(s.remove(&w("a"), Some(SessionKey(0))));
    let d = decide(t.at(10), &s, &cfg());
    assert_eq!(d.action, Action::FormGeneration);
    assert_eq!(d.reason, Reason::MembershipChanged { joined: 0, left: 1 });
    let roster = s.form_generation(t.at(10)).to_vec();
    assert_eq!(roster, vec![w("b"), w("c")], "survivors keep their order");
    assert_eq!(s.generation, Generation(2));
}

#[test]
fn a_newcomer_waits_for_the_open_step_to_end() {
    let t = Clock(Instant::now());
    let mut s = training(&t, &["a", "b"]);
    s.step_open = true;
    s.join(t.at(5), w("c"), SessionKey(9), store(), &cfg())
        .unwrap();
    heartbeat_all(&mut s, t.at(5));
    assert_eq!(
        decide(t.at(5), &s, &cfg()).reason,
        Reason::WaitingForStepBoundary
    );
    s.step_open = false;
    let d = decide(t.at(6), &s, &cfg());
    assert_eq!(d.action, Action::FormGeneration);
    assert_eq!(d.reason, Reason::MembershipChanged { joined: 1, left: 0 });
    assert_eq!(s.form_generation(t.at(6)).last(), Some(&w("c")));
}

#[test]
fn a_generation_number_changes_only_when_a_generation_is_formed() {
    let t = Clock(Instant::now());
    let mut s = training(&t, &["a", "b"]);
    heartbeat_all(&mut s, t.at(1_000));
    s.step_open = true;
    s.step_open = false;
    assert_eq!(decide(t.at(1_000), &s, &cfg()).action, Action::Wait);
    assert_eq!(s.generation, Generation(1));
}

#[test]
fn too_few_workers_pause_the_job() {
    let t = Clock(Instant::now());
    let cfg = MembershipConfig {
        min_workers: 2,
        ..cfg()
    };
    let mut s = training(&t, &["a", "b"]);
    s.remove(&w("b"), None);
    let d = decide(t.at(1), &s, &cfg);
    assert_eq!(d.action, Action::Pause);
    s.pause();
    assert_eq!(
        decide(t.at(2), &s, &cfg).reason,
        Reason::BelowMinWorkers { have: 1, need: 2 }
    );
    s.join(t.at(3), w("c"), SessionKey(7), store(), &cfg)
        .unwrap();
    assert_eq!(decide(t.at(3), &s, &cfg).action, Action::FormGeneration);
}

#[test]
fn joins_beyond_the_maximum_are_refused_but_a_reconnect_replaces_its_session() {
    let t = Clock(Instant::now());
    let mut s = training(&t, &["a", "b", "c"]);
    assert_eq!(
        s.join(t.at(1), w("d"), SessionKey(10), store(), &cfg()),
        Err(MembershipError::JobFull { max_workers: 3 })
    );
    let replaced = s
        .join(t.at(1), w("b"), SessionKey(11), store(), &cfg())
        .unwrap();
    assert_eq!(replaced, Some(SessionKey(1)));
    assert!(
        !s.remove(&w("b"), Some(SessionKey(1))),
        "old session is stale"
    );
    assert!(s.members.contains_key(&w("b")));
    assert_eq!(
        decide(t.at(1), &s, &cfg()).action,
        Action::FormGeneration,
        "the reconnected worker needs a new group"
    );
}

#[test]
fn a_probe_answered_by_everyone_regroups_the_same_members() {
    let t = Clock(Instant::now());
    let mut s = training(&t, &["a", "b"]);
    s.start_probe(t.at(100), 42);
    s.probe_ack(t.at(110), &w("a"), 42);
    assert_eq!(
        decide(t.at(120), &s, &cfg()).reason,
        Reason::Probing { acked: 1, of: 2 }
    );
    s.probe_ack(t.at(130), &w("b"), 41); // an old probe's answer does not count
    assert_eq!(decide(t.at(130), &s, &cfg()).action, Action::Wait);
    s.probe_ack(t.at(140), &w("b"), 42);
    let d = decide(t.at(140), &s, &cfg());
    assert_eq!(
        (d.action, d.reason),
        (Action::FormGeneration, Reason::GroupBroken)
    );
}

#[test]
fn a_worker_joining_during_a_probe_is_not_taken_for_dead() {
    let t = Clock(Instant::now());
    let mut s = training(&t, &["a"]);
    s.start_probe(t.at(100), 3);
    s.join(t.at(150), w("late"), SessionKey(8), store(), &cfg())
        .unwrap();
    s.probe_ack(t.at(160), &w("a"), 3);
    let d = decide(t.at(700), &s, &cfg());
    assert_eq!(d.action, Action::FormGeneration);
    assert_eq!(d.reason, Reason::MembershipChanged { joined: 1, left: 0 });
}

#[test]
fn a_member_silent_to_the_probe_is_declared_dead_at_the_probe_timeout() {
    let t = Clock(Instant::now());
    let mut s = training(&t, &["a", "b"]);
    heartbeat_all(&mut s, t.at(100));
    s.start_probe(t.at(100), 1);
    s.probe_ack(t.at(110), &w("a"), 1);
    assert_eq!(decide(t.at(599), &s, &cfg()).action, Action::Wait);
    let d = decide(t.at(600), &s, &cfg());
    assert_eq!(
        d.action,
        Action::DeclareDead {
            workers: vec![w("b")]
        }
    );
    assert_eq!(d.reason, Reason::ProbeTimeout);
}

#[test]
fn a_finished_job_decides_nothing_and_refuses_joins() {
    let t = Clock(Instant::now());
    let mut s = training(&t, &["a"]);
    s.finish();
    assert_eq!(decide(t.at(60_000), &s, &cfg()).reason, Reason::Finished);
    assert_eq!(
        s.join(t.at(1), w("z"), SessionKey(5), store(), &cfg()),
        Err(MembershipError::Finished)
    );
}

#[test]
fn decisions_print_with_their_context() {
    let t = Clock(Instant::now());
    let s = joined(&t, &["a"]);
    let d = decide(t.at(1), &s, &cfg());
    assert_eq!(
        d.to_string(),
        "g0 members=1 phase=waiting_for_workers: 1 of 2 expected workers joined"
    );
}
