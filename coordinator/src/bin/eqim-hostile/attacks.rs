//! The attacks of `eqim-hostile`, one function each; each returns one report line.

use crate::peer::{ended, heartbeats, one_word, Meanwhile, RawPeer};
use anyhow::Result;
use eqim_common::client::{connect_quic, ClientConfig};
use eqim_common::net::close_code;
use eqim_common::proto::{CoordinatorToWorker, Refusal};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Streams a flooding connection tries to open of each kind (quinn's default allowance is 100).
const FLOOD_STREAMS_PER_KIND: usize = 20;
/// How long a flooding connection waits for the coordinator to let it open a stream.
const OPEN_TIMEOUT: Duration = Duration::from_millis(300);
/// How long to wait for the coordinator to drop an attacker before calling it open.
const CLOSE_LIMIT: Duration = Duration::from_secs(10);

pub struct Target {
    pub cfg: ClientConfig,
    pub metrics: Option<SocketAddr>,
}

/// One attack's result line.
pub struct Report {
    pub attack: &'static str,
    /// `refused`, `closed`, `bounded` or `NOT-DEFENDED`.
    pub outcome: String,
    pub elapsed: Duration,
    pub detail: String,
    pub meanwhile: Meanwhile,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "attack={} outcome={} elapsed_ms={} {} {}",
            self.attack,
            self.outcome,
            self.elapsed.as_millis(),
            self.meanwhile.fields(),
            self.detail
        )
    }
}

#[derive(Default)]
struct FloodCounts {
    connected: AtomicU64,
    refused: AtomicU64,
    bidi: AtomicU64,
    uni: AtomicU64,
    bytes: AtomicU64,
    max_conn_bytes: AtomicU64,
    closed_by_peer: AtomicU64,
}

/// `connections` unauthenticated connections, each opening every stream the coordinator lets
/// it and pushing data on them without a `Hello`, for `duration`; a legitimate join and a
/// scrape halfway through.
pub async fn flood(target: &Target, connections: usize, duration: Duration) -> Result<Report> {
    let started = Instant::now();
    let counts = Arc::new(FloodCounts::default());
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (cfg, counts) = (target.cfg.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            flood_one(&cfg, &counts, started + duration).await
        }));
    }
    tokio::time::sleep(duration / 2).await;
    let meanwhile = Meanwhile::check(&target.cfg, "legit-flood", target.metrics).await;
    for task in tasks {
        // A panicked or failed attacker only lowers the pressure; the counts say what happened.
        task.await.ok();
    }
    let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let detail = format!(
        "attackers={connections} connections={} refused={} bidi_streams={} uni_streams={} pushed_bytes={} max_pushed_per_connection={} closed_by_coordinator={}",
        c(&counts.connected), c(&counts.refused), c(&counts.bidi), c(&counts.uni),
        c(&counts.bytes), c(&counts.max_conn_bytes), c(&counts.closed_by_peer)
    );
    Ok(Report {
        attack: "preauth-flood",
        outcome: "bounded".into(),
        elapsed: started.elapsed(),
        detail,
        meanwhile,
    })
}

/// One flooding attacker until `until`: connects again whenever the coordinator drops it.
async fn flood_one(cfg: &ClientConfig, counts: &FloodCounts, until: Instant) {
    while Instant::now() < until {
        flood_connection(cfg, counts, until).await;
    }
}

/// One flooding connection: opens what it may, pushes, counts what the coordinator's flow
/// control let through, until the coordinator closes it or `until`.
async fn flood_connection(cfg: &ClientConfig, counts: &FloodCounts, until: Instant) {
    let Ok((_endpoint, connection)) = connect_quic(cfg).await else {
        counts.refused.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(OPEN_TIMEOUT).await;
        return;
    };
    counts.connected.fetch_add(1, Ordering::Relaxed);
    let pushed = Arc::new(AtomicU64::new(0));
    let mut pushers = Vec::new();
    // Once an open blocks, the coordinator's stream credit is spent: stop asking for that kind.
    let (mut bidi_open, mut uni_open) = (true, true);
    for _ in 0..FLOOD_STREAMS_PER_KIND {
        if bidi_open {
            match tokio::time::timeout(OPEN_TIMEOUT, connection.open_bi()).await {
                Ok(Ok((send, _recv))) => {
                    counts.bidi.fetch_add(1, Ordering::Relaxed);
                    pushers.push(tokio::spawn(push(send, pushed.clone(), until)));
                }
                _ => bidi_open = false,
            }
        }
        if uni_open {
            match tokio::time::timeout(OPEN_TIMEOUT, connection.open_uni()).await {
                Ok(Ok(send)) => {
                    counts.uni.fetch_add(1, Ordering::Relaxed);
                    pushers.push(tokio::spawn(push(send, pushed.clone(), until)));
                }
                _ => uni_open = false,
            }
        }
    }
    let left = until.saturating_duration_since(Instant::now());
    if tokio::time::timeout(left, connection.closed())
        .await
        .is_ok()
    {
        counts.closed_by_peer.fetch_add(1, Ordering::Relaxed);
    }
    for p in pushers {
        p.abort();
    }
    let n = pushed.load(Ordering::Relaxed);
    counts.bytes.fetch_add(n, Ordering::Relaxed);
    counts.max_conn_bytes.fetch_max(n, Ordering::Relaxed);
    connection.close(0u32.into(), b"done");
}

