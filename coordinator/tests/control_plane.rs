//! End-to-end tests of the control plane over loopback QUIC: admission, framing errors,
//! heartbeat death, and step commits and aborts, with simulated workers.

use eqim_common::client::{connect_quic, Client, ClientConfig, ClientError};
use eqim_common::coordinator_config::{CoordinatorConfig, Timeouts};
use eqim_common::framing::{read_message, write_message};
use eqim_common::net::close_code;
use eqim_common::net::credentials::ClientCredentials;
use eqim_common::net::tls::channel_binding;
use eqim_common::proto::{
    join_proof, CoordinatorToWorker, Generation, Hello, Refusal, StoreEndpoint, VoteOutcome,
    WorkerId, WorkerToCoordinator, PROTOCOL_VERSION,
};
use eqim_common::schedule::ScheduleConfig;
use eqim_coordinator::Coordinator;
use std::path::Path;
use std::time::{Duration, Instant};

const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(600);
const WAIT: Duration = Duration::from_secs(10);

fn config(job_dir: &Path, expected_workers: u32, dataset_len: u64) -> CoordinatorConfig {
    CoordinatorConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        job_dir: job_dir.to_owned(),
        metrics_addr: None,
        expected_workers,
        min_workers: 1,
        max_workers: 4,
        timeouts: Timeouts {
            heartbeat_interval: Duration::from_millis(100),
            heartbeat_timeout: HEARTBEAT_TIMEOUT,
            quic_idle_timeout: HEARTBEAT_TIMEOUT,
            handshake_timeout: Duration::from_secs(2),
            join_timeout: Duration::from_secs(30),
            rendezvous_timeout: Duration::from_secs(5),
            step_timeout: Duration::from_secs(5),
            probe_timeout: Duration::from_millis(300),
            decision_tick_interval: Duration::from_millis(20),
        },
        schedule: ScheduleConfig {
            dataset_len,
            global_batch: 4,
            micro_batch: 2,
            epochs: 1,
            seed: 11,
            checkpoint_every_steps: None,
        },
        eval: None,
    }
}

async fn start(dir: &Path, expected_workers: u32, dataset_len: u64) -> Coordinator {
    Coordinator::start(config(dir, expected_workers, dataset_len))
        .await
        .unwrap()
}

fn client_config(c: &Coordinator, id: &str) -> ClientConfig {
    let creds = ClientCredentials::from_token_file(&c.token_path).unwrap();
    ClientConfig::new(c.local_addr.to_string(), creds, WorkerId::from(id))
        .with_store(StoreEndpoint {
            host: "127.0.0.1".into(),
            port: 40000,
        })
        .with_timeouts(Duration::from_millis(100), HEARTBEAT_TIMEOUT)
}

async fn next(client: &mut Client) -> CoordinatorToWorker {
    tokio::time::timeout(WAIT, client.recv())
        .await
        .expect("coordinator message in time")
        .expect("connection open")
}

/// Receives until `pick` accepts a message (others, such as stale welcomes, are skipped).
async fn next_matching<T>(
    client: &mut Client,
    mut pick: impl FnMut(&CoordinatorToWorker) -> Option<T>,
) -> T {
    loop {
        let msg = next(client).await;
        if let Some(t) = pick(&msg) {
            return t;
        }
    }
}

/// What a simulated worker saw.
#[derive(Debug, Default)]
struct Transcript {
    generations: Vec<Generation>,
    samples_by_step: Vec<(u64, Vec<u64>)>,
    commits: Vec<u64>,
    aborts: Vec<u64>,
    finished: bool,
}

