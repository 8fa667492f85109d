//! The coordinator's own `/metrics` over HTTP, driven by simulated workers over loopback QUIC:
//! membership, joins, committed steps, a worker leaving, and the recovery that follows must show
//! in what Prometheus would scrape.

use eqim_common::client::{Client, ClientConfig};
use eqim_common::config::{parse_config, Validate};
use eqim_common::coordinator_config::CoordinatorConfig;
use eqim_common::metrics as names;
use eqim_common::net::credentials::ClientCredentials;
use eqim_common::proto::{
    CoordinatorToWorker, Generation, StoreEndpoint, VoteOutcome, WorkerId, WorkerToCoordinator,
};
use eqim_coordinator::Coordinator;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(1500);
const WAIT: Duration = Duration::from_secs(10);

/// Parsed from YAML, so optional keys added to the config later need no edit here.
fn config(job_dir: &Path) -> CoordinatorConfig {
    let yaml = format!(
        "bind: 127.0.0.1:0
job_dir: {job_dir}
expected_workers: 2
min_workers: 1
max_workers: 4
metrics_addr: 127.0.0.1:0
timeouts:
  heartbeat_interval: 0.1
  heartbeat_timeout: {heartbeat_timeout}
  quic_idle_timeout: {heartbeat_timeout}
  handshake_timeout: 2
  join_timeout: 30
  rendezvous_timeout: 5
  step_timeout: 5
  probe_timeout: 0.3
  decision_tick_interval: 0.02
schedule:
  dataset_len: 100
  global_batch: 4
  micro_batch: 2
  epochs: 1
  seed: 3
",
        job_dir = job_dir.display(),
        heartbeat_timeout = HEARTBEAT_TIMEOUT.as_secs_f64()
    );
    let cfg: CoordinatorConfig = parse_config(Path::new("coordinator.yaml"), &yaml).unwrap();
    cfg.validate().unwrap();
    cfg
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

/// Plays a healthy worker (ready on welcome, ok on every assignment) until a step of
/// `generation` is committed; returns that step.
async fn train_until_commit_in(client: &mut Client, generation: Generation) -> u64 {
    loop {
        match next(client).await {
            CoordinatorToWorker::Welcome { generation: g, .. } => client
                .send(&WorkerToCoordinator::GroupReady { generation: g })
                .await
                .unwrap(),
            CoordinatorToWorker::Assign(a) => client
                .send(&WorkerToCoordinator::Vote {
                    generation: a.generation,
                    step: a.step,
                    outcome: VoteOutcome::Ok,
                })
                .await
                .unwrap(),
            CoordinatorToWorker::Commit {
                generation: g,
                step,
                ..
            } if g == generation => return step,
            _ => {}
        }
    }
}

/// GET /metrics, parsed into (series with labels, value); panics on anything but a 200.
async fn scrape(addr: SocketAddr) -> Vec<(String, f64)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("head and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample");
            (series.to_string(), value.parse().expect("value"))
        })
        .collect()
}

/// The value of the one series named `name` whose labels contain `label` (e.g. `reason="left"`).
fn value(samples: &[(String, f64)], name: &str, label: &str) -> f64 {
    let found: Vec<f64> = samples
        .iter()
        .filter(|(s, _)| s.split('{').next() == Some(name) && s.contains(label))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(found.len(), 1, "{name} {label}: {found:?}");
    found[0]
}

#[tokio::test]
async fn coordinator_metrics_follow_joins_commits_a_leave_and_the_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(config(dir.path())).await.unwrap();
    let addr = c
        .metrics_addr
        .expect("metrics_addr set, so /metrics is served");
    assert_ne!(addr.port(), 0, "the bound port is reported");

    // Before anyone joins: every series exists, at its starting value.
    let s = scrape(addr).await;
    assert_eq!(
        value(&s, names::WORKER_JOINS_TOTAL, "role=\"coordinator\""),
        0.0
    );
    assert_eq!(value(&s, names::EPOCH_SAMPLES, "job=\"eqim\""), 100.0);
    for reason in names::DEATH_REASONS {
        let label = format!("reason=\"{reason}\"");
        assert_eq!(value(&s, names::WORKER_DEATHS_TOTAL, &label), 0.0);
    }

    let mut a = Client::connect(client_config(&c, "a")).await.unwrap();
    let mut b = Client::connect(client_config(&c, "b")).await.unwrap();
    let first = Generation(1);
    let (step_a, step_b) = tokio::join!(
        train_until_commit_in(&mut a, first),
        train_until_commit_in(&mut b, first)
    );
    assert_eq!((step_a, step_b), (0, 0));
    let s = scrape(addr).await;
    assert_eq!(value(&s, names::MEMBERSHIP_SIZE, ""), 2.0);
    assert_eq!(value(&s, names::MEMBERSHIP_GENERATION, ""), 1.0);
    assert_eq!(value(&s, names::WORKER_JOINS_TOTAL, ""), 2.0);
    assert_eq!(value(&s, names::COMMITTED_STEP, ""), 1.0);
    assert_eq!(value(&s, names::EPOCH_SAMPLES_CONSUMED, ""), 4.0);
    assert_eq!(value(&s, names::RECOVERIES_TOTAL, ""), 0.0);

    // b leaves while step 1 is open: the step aborts, generation 2 forms with a alone, and the
    // first commit there completes one recovery.
    b.leave(first, "test").await.unwrap();
    let step = train_until_commit_in(&mut a, Generation(2)).await;
    assert_eq!(step, 1, "the aborted step is redone");
    let s = scrape(addr).await;
    assert_eq!(value(&s, names::MEMBERSHIP_SIZE, ""), 1.0);
    assert_eq!(value(&s, names::MEMBERSHIP_GENERATION, ""), 2.0);
    assert_eq!(value(&s, names::WORKER_JOINS_TOTAL, ""), 2.0);
    assert_eq!(
        value(&s, names::WORKER_DEATHS_TOTAL, "reason=\"left\""),
        1.0
    );
    let disconnected = format!("reason=\"{}\"", names::DEATH_DISCONNECTED);
    assert_eq!(value(&s, names::WORKER_DEATHS_TOTAL, &disconnected), 0.0);
    assert_eq!(value(&s, names::RECOVERIES_TOTAL, ""), 1.0);
    let recovery_count = format!("{}_count", names::RECOVERY_DURATION_SECONDS);
    assert_eq!(value(&s, &recovery_count, ""), 1.0);
    let recovery_sum = format!("{}_sum", names::RECOVERY_DURATION_SECONDS);
    let took = value(&s, &recovery_sum, "");
    assert!(
        took > 0.0 && took < WAIT.as_secs_f64(),
        "recovery took {took} s"
    );
    assert_eq!(value(&s, names::COMMITTED_STEP, ""), 2.0);

    a.close().await;
    c.shutdown("test over").await.unwrap();
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "/metrics stops with the coordinator"
    );
}

#[tokio::test]
async fn a_busy_metrics_port_fails_the_start_with_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cfg = config(dir.path());
    cfg.metrics_addr = Some(busy.local_addr().unwrap());
    let err = Coordinator::start(cfg).await.err().expect("port in use");
    let text = format!("{err:#}");
    assert!(
        text.contains(&busy.local_addr().unwrap().to_string()) && text.contains("metrics"),
        "{text}"
    );
}
