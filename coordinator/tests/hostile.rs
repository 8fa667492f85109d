//! Hostile peers against an in-process coordinator (issue 21), driven by the `eqim-hostile`
//! binary that `scripts/hostile-clients` also runs against the real `eqim-coordinator`: an
//! unauthenticated flood stays within the pre-authentication windows and stream counts, a
//! replayed join proof is refused, a frame left half-sent is dropped after the frame timeout, an
//! oversized frame closes its connection; a legitimate worker joins meanwhile every time.

use eqim_common::coordinator_config::{CoordinatorConfig, Timeouts};
use eqim_common::framing::DEFAULT_FRAME_TIMEOUT;
use eqim_common::net::tls::PRE_AUTH_RECEIVE_WINDOW;
use eqim_common::schedule::ScheduleConfig;
use eqim_coordinator::Coordinator;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

fn config(job_dir: &Path) -> CoordinatorConfig {
    CoordinatorConfig {
        bind: "127.0.0.1:0".parse().unwrap(),
        job_dir: job_dir.to_owned(),
        metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
        expected_workers: 2,
        min_workers: 2,
        max_workers: 8,
        timeouts: Timeouts {
            heartbeat_interval: Duration::from_millis(200),
            heartbeat_timeout: Duration::from_secs(3),
            quic_idle_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(2),
            rendezvous_timeout: Duration::from_secs(30),
            ..Timeouts::default()
        },
        schedule: ScheduleConfig {
            dataset_len: 1_000_000,
            global_batch: 4,
            micro_batch: 4,
            epochs: 1,
            seed: 1,
            checkpoint_every_steps: None,
        },
        eval: None,
    }
}

/// Runs one `eqim-hostile` attack and parses its `key=value` report.
async fn attack(c: &Coordinator, args: &[&str]) -> HashMap<String, String> {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_eqim-hostile"));
    cmd.args(["--coordinator", &c.local_addr.to_string()])
        .arg("--token")
        .arg(&c.token_path);
    if let Some(metrics) = c.metrics_addr {
        cmd.args(["--metrics", &metrics.to_string()]);
    }
    let out = cmd.args(args).output().await.expect("running eqim-hostile");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "eqim-hostile {args:?}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fields: HashMap<String, String> = stdout
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(
        fields.get("join").map(String::as_str),
        Some("admitted"),
        "{stdout}"
    );
    assert_eq!(
        fields.get("metrics").map(String::as_str),
        Some("ok"),
        "{stdout}"
    );
    fields
}

fn number(fields: &HashMap<String, String>, key: &str) -> f64 {
    fields[key]
        .parse()
        .unwrap_or_else(|e| panic!("{key}: {e}: {fields:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unauthenticated_flood_gets_one_stream_and_a_small_window_and_a_worker_still_joins() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(config(dir.path())).await.unwrap();
    let r = attack(
        &c,
        &["flood", "--connections", "40", "--duration-ms", "3000"],
    )
    .await;
    assert!(number(&r, "connections") >= 40.0, "{r:?}");
    assert_eq!(
        number(&r, "uni_streams"),
        0.0,
        "no unidirectional stream before auth: {r:?}"
    );
    assert_eq!(
        number(&r, "bidi_streams"),
        number(&r, "connections"),
        "one control stream per connection, no more: {r:?}"
    );
    assert!(
        number(&r, "max_pushed_per_connection") <= f64::from(PRE_AUTH_RECEIVE_WINDOW),
        "an unauthenticated connection got more credit than the pre-auth window: {r:?}"
    );
    // Generous for a loaded 2-core CI machine; scripts/hostile-clients reports the real number.
    assert!(number(&r, "join_ms") < 2000.0, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_proof_replayed_on_another_connection_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(config(dir.path())).await.unwrap();
    let r = attack(&c, &["replay"]).await;
    assert_eq!(r["outcome"], "refused", "{r:?}");
    assert_eq!(r["answer"], "Refused(BadToken)", "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_left_half_sent_is_dropped_after_the_frame_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(config(dir.path())).await.unwrap();
    let r = attack(&c, &["half-frame", "--limit-ms", "15000"]).await;
    assert_eq!(r["outcome"], "closed", "{r:?}");
    assert!(r["end"].contains("stalled"), "{r:?}");
    let elapsed = Duration::from_millis(number(&r, "elapsed_ms") as u64);
    // It heartbeats all along, so only the frame timeout can have dropped it.
    assert!(
        elapsed + Duration::from_millis(500) >= DEFAULT_FRAME_TIMEOUT,
        "{r:?}"
    );
    assert!(
        elapsed < DEFAULT_FRAME_TIMEOUT + Duration::from_secs(5),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_close_the_connection_before_and_after_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let c = Coordinator::start(config(dir.path())).await.unwrap();
    let r = attack(&c, &["oversize"]).await;
    assert_eq!(r["outcome"], "closed", "{r:?}");
    assert!(r["pre_auth"].contains("exceeds_the_limit_of_4096"), "{r:?}");
    assert!(
        r["post_auth"].contains("exceeds_the_limit_of_1048576"),
        "{r:?}"
    );
}