/// Plays a worker: ready on every welcome, votes on every assignment with `vote(step, attempt)`
/// after `step_time`, until `Finished`.
async fn play_slowly(
    mut client: Client,
    step_time: Duration,
    vote: impl Fn(u64, u32) -> VoteOutcome,
) -> Transcript {
    let mut t = Transcript::default();
    let mut attempts: std::collections::BTreeMap<u64, u32> = Default::default();
    loop {
        match next(&mut client).await {
            CoordinatorToWorker::Welcome { generation, .. } => {
                t.generations.push(generation);
                client
                    .send(&WorkerToCoordinator::GroupReady { generation })
                    .await
                    .unwrap();
            }
            CoordinatorToWorker::Assign(a) => {
                let attempt = attempts.entry(a.step).or_default();
                *attempt += 1;
                t.samples_by_step.push((a.step, a.micro_batches.concat()));
                tokio::time::sleep(step_time).await;
                let outcome = vote(a.step, *attempt);
                client
                    .send(&WorkerToCoordinator::Vote {
                        generation: a.generation,
                        step: a.step,
                        outcome,
                    })
                    .await
                    .unwrap();
            }
            CoordinatorToWorker::Commit { step, .. } => t.commits.push(step),
            CoordinatorToWorker::Abort { step, .. } => t.aborts.push(step),
            CoordinatorToWorker::Finished { .. } => {
                t.finished = true;
                client.close().await;
                return t;
            }
            _ => {}
        }
    }
}

async fn play(client: Client, vote: impl Fn(u64, u32) -> VoteOutcome) -> Transcript {
    play_slowly(client, Duration::ZERO, vote).await
}

fn welcome(m: &CoordinatorToWorker) -> Option<(Generation, u32, u32)> {
    match m {
        CoordinatorToWorker::Welcome {
            generation,
            rank,
            world_size,
            ..
        } => Some((*generation, *rank, *world_size)),
        _ => None,
    }
}

#[tokio::test]
async fn a_client_with_the_wrong_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), 1, 8).await;
    let mut cfg = client_config(&c, "intruder");
    cfg.credentials.token = "not-the-job-token-at-all".into();
    match Client::connect(cfg).await {
        Err(ClientError::Refused(Refusal::BadToken)) => {}
        other => panic!("expected a bad-token refusal, got {:?}", other.err()),
    }
    assert!(c.status().await.unwrap().members.is_empty());
    c.shutdown("test over").await.unwrap();
}

#[tokio::test]
async fn a_client_with_a_wrong_protocol_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), 1, 8).await;
    let cfg = client_config(&c, "old").with_protocol_version(PROTOCOL_VERSION + 1);
    match Client::connect(cfg).await {
        Err(ClientError::Refused(Refusal::ProtocolVersion { expected, got })) => {
            assert_eq!((expected, got), (PROTOCOL_VERSION, PROTOCOL_VERSION + 1));
        }
        other => panic!("expected a version refusal, got {:?}", other.err()),
    }
    c.shutdown("test over").await.unwrap();
}

#[tokio::test]
async fn a_client_pinning_another_certificate_does_not_connect() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), 1, 8).await;
    let mut cfg = client_config(&c, "w");
    cfg.credentials.cert_sha256[0] ^= 1;
    let err = Client::connect(cfg).await.err().expect("must fail");
    assert!(
        matches!(err, ClientError::Connection(_)),
        "TLS must fail: {err}"
    );
    c.shutdown("test over").await.unwrap();
}