/// Writes chunks that start like a 4 KiB frame until flow control or `until` stops it; counts
/// the bytes quinn accepted (what the coordinator granted credit for).
async fn push(mut send: quinn::SendStream, pushed: Arc<AtomicU64>, until: Instant) {
    let mut chunk = vec![0x5Au8; 16 << 10];
    chunk[..4].copy_from_slice(&4096u32.to_be_bytes());
    let deadline = tokio::time::Instant::from_std(until);
    while Instant::now() < until {
        match tokio::time::timeout_at(deadline, send.write(&chunk)).await {
            Ok(Ok(n)) => {
                pushed.fetch_add(n as u64, Ordering::Relaxed);
            }
            _ => return,
        }
    }
}

/// An admitted peer heartbeats but sends only half of a control frame.
pub async fn half_frame(target: &Target, limit: Duration) -> Result<Report> {
    let mut peer = RawPeer::admitted(&target.cfg, "hostile-half-frame").await?;
    let beats = heartbeats(peer.connection.clone());
    // A frame of 64 KiB announced, 1 KiB sent.
    let mut half = (64u32 << 10).to_be_bytes().to_vec();
    half.extend_from_slice(&[0u8; 1024]);
    peer.send.write_all(&half).await?;
    let started = Instant::now();
    let meanwhile = Meanwhile::check(&target.cfg, "legit-half-frame", target.metrics).await;
    let left = limit.saturating_sub(started.elapsed());
    let (how, _) = ended(&peer.connection, left).await;
    let elapsed = started.elapsed();
    beats.abort();
    let outcome = if how.starts_with("closed") {
        "closed"
    } else {
        "NOT-DEFENDED"
    };
    Ok(Report {
        attack: "half-frame",
        outcome: outcome.into(),
        elapsed,
        detail: format!("end={how}"),
        meanwhile,
    })
}

/// A proof made on one connection, sent on another.
pub async fn replay(target: &Target) -> Result<Report> {
    let captured_on = RawPeer::connect(&target.cfg).await?;
    let captured = captured_on.proof(&target.cfg)?;
    let mut replayer = RawPeer::connect(&target.cfg).await?;
    let started = Instant::now();
    let answer = replayer.hello("hostile-replay", captured).await;
    let elapsed = started.elapsed();
    let meanwhile = Meanwhile::check(&target.cfg, "legit-replay", target.metrics).await;
    let (outcome, detail) = match answer {
        Ok(Some(CoordinatorToWorker::Refused {
            reason: Refusal::BadToken,
        })) => ("refused", "answer=Refused(BadToken)".to_string()),
        Ok(Some(CoordinatorToWorker::Admitted { .. })) => {
            ("NOT-DEFENDED", "answer=Admitted".into())
        }
        other => (
            "closed",
            format!("answer={}", one_word(&format!("{other:?}"))),
        ),
    };
    captured_on.connection.close(0u32.into(), b"done");
    Ok(Report {
        attack: "replayed-proof",
        outcome: outcome.into(),
        elapsed,
        detail,
        meanwhile,
    })
}

/// A `Hello` frame announcing 1 MiB before authentication, and a 4 GiB frame after it.
pub async fn oversize(target: &Target) -> Result<Report> {
    let started = Instant::now();
    let mut before = RawPeer::connect(&target.cfg).await?;
    before.send.write_all(&(1u32 << 20).to_be_bytes()).await?;
    before.send.write_all(&[0u8; 1024]).await?;
    let (pre_auth, _) = ended(&before.connection, CLOSE_LIMIT).await;
    let mut after = RawPeer::admitted(&target.cfg, "hostile-oversize").await?;
    after
        .send
        .write_all(&[0xFF, 0xFF, 0xFF, 0xFF, 1, 2, 3])
        .await?;
    let (post_auth, _) = ended(&after.connection, CLOSE_LIMIT).await;
    let elapsed = started.elapsed();
    let meanwhile = Meanwhile::check(&target.cfg, "legit-oversize", target.metrics).await;
    let code = format!("code={}", close_code::PROTOCOL_ERROR);
    let both_closed = pre_auth.contains(&code) && post_auth.contains(&code);
    Ok(Report {
        attack: "oversize-frame",
        outcome: if both_closed {
            "closed"
        } else {
            "NOT-DEFENDED"
        }
        .into(),
        elapsed,
        detail: format!("pre_auth={pre_auth} post_auth={post_auth}"),
        meanwhile,
    })
}
