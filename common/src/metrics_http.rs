//! A minimal HTTP/1.1 server for Prometheus' scrapes: `GET /metrics` (and `HEAD`) answers the
//! registry in the text exposition format, anything else gets 404/405/400. One request per
//! connection (`Connection: close`), which is all a scraper needs, so no HTTP library is pulled in.
//! Used by the coordinator and, through the worker crate, by every worker.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::metrics::DEFAULT_METRICS_REQUEST_TIMEOUT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::metrics_registry::EqimMetrics;

/// A request head larger than this is refused (a scrape request is a few hundred bytes).
const MAX_REQUEST_HEAD_BYTES: usize = 8 * 1024;

/// Content type of the text exposition format, version 0.0.4.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Errors starting the metrics server.
#[derive(Debug, thiserror::Error)]
pub enum MetricsServerError {
    #[error("cannot listen for /metrics on {addr}: {source} (pick a free port with --metrics-addr, or port 0 for any)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the /metrics listener's address: {0}")]
    LocalAddr(std::io::Error),
}

/// A running `/metrics` server; dropping it (or calling [`MetricsServer::shutdown`]) stops it.
pub struct MetricsServer {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Binds `addr` (port 0 picks a free port) and serves `metrics` on the current tokio runtime.
    pub async fn start(
        addr: SocketAddr,
        metrics: Arc<EqimMetrics>,
    ) -> Result<Self, MetricsServerError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsServerError::Bind { addr, source })?;
        Self::from_listener(listener, metrics)
    }

    /// Serves on an already bound listener.
    pub fn from_listener(
        listener: TcpListener,
        metrics: Arc<EqimMetrics>,
    ) -> Result<Self, MetricsServerError> {
        let local_addr = listener
            .local_addr()
            .map_err(MetricsServerError::LocalAddr)?;
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(accept_loop(
            listener,
            metrics,
            stopped,
            DEFAULT_METRICS_REQUEST_TIMEOUT,
        ));
        tracing::info!(addr = %local_addr, "serving /metrics");
        Ok(Self {
            local_addr,
            stop,
            task: Some(task),
        })
    }

    /// The address scrapers should use (the bound port when port 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and waits for the accept loop to end.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            if let Err(err) = task.await {
                tracing::warn!(cause = %err, "/metrics accept loop ended abnormally");
            }
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

async fn accept_loop(
    listener: TcpListener,
    metrics: Arc<EqimMetrics>,
    mut stopped: watch::Receiver<bool>,
    request_timeout: Duration,
) {
    loop {
        tokio::select! {
            changed = stopped.changed() => {
                // A closed channel means the server handle is gone: stop as well.
                if changed.is_err() || *stopped.borrow() {
                    return;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let metrics = metrics.clone();
                    tokio::spawn(async move {
                        if let Err(err) = handle_connection(stream, &metrics, request_timeout).await {
                            tracing::debug!(cause = %err, %peer, "/metrics connection failed");
                        }
                    });
                }
                Err(err) => {
                    // Typically EMFILE; back off instead of spinning.
                    tracing::warn!(cause = %err, "accepting a /metrics connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn handle_connection(
    mut stream: TcpStream,
    metrics: &EqimMetrics,
    request_timeout: Duration,
) -> std::io::Result<()> {
    let head = match tokio::time::timeout(request_timeout, read_request_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()), // a silent client: drop the connection
    };
    let response = match head {
        Some(head) => respond(&head, metrics),
        None => Response::text(
            431,
            "Request Header Fields Too Large",
            "request head too large\n",
        ),
    };
    stream.write_all(&response.into_bytes()).await?;
    stream.shutdown().await
}

/// Reads until the blank line that ends the request head; `None` if it exceeds the limit.
async fn read_request_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find_head_end(&buf) {
            return Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()));
        }
        if buf.len() > MAX_REQUEST_HEAD_BYTES {
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed before the end of the request head",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n")
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    include_body: bool,
    allow: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: &str) -> Self {
        Self {
            status,
            reason,
            content_type: "text/plain; charset=utf-8",
            body: body.to_string(),
            include_body: true,
            allow: false,
        }
    }

    fn into_bytes(self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.status,
            self.reason,
            self.content_type,
            self.body.len()
        );
        if self.allow {
            out.push_str("Allow: GET, HEAD\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if self.include_body {
            bytes.extend_from_slice(self.body.as_bytes());
        }
        bytes
    }
}

fn respond(head: &str, metrics: &EqimMetrics) -> Response {
    let request_line = head.lines().next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "Bad Request", "malformed request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text(400, "Bad Request", "only HTTP/1.x is served\n");
    }
    let path = target.split('?').next().unwrap_or(target);
    if path != "/metrics" {
        return Response::text(404, "Not Found", "eqim serves only /metrics\n");
    }
    if method != "GET" && method != "HEAD" {
        let mut r = Response::text(405, "Method Not Allowed", "use GET\n");
        r.allow = true;
        return r;
    }
    match metrics.encode_text() {
        Ok(body) => Response {
            status: 200,
            reason: "OK",
            content_type: TEXT_CONTENT_TYPE,
            body,
            include_body: method == "GET",
            allow: false,
        },
        Err(err) => {
            tracing::warn!(cause = %err, "encoding /metrics failed");
            Response::text(500, "Internal Server Error", &format!("{err}\n"))
        }
    }
}