#[tokio::test]
async fn an_oversized_frame_closes_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), 2, 8).await;
    let mut good = Client::connect(client_config(&c, "good")).await.unwrap();

    // A second, admitted worker that then sends a frame announcing 4 GiB.
    let bad_cfg = client_config(&c, "bad");
    let (_endpoint, bad) = connect_quic(&bad_cfg).await.unwrap();
    let (mut send, mut recv) = bad.open_bi().await.unwrap();
    let hello = WorkerToCoordinator::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        worker_id: WorkerId::from("bad"),
        token_proof: join_proof(
            &bad_cfg.credentials.token,
            &c.cert_sha256,
            &channel_binding(&bad).unwrap(),
        ),
        store: bad_cfg.store.clone(),
        device: String::new(),
    });
    write_message(&mut send, &hello).await.unwrap();
    let admitted: Option<CoordinatorToWorker> = read_message(&mut recv).await.unwrap();
    assert!(matches!(
        admitted,
        Some(CoordinatorToWorker::Admitted { .. })
    ));
    // Both are members now: generation 1 is formed with both.
    let g1 = next_matching(&mut good, |m| match m {
        CoordinatorToWorker::Welcome { generation, .. } => Some(*generation),
        _ => None,
    })
    .await;
    send.write_all(&[0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3])
        .await
        .unwrap();
    let closed = tokio::time::timeout(WAIT, bad.closed()).await.unwrap();
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, close_code::PROTOCOL_ERROR.into());
            let reason = String::from_utf8_lossy(&close.reason);
            assert!(reason.contains("exceeds the limit"), "{reason}");
        }
        other => panic!("expected an application close, got {other}"),
    }

    // The good worker is welcomed into a new generation without the bad one, and trains.
    let (g2, world) = next_matching(&mut good, |m| match m {
        CoordinatorToWorker::Welcome {
            generation,
            world_size,
            ..
        } => Some((*generation, *world_size)),
        _ => None,
    })
    .await;
    assert!(g2 > g1);
    assert_eq!(world, 1);
    good.send(&WorkerToCoordinator::GroupReady { generation: g2 })
        .await
        .unwrap();
    let assign = next_matching(&mut good, |m| match m {
        CoordinatorToWorker::Assign(a) => Some(a.clone()),
        _ => None,
    })
    .await;
    assert_eq!(assign.micro_batches.concat().len(), 4);
    good.send(&WorkerToCoordinator::Vote {
        generation: g2,
        step: assign.step,
        outcome: VoteOutcome::Ok,
    })
    .await
    .unwrap();
    let committed = next_matching(&mut good, |m| match m {
        CoordinatorToWorker::Commit { step, .. } => Some(*step),
        _ => None,
    })
    .await;
    assert_eq!(committed, assign.step);
    assert_eq!(
        c.status().await.unwrap().members,
        vec![WorkerId::from("good")]
    );
    c.shutdown("test over").await.unwrap();
}

#[tokio::test]
async fn a_silent_client_is_declared_dead_within_the_heartbeat_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), 2, 8).await;
    let mut a = Client::connect(client_config(&c, "a")).await.unwrap();
    let b = Client::connect(client_config(&c, "b")).await.unwrap();
    let g1 = next_matching(&mut a, |m| match m {
        CoordinatorToWorker::Welcome { generation, .. } => Some(*generation),
        _ => None,
    })
    .await;
    // b's QUIC keep-alives continue; only the missing heartbeats can reveal it.
    b.stop_heartbeats();
    let silent_since = Instant::now();
    let (g2, world) = next_matching(&mut a, |m| match m {
        CoordinatorToWorker::Welcome {
            generation,
            world_size,
            ..
        } => Some((*generation, *world_size)),
        _ => None,
    })
    .await;
    let detected_after = silent_since.elapsed();
    assert_eq!(g2, g1.next(), "the generation bumps once");
    assert_eq!(world, 1);
    // The last heartbeat was at most one interval before `stop_heartbeats`; the decision tick
    // (20 ms) and loopback delivery add a little.
    assert!(
        detected_after <= HEARTBEAT_TIMEOUT + Duration::from_millis(400),
        "detected after {detected_after:?}"
    );
    eprintln!(
        "silent worker declared dead after {detected_after:?} (timeout {HEARTBEAT_TIMEOUT:?})"
    );
    let status = c.status().await.unwrap();
    assert_eq!(status.members, vec![WorkerId::from("a")]);
    assert_eq!(status.generation, g2);
    c.shutdown("test over").await.unwrap();
}

