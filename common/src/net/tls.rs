//! QUIC and TLS configuration of the control plane, built in one place: the server's config from
//! the job's certificate, the client's config that pins the certificate's SHA-256 fingerprint
//! (instead of a CA), and the transport config (keep-alive, idle timeout, flow-control windows and
//! stream counts) from our timeouts. The server's limits are small until a peer authenticates.

use super::credentials::{fingerprint, JobCredentials};
use crate::proto::{ALPN, JOIN_PROOF_EXPORTER_LABEL};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC cannot use this TLS configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("QUIC idle timeout {0:?} is out of range")]
    IdleTimeout(Duration),
    #[error("cannot export the connection's TLS keying material for the join proof")]
    Exporter,
}

/// The connection's channel binding for [`crate::proto::join_proof`]: 32 bytes exported from its
/// TLS session under [`JOIN_PROOF_EXPORTER_LABEL`]. Both ends compute the same value; no other
/// connection has it.
pub fn channel_binding(connection: &quinn::Connection) -> Result<[u8; 32], TlsError> {
    let mut out = [0u8; 32];
    connection
        .export_keying_material(&mut out, JOIN_PROOF_EXPORTER_LABEL, b"")
        .map_err(|_| TlsError::Exporter)?;
    Ok(out)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Keep-alive and idle timeout, set deliberately (quinn's defaults are no keep-alive and 30 s).
pub struct TransportTimeouts {
    pub keep_alive_interval: Duration,
    pub idle_timeout: Duration,
}

/// Bytes a peer may have in flight on one stream. A control frame is at most 1 MiB and streams
/// are read as frames arrive, so a window of this size keeps a LAN link busy while bounding what
/// one stream can park in our memory.
pub const STREAM_RECEIVE_WINDOW: u32 = 256 << 10;
/// Bytes a peer may have in flight over a whole authenticated connection (control plus
/// heartbeat stream).
pub const CONNECTION_RECEIVE_WINDOW: u32 = 512 << 10;
/// Connection window before the `Hello` is verified: enough for a `Hello`
/// ([`crate::framing::MAX_HELLO_FRAME_BYTES`]) and nothing to speak of beyond it, so 40
/// unauthenticated connections pushing data cost kilobytes each, not megabytes.
pub const PRE_AUTH_RECEIVE_WINDOW: u32 = 16 << 10;
/// Unacknowledged bytes we buffer for sending per connection: two largest control frames.
pub const SEND_WINDOW: u64 = 2 << 20;
/// Streams a worker opens: one bidirectional control stream and, once admitted, one
/// unidirectional heartbeat stream. The coordinator opens none.
pub const WORKER_BIDI_STREAMS: u32 = 1;
pub const WORKER_UNI_STREAMS_ADMITTED: u32 = 1;

/// The transport parameters shared by both ends: timeouts, send window, no datagrams (quinn
/// would buffer up to 1.25 MB of them per connection for a reader we do not have).
fn base_transport(t: &TransportTimeouts) -> Result<quinn::TransportConfig, TlsError> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(t.keep_alive_interval));
    let idle = quinn::IdleTimeout::try_from(t.idle_timeout)
        .map_err(|_| TlsError::IdleTimeout(t.idle_timeout))?;
    transport.max_idle_timeout(Some(idle));
    transport.send_window(SEND_WINDOW);
    transport.datagram_receive_buffer_size(None);
    transport.stream_receive_window(STREAM_RECEIVE_WINDOW.into());
    Ok(transport)
}

/// The coordinator's transport: a connection starts with the pre-authentication budget (one
/// bidirectional stream, no unidirectional one, [`PRE_AUTH_RECEIVE_WINDOW`]);
/// [`grant_admitted_limits`] opens it up once the `Hello` checked out.
pub fn server_transport_config(t: &TransportTimeouts) -> Result<quinn::TransportConfig, TlsError> {
    let mut transport = base_transport(t)?;
    transport.receive_window(PRE_AUTH_RECEIVE_WINDOW.into());
    transport.max_concurrent_bidi_streams(WORKER_BIDI_STREAMS.into());
    transport.max_concurrent_uni_streams(0u32.into());
    Ok(transport)
}

/// Raises an authenticated connection's limits to what a worker needs: the heartbeat stream and
/// the full connection window.
pub fn grant_admitted_limits(connection: &quinn::Connection) {
    connection.set_receive_window(CONNECTION_RECEIVE_WINDOW.into());
    connection.set_max_concurrent_uni_streams(WORKER_UNI_STREAMS_ADMITTED.into());
}

/// The worker's transport: the coordinator never opens a stream, and its frames (up to 1 MiB)
/// flow through a window of their own size.
pub fn client_transport_config(t: &TransportTimeouts) -> Result<quinn::TransportConfig, TlsError> {
    let mut transport = base_transport(t)?;
    transport.stream_receive_window((crate::framing::MAX_CONTROL_FRAME_BYTES as u32).into());
    transport.receive_window((2 * crate::framing::MAX_CONTROL_FRAME_BYTES as u32).into());
    transport.max_concurrent_bidi_streams(0u32.into());
    transport.max_concurrent_uni_streams(0u32.into());
    Ok(transport)
}

/// Caps on the QUIC endpoint's queue of connection attempts the accept loop has not taken yet
/// (quinn's defaults: 65536 attempts, 100 MiB buffered).
const MAX_INCOMING: usize = 256;
const INCOMING_BUFFER_BYTES: u64 = 64 << 10;
const INCOMING_BUFFER_TOTAL_BYTES: u64 = 4 << 20;

pub fn server_config(
    creds: &JobCredentials,
    t: &TransportTimeouts,
) -> Result<quinn::ServerConfig, TlsError> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![creds.cert_der.clone()], creds.key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(server_transport_config(t)?));
    cfg.max_incoming(MAX_INCOMING)
        .incoming_buffer_size(INCOMING_BUFFER_BYTES)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL_BYTES);
    Ok(cfg)
}

pub fn client_config(
    cert_sha256: [u8; 32],
    t: &TransportTimeouts,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = PinnedCertVerifier {
        cert_sha256,
        provider: provider.clone(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(client_transport_config(t)?));
    Ok(cfg)
}

/// Trusts exactly one certificate, by the SHA-256 of its DER: the job's self-signed one. The
/// handshake signature is still verified, so only the holder of the key passes.
#[derive(Debug)]
struct PinnedCertVerifier {
    cert_sha256: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.cert_sha256 {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "coordinator certificate SHA-256 {} is not the pinned {}: wrong coordinator, or a stale coordinator-cert.sha256",
                hex::encode(fingerprint(end_entity)),
                hex::encode(self.cert_sha256)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
