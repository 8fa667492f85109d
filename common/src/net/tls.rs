//! QUIC and TLS configuration of the control plane, built in one place: the server's config from
//! the job's certificate, the client's config that pins the certificate's SHA-256 fingerprint
//! (instead of a CA), and the transport config (keep-alive and idle timeout) from our timeouts.

use super::credentials::{fingerprint, JobCredentials};
use crate::proto::ALPN;
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
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Keep-alive and idle timeout, set deliberately (quinn's defaults are no keep-alive and 30 s).
pub struct TransportTimeouts {
    pub keep_alive_interval: Duration,
    pub idle_timeout: Duration,
}

pub fn transport_config(t: &TransportTimeouts) -> Result<quinn::TransportConfig, TlsError> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(t.keep_alive_interval));
    let idle = quinn::IdleTimeout::try_from(t.idle_timeout)
        .map_err(|_| TlsError::IdleTimeout(t.idle_timeout))?;
    transport.max_idle_timeout(Some(idle));
    // One control stream and one heartbeat stream per direction; a few spare for bulk transfers.
    transport.max_concurrent_bidi_streams(4u32.into());
    transport.max_concurrent_uni_streams(16u32.into());
    Ok(transport)
}

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
    cfg.transport_config(Arc::new(transport_config(t)?));
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
    cfg.transport_config(Arc::new(transport_config(t)?));
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