#[tokio::test]
async fn two_workers_vote_ok_and_every_step_commits_until_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), 2, 10).await;
    let a = Client::connect(client_config(&c, "a")).await.unwrap();
    let b = Client::connect(client_config(&c, "b")).await.unwrap();
    let ok = |_, _| VoteOutcome::Ok;
    let (ta, tb) = tokio::join!(play(a, ok), play(b, ok));
    let outcome = tokio::time::timeout(WAIT, c.wait()).await.unwrap().unwrap();

    assert!(ta.finished && tb.finished);
    assert_eq!(
        ta.commits,
        vec![0, 1, 2],
        "10 samples in batches of 4: 3 steps"
    );
    assert_eq!(tb.commits, ta.commits);
    assert!(ta.aborts.is_empty() && tb.aborts.is_empty());
    assert_eq!(ta.generations, vec![Generation(1)]);
    for step in 0..3 {
        let mine = |t: &Transcript| t.samples_by_step[step].1.clone();
        let mut both = [mine(&ta), mine(&tb)].concat();
        both.sort_unstable();
        both.dedup();
        assert_eq!(
            both.len(),
            mine(&ta).len() + mine(&tb).len(),
            "disjoint shares"
        );
    }
    assert!(outcome.finished);
    assert_eq!(outcome.cursor.step, 3);
    let coverage = outcome.ledger.summary();
    assert_eq!(coverage.len(), 1);
    assert!(coverage[0].is_exact(), "{}", coverage[0]);
}

#[tokio::test]
async fn one_failed_vote_aborts_the_step_everywhere_and_it_is_redone() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), 2, 8).await;
    let a = Client::connect(client_config(&c, "a")).await.unwrap();
    let b = Client::connect(client_config(&c, "b")).await.unwrap();
    let ok = |_, _| VoteOutcome::Ok;
    // b's all-reduce of step 1 fails the first time.
    let flaky = |step, attempt| {
        if step == 1 && attempt == 1 {
            VoteOutcome::Failed {
                reason: "gloo: connection reset by peer".into(),
            }
        } else {
            VoteOutcome::Ok
        }
    };
    let (ta, tb) = tokio::join!(play(a, ok), play(b, flaky));
    let outcome = tokio::time::timeout(WAIT, c.wait()).await.unwrap().unwrap();

    assert_eq!(
        ta.aborts,
        vec![1],
        "the abort reaches the rank that voted ok"
    );
    assert_eq!(tb.aborts, vec![1]);
    assert_eq!(ta.commits, vec![0, 1]);
    // Everyone answered the probe, so the same members regroup in a new generation.
    assert_eq!(ta.generations, vec![Generation(1), Generation(2)]);
    let step1: Vec<&Vec<u64>> = ta
        .samples_by_step
        .iter()
        .filter(|(s, _)| *s == 1)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(step1.len(), 2);
    assert_eq!(step1[0], step1[1], "the redone step has the same samples");
    assert_eq!(outcome.aborted_steps, 1);
    assert_eq!(outcome.cursor.step, 2);
    assert!(outcome.ledger.summary()[0].is_exact());
    assert_eq!(
        outcome.ledger.entries.len(),
        2,
        "the aborted attempt consumed nothing"
    );
}

