//! The `/metrics` endpoint over real TCP on 127.0.0.1:0: every registered metric is served in
//! valid text exposition format, with the constant labels, and other requests are refused.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use eqim_common::metrics::{for_role, resolve_series, MetricKind, Role};
use eqim_common::metrics_http::{MetricsServer, TEXT_CONTENT_TYPE};
use eqim_common::metrics_registry::{CoordinatorMetrics, EqimMetrics, WorkerMetrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn http(addr: std::net::SocketAddr, request: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("response has a head and a body");
    (head.to_string(), body.to_string())
}

/// Parses the text format strictly enough to catch malformed output: HELP/TYPE before samples,
/// `name{k="v",...} value` lines, known names, histograms complete.
fn parse_exposition(body: &str) -> BTreeMap<String, Vec<(String, f64)>> {
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut helps = BTreeSet::new();
    let mut samples: BTreeMap<String, Vec<(String, f64)>> = BTreeMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').expect("HELP has a text");
            assert!(!help.is_empty(), "{line}");
            helps.insert(name.to_string());
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE has a kind");
            assert!(helps.contains(name), "TYPE before HELP for {name}");
            types.insert(name.to_string(), kind.to_string());
        } else if !line.is_empty() {
            let (series, value) = line.rsplit_once(' ').expect("sample has a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value: {line}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.strip_suffix('}').expect("closing }")),
                None => (series, ""),
            };
            let desc = resolve_series(name).unwrap_or_else(|| panic!("unknown series {name}"));
            assert_eq!(
                types.get(desc.name).map(String::as_str),
                Some(desc.kind.as_str()),
                "{name} sampled before its TYPE line, or with the wrong type"
            );
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').expect("label k=v");
                assert!(
                    k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "{line}"
                );
                assert!(
                    v.starts_with('"') && v.ends_with('"') && v.len() >= 2,
                    "{line}"
                );
            }
            samples
                .entry(name.to_string())
                .or_default()
                .push((labels.to_string(), value));
        }
    }
    samples
}

async fn check_role(role: Role, metrics: Arc<EqimMetrics>) {
    let server = MetricsServer::start("127.0.0.1:0".parse().expect("addr"), metrics)
        .await
        .expect("server starts");
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);

    let (head, body) = http(
        addr,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains(&format!("Content-Type: {TEXT_CONTENT_TYPE}")),
        "{head}"
    );
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .expect("number");
    assert_eq!(length, body.len());

    let samples = parse_exposition(&body);
    for desc in for_role(role) {
        for series in desc.series_names() {
            let got = samples
                .get(&series)
                .unwrap_or_else(|| panic!("{role}: {series} missing from /metrics:\n{body}"));
            for (labels, _) in got {
                assert!(
                    labels.contains(&format!("role=\"{role}\"")),
                    "{series}{{{labels}}}"
                );
                assert!(labels.contains("job=\"it\""), "{series}{{{labels}}}");
                assert_eq!(labels.contains("worker=\"w7\""), role == Role::Worker);
            }
        }
        if desc.kind == MetricKind::Histogram {
            let buckets = &samples[&format!("{}_bucket", desc.name)];
            assert!(buckets.iter().any(|(l, _)| l.contains("le=\"+Inf\"")));
        }
    }
    let rss = samples["eqim_process_resident_memory_bytes"][0].1;
    assert!(rss > 1e6, "RSS {rss} was not read on scrape");

    let (head, body) = http(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.is_empty());
    let (head, _) = http(addr, "GET / HTTP/1.1\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = http(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
    assert!(
        head.starts_with("HTTP/1.1 405") && head.contains("Allow: GET, HEAD"),
        "{head}"
    );
    let (head, _) = http(addr, "garbage\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let huge = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
    let (head, _) = http(addr, &huge).await;
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");

    server.shutdown().await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener must be closed after shutdown"
    );
}

#[tokio::test]
async fn coordinator_endpoint_serves_every_coordinator_metric() {
    let metrics = CoordinatorMetrics::new("it").expect("registry");
    metrics.membership_size.set(3.0);
    check_role(Role::Coordinator, metrics.all.clone()).await;
}

#[tokio::test]
async fn worker_endpoint_serves_every_worker_metric() {
    let metrics = WorkerMetrics::new("it", "w7").expect("registry");
    metrics.step_duration.observe(0.5);
    check_role(Role::Worker, metrics.all.clone()).await;
}