#[tokio::test]
async fn a_peer_silent_to_the_probe_is_dropped_well_before_the_heartbeat_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 2, 8);
    // Heartbeats alone would take 3 s; the probe after a failed vote takes 300 ms.
    cfg.timeouts.heartbeat_timeout = Duration::from_secs(3);
    cfg.timeouts.quic_idle_timeout = Duration::from_secs(3);
    let c = Coordinator::start(cfg).await.unwrap();
    let mut a = Client::connect(client_config(&c, "a")).await.unwrap();

    // "frozen": a raw connection that says hello and ready, then never reads or answers again,
    // as a killed process would.
    let frozen_cfg = client_config(&c, "frozen");
    let (_endpoint, frozen) = connect_quic(&frozen_cfg).await.unwrap();
    let (mut send, mut recv) = frozen.open_bi().await.unwrap();
    let hello = WorkerToCoordinator::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        worker_id: WorkerId::from("frozen"),
        token_proof: join_proof(
            &frozen_cfg.credentials.token,
            &c.cert_sha256,
            &channel_binding(&frozen).unwrap(),
        ),
        store: frozen_cfg.store.clone(),
        device: String::new(),
    });
    write_message(&mut send, &hello).await.unwrap();
    let _admitted: Option<CoordinatorToWorker> = read_message(&mut recv).await.unwrap();

    let (g1, _, world) = next_matching(&mut a, welcome).await;
    assert_eq!(world, 2);
    write_message(
        &mut send,
        &WorkerToCoordinator::GroupReady { generation: g1 },
    )
    .await
    .unwrap();
    a.send(&WorkerToCoordinator::GroupReady { generation: g1 })
        .await
        .unwrap();
    let assign = next_matching(&mut a, |m| match m {
        CoordinatorToWorker::Assign(x) => Some(x.clone()),
        _ => None,
    })
    .await;
    // The all-reduce failed on a (its peer is gone).
    let failed_at = Instant::now();
    a.send(&WorkerToCoordinator::Vote {
        generation: g1,
        step: assign.step,
        outcome: VoteOutcome::Failed {
            reason: "peer closed the connection".into(),
        },
    })
    .await
    .unwrap();
    let aborted = next_matching(&mut a, |m| match m {
        CoordinatorToWorker::Abort { step, .. } => Some(*step),
        _ => None,
    })
    .await;
    assert_eq!(aborted, assign.step);
    let (g2, rank, world) = next_matching(&mut a, welcome).await;
    let regrouped_after = failed_at.elapsed();
    eprintln!("failed vote to new generation without the frozen peer: {regrouped_after:?}");
    assert_eq!((g2, rank, world), (g1.next(), 0, 1));
    assert!(
        regrouped_after < Duration::from_secs(1),
        "took {regrouped_after:?}"
    );
    c.shutdown("test over").await.unwrap();
}

#[tokio::test]
async fn a_leaving_worker_is_removed_at_once_and_the_step_is_redone_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), 2, 8).await;
    let mut a = Client::connect(client_config(&c, "a")).await.unwrap();
    let mut b = Client::connect(client_config(&c, "b")).await.unwrap();
    let (g1, _, _) = next_matching(&mut a, welcome).await;
    next_matching(&mut b, welcome).await;
    for client in [&a, &b] {
        client
            .send(&WorkerToCoordinator::GroupReady { generation: g1 })
            .await
            .unwrap();
    }
    let assign = next_matching(&mut a, |m| match m {
        CoordinatorToWorker::Assign(x) => Some(x.clone()),
        _ => None,
    })
    .await;
    let left_at = Instant::now();
    b.leave(g1, "SIGTERM").await.unwrap();
    let aborted = next_matching(&mut a, |m| match m {
        CoordinatorToWorker::Abort { step, reason, .. } => Some((*step, reason.clone())),
        _ => None,
    })
    .await;
    assert_eq!(aborted.0, assign.step);
    assert!(matches!(
        aborted.1,
        eqim_common::proto::AbortReason::MemberLost { .. }
    ));
    let (g2, _, world) = next_matching(&mut a, welcome).await;
    assert_eq!((g2, world), (g1.next(), 1));
    assert!(left_at.elapsed() < HEARTBEAT_TIMEOUT, "no timeout involved");
    c.shutdown("test over").await.unwrap();
}

#[tokio::test]
async fn a_late_joiner_enters_at_a_step_boundary_without_aborting_anything() {
    let dir = tempfile::tempdir().unwrap();
    // One worker expected; 12 steps of 4 samples, 50 ms each.
    let c = start(dir.path(), 1, 48).await;
    let a = Client::connect(client_config(&c, "a")).await.unwrap();
    let ok = |_, _| VoteOutcome::Ok;
    let step_time = Duration::from_millis(50);
    let first = tokio::spawn(play_slowly(a, step_time, ok));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = Client::connect(client_config(&c, "b")).await.unwrap();
    let tb = play_slowly(b, step_time, ok).await;
    let ta = first.await.unwrap();
    let outcome = tokio::time::timeout(WAIT, c.wait()).await.unwrap().unwrap();

    assert!(
        ta.aborts.is_empty() && tb.aborts.is_empty(),
        "{ta:?} {tb:?}"
    );
    assert_eq!(ta.generations, vec![Generation(1), Generation(2)]);
    assert_eq!(tb.generations, vec![Generation(2)]);
    assert!(!tb.commits.is_empty(), "the newcomer trained");
    assert_eq!(ta.commits, (0..12).collect::<Vec<u64>>());
    assert_eq!(outcome.cursor.step, 12);
    assert!(outcome.ledger.summary()[0].is_exact());
}

#[tokio::test]
async fn an_oversized_hello_is_closed_in_the_handshake_and_nobody_else_notices() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), 1, 8).await;
    let mut good = Client::connect(client_config(&c, "good")).await.unwrap();
    let (g1, _, _) = next_matching(&mut good, welcome).await;

    let (_endpoint, bad) = connect_quic(&client_config(&c, "bad")).await.unwrap();
    let (mut send, _recv) = bad.open_bi().await.unwrap();
    send.write_all(&[0x00, 0x10, 0x00, 0x01]).await.unwrap(); // 1 MiB + 1
    match tokio::time::timeout(WAIT, bad.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, close_code::PROTOCOL_ERROR.into());
        }
        other => panic!("expected an application close, got {other}"),
    }
    good.send(&WorkerToCoordinator::GroupReady { generation: g1 })
        .await
        .unwrap();
    let assign = next_matching(&mut good, |m| match m {
        CoordinatorToWorker::Assign(x) => Some(x.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        assign.generation, g1,
        "no generation change for a refused stranger"
    );
    c.shutdown("test over").await.unwrap();
}

#[tokio::test]
async fn a_step_without_all_votes_is_aborted_at_the_step_timeout_and_the_group_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 2, 8);
    cfg.timeouts.step_timeout = Duration::from_millis(300);
    let c = Coordinator::start(cfg).await.unwrap();
    let mut a = Client::connect(client_config(&c, "a")).await.unwrap();
    let mut b = Client::connect(client_config(&c, "b")).await.unwrap();
    let (g1, _, _) = next_matching(&mut a, welcome).await;
    next_matching(&mut b, welcome).await;
    for client in [&a, &b] {
        client
            .send(&WorkerToCoordinator::GroupReady { generation: g1 })
            .await
            .unwrap();
    }
    let assign = next_matching(&mut a, |m| match m {
        CoordinatorToWorker::Assign(x) => Some(x.clone()),
        _ => None,
    })
    .await;
    // Only a votes; b's all-reduce hangs.
    a.send(&WorkerToCoordinator::Vote {
        generation: g1,
        step: assign.step,
        outcome: VoteOutcome::Ok,
    })
    .await
    .unwrap();
    let reason = next_matching(&mut a, |m| match m {
        CoordinatorToWorker::Abort { reason, .. } => Some(reason.clone()),
        _ => None,
    })
    .await;
    assert_eq!(reason, eqim_common::proto::AbortReason::Timeout);
    // Both answer the probe (the client library does it), so both regroup.
    let (g2, _, world) = next_matching(&mut a, welcome).await;
    assert_eq!((g2, world), (g1.next(), 2));
    let status = c.status().await.unwrap();
    assert_eq!(status.cursor.step, 0, "nothing was consumed");
    assert_eq!(status.aborted_steps, 1);
    c.shutdown("test over").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_steps_commit_in_order_on_loopback_and_report_their_cost() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 200u64;
    let c = start(dir.path(), 2, 4 * steps).await;
    let a = Client::connect(client_config(&c, "a")).await.unwrap();
    let b = Client::connect(client_config(&c, "b")).await.unwrap();
    let ok = |_, _| VoteOutcome::Ok;
    let started = Instant::now();
    let (ta, _) = tokio::join!(play(a, ok), play(b, ok));
    let per_step = started.elapsed() / steps as u32;
    eprintln!("{steps} steps with 2 workers: {per_step:?} per step (assign, 2 votes, commit)");
    assert_eq!(ta.commits.len() as u64, steps);
    // No time bound here: speed belongs in benchmarks, and a loaded CI machine must not fail on
    // it. The figure printed above is the measurement.
    let outcome = tokio::time::timeout(WAIT, c.wait()).await.unwrap().unwrap();
    assert!(outcome.ledger.summary()[0].is_exact());
}

#[tokio::test]
async fn a_worker_started_before_the_coordinator_joins_once_it_is_up() {
    let dir = tempfile::tempdir().unwrap();
    // The job's credentials exist first (copied to workers); the coordinator reuses them.
    let creds = eqim_common::net::credentials::JobCredentials::load_or_create(dir.path()).unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client_creds = ClientCredentials::from_token_file(&creds.token_path).unwrap();
    let cfg = ClientConfig::new(
        format!("127.0.0.1:{port}"),
        client_creds,
        WorkerId::from("early"),
    )
    .with_timeouts(Duration::from_millis(100), HEARTBEAT_TIMEOUT);
    let early = tokio::spawn(Client::connect_with_retry(cfg, WAIT));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut coordinator_cfg = config(dir.path(), 1, 8);
    coordinator_cfg.bind.set_port(port);
    let c = Coordinator::start(coordinator_cfg).await.unwrap();
    let mut client = early.await.unwrap().expect("joined after retrying");
    let (generation, rank, _) = next_matching(&mut client, welcome).await;
    assert_eq!((generation, rank), (Generation(1), 0));
    c.shutdown("test over").await.unwrap();
}

#[tokio::test]
async fn a_restarted_worker_replaces_its_old_connection_and_gets_a_new_generation() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), 2, 8).await;
    let mut a = Client::connect(client_config(&c, "a")).await.unwrap();
    let old_b = Client::connect(client_config(&c, "b")).await.unwrap();
    let (g1, _, _) = next_matching(&mut a, welcome).await;
    let mut new_b = Client::connect(client_config(&c, "b")).await.unwrap();
    let (g2, rank, world) = next_matching(&mut new_b, welcome).await;
    assert_eq!((g2, rank, world), (g1.next(), 1, 2));
    let (g2_a, _, _) = next_matching(&mut a, welcome).await;
    assert_eq!(g2_a, g2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    match old_b.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(close)) => {
            assert_eq!(close.error_code, close_code::REPLACED.into())
        }
        other => panic!("old connection should be closed as replaced: {other:?}"),
    }
    c.shutdown("test over").await.unwrap();
}

/// Plays the only worker of a job until `steps` steps are committed and the next one is
/// assigned (left unanswered, so a step is open); returns the client, its generation and the
/// checkpoint orders it saw with the commits.
async fn single_worker_with_an_open_step(
    c: &Coordinator,
    steps: u64,
) -> (Client, Generation, Vec<String>) {
    let mut a = Client::connect(client_config(c, "a")).await.unwrap();
    let mut orders = Vec::new();
    let mut generation = Generation(0);
    loop {
        match next(&mut a).await {
            CoordinatorToWorker::Welcome { generation: g, .. } => {
                generation = g;
                a.send(&WorkerToCoordinator::GroupReady { generation: g })
                    .await
                    .unwrap();
            }
            CoordinatorToWorker::Assign(x) if x.step == steps => return (a, generation, orders),
            CoordinatorToWorker::Assign(x) => {
                let vote = WorkerToCoordinator::Vote {
                    generation: x.generation,
                    step: x.step,
                    outcome: VoteOutcome::Ok,
                };
                a.send(&vote).await.unwrap();
            }
            CoordinatorToWorker::Commit {
                checkpoint: Some(order),
                ..
            } => orders.push(order.name),
            _ => {}
        }
    }
}

/// Writes a stand-in state file into checkpoint `name` and reports it like a worker does.
async fn report_checkpoint(client: &Client, job: &Path, generation: Generation, steps: u64) {
    let dir = job
        .join("checkpoints")
        .join(eqim_common::checkpoint::dir_name(steps));
    std::fs::write(dir.join(eqim_common::checkpoint::STATE_FILE), b"weights").unwrap();
    let file =
        eqim_common::checkpoint::written_file(&dir, eqim_common::checkpoint::STATE_FILE).unwrap();
    client
        .send(&WorkerToCoordinator::CheckpointWritten {
            generation,
            step: steps,
            files: vec![file],
        })
        .await
        .unwrap();
}

/// Every message until the coordinator closes the connection.
async fn until_closed(client: &mut Client) -> Vec<CoordinatorToWorker> {
    let mut seen = Vec::new();
    while let Some(msg) = tokio::time::timeout(WAIT, client.recv())
        .await
        .expect("the coordinator closes the session in time")
    {
        seen.push(msg);
    }
    seen
}

#[tokio::test]
async fn the_last_worker_leaving_is_kept_until_its_just_in_time_checkpoint_is_complete() {
    let dir = tempfile::tempdir().unwrap();
    let c = start(dir.path(), 1, 400).await;
    let (mut a, generation, orders) = single_worker_with_an_open_step(&c, 5).await;
    assert!(orders.is_empty(), "no periodic checkpoint: {orders:?}");
    a.send(&WorkerToCoordinator::Leaving {
        generation,
        reason: "SIGTERM".into(),
    })
    .await
    .unwrap();
    // The open step is dropped first, then the committed state is ordered written.
    let aborted = next_matching(&mut a, |m| match m {
        CoordinatorToWorker::Abort { step, .. } => Some(*step),
        _ => None,
    })
    .await;
    assert_eq!(aborted, 5);
    let order = next(&mut a).await;
    assert_eq!(
        order,
        CoordinatorToWorker::CheckpointNow {
            generation,
            steps: 5,
            name: "step-00000005".into(),
        }
    );
    // Kept as a member (and nothing else happens) until the report.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = c.status().await.unwrap();
    assert_eq!(status.members, vec![WorkerId::from("a")]);
    assert_eq!(status.cursor.step, 5);
    report_checkpoint(&a, dir.path(), generation, 5).await;
    let rest = until_closed(&mut a).await;
    assert!(rest.is_empty(), "{rest:?}");
    let manifest =
        eqim_common::checkpoint::verify(&dir.path().join("checkpoints/step-00000005")).unwrap();
    assert_eq!(manifest.step, 5);
    let status = c.status().await.unwrap();
    assert!(status.members.is_empty(), "{:?}", status.members);
    c.shutdown("test over").await.unwrap();
}

#[tokio::test]
async fn the_last_worker_leaving_during_its_periodic_checkpoint_is_kept_until_that_one_is_done() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1, 400);
    cfg.schedule.checkpoint_every_steps = Some(5);
    let c = Coordinator::start(cfg).await.unwrap();
    // The step-5 checkpoint is ordered with the commit of step 4 and left unreported.
    let (mut a, generation, orders) = single_worker_with_an_open_step(&c, 5).await;
    assert_eq!(orders, vec!["step-00000005".to_string()]);
    a.send(&WorkerToCoordinator::Leaving {
        generation,
        reason: "SIGTERM".into(),
    })
    .await
    .unwrap();
    // The open step is dropped so that no late vote commits past the checkpoint.
    let aborted = next_matching(&mut a, |m| match m {
        CoordinatorToWorker::Abort { step, .. } => Some(*step),
        _ => None,
    })
    .await;
    assert_eq!(aborted, 5);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(c.status().await.unwrap().members, vec![WorkerId::from("a")]);
    report_checkpoint(&a, dir.path(), generation, 5).await;
    let rest = until_closed(&mut a).await;
    assert!(
        !rest
            .iter()
            .any(|m| matches!(m, CoordinatorToWorker::CheckpointNow { .. })),
        "nothing new to checkpoint: {rest:?}"
    );
    eqim_common::checkpoint::verify(&dir.path().join("checkpoints/step-00000005")).unwrap();
    assert!(c.status().await.unwrap().members.is_empty());
    c.shutdown("test over").await.unwrap();
}
