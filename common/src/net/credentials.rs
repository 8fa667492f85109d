//! A job's credentials: the join token (shared secret) and the coordinator's self-signed
//! certificate, whose SHA-256 fingerprint workers pin. Created once per job directory and reused
//! when the coordinator restarts, so reconnecting workers still trust it.
//!
//! A worker host needs two files only: `token` and `coordinator-cert.sha256`. The certificate's
//! private key lives apart from them, in `private/` (0700, the key 0600), which is never to be
//! copied to workers.

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

pub const TOKEN_FILE: &str = "token";
pub const CERT_FILE: &str = "coordinator-cert.der";
pub const KEY_FILE: &str = "coordinator-key.der";
/// Subdirectory of the job directory that holds [`KEY_FILE`]; only the coordinator reads it.
pub const PRIVATE_DIR: &str = "private";
/// Hex SHA-256 of the certificate's DER, next to the token file.
pub const FINGERPRINT_FILE: &str = "coordinator-cert.sha256";
/// Name the certificate is issued for (workers verify the fingerprint, not the name).
pub const SERVER_NAME: &str = "eqim-coordinator";

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot generate the coordinator certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CredentialsError + '_ {
    move |source| CredentialsError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The coordinator's side: token, certificate and key.
pub struct JobCredentials {
    pub token: String,
    pub cert_der: CertificateDer<'static>,
    pub key_der: PrivatePkcs8KeyDer<'static>,
    pub fingerprint: [u8; 32],
    pub token_path: PathBuf,
}

impl std::fmt::Debug for JobCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token or the key.
        f.debug_struct("JobCredentials")
            .field("fingerprint", &hex::encode(self.fingerprint))
            .field("token_path", &self.token_path)
            .finish_non_exhaustive()
    }
}

pub fn fingerprint(cert_der: &[u8]) -> [u8; 32] {
    Sha256::digest(cert_der).into()
}

impl JobCredentials {
    /// Loads the job's credentials from `dir`, creating what is missing: a random 256-bit token
    /// (unless the user put their own shared secret in `token`) and a certificate.
    pub fn load_or_create(dir: &Path) -> Result<Self, CredentialsError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let token_path = dir.join(TOKEN_FILE);
        if !token_path.exists() {
            let token: [u8; 32] = rand::random();
            write_atomic(&token_path, hex::encode(token).as_bytes(), true)?;
        }
        let token = read_token(&token_path)?;
        let cert_path = dir.join(CERT_FILE);
        let key_path = private_key_path(dir)?;
        if !(cert_path.exists() && key_path.exists()) {
            let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_owned()])?;
            write_atomic(&key_path, &certified.key_pair.serialize_der(), true)?;
            write_atomic(&cert_path, certified.cert.der(), false)?;
        }
        let cert_der = CertificateDer::from(std::fs::read(&cert_path).map_err(io_err(&cert_path))?);
        let key_der =
            PrivatePkcs8KeyDer::from(std::fs::read(&key_path).map_err(io_err(&key_path))?);
        let fingerprint = fingerprint(&cert_der);
        write_atomic(
            &dir.join(FINGERPRINT_FILE),
            format!("{}\n", hex::encode(fingerprint)).as_bytes(),
            false,
        )?;
        Ok(Self {
            token,
            cert_der,
            key_der,
            fingerprint,
            token_path,
        })
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone_key())
    }
}

/// Where the key is kept: `dir/private/coordinator-key.der`, the directory made owner-only. A
/// key left at the old place (`dir/coordinator-key.der`, before protocol 5) is moved there.
fn private_key_path(dir: &Path) -> Result<PathBuf, CredentialsError> {
    let private = dir.join(PRIVATE_DIR);
    std::fs::create_dir_all(&private).map_err(io_err(&private))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(&private))?;
    }
    let key_path = private.join(KEY_FILE);
    let old = dir.join(KEY_FILE);
    if old.exists() && !key_path.exists() {
        std::fs::rename(&old, &key_path).map_err(io_err(&old))?;
    }
    Ok(key_path)
}

/// The worker's side: the token and the pinned fingerprint.
#[derive(Clone)]
pub struct ClientCredentials {
    pub token: String,
    pub cert_sha256: [u8; 32],
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("cert_sha256", &hex::encode(self.cert_sha256))
            .finish_non_exhaustive()
    }
}

impl ClientCredentials {
    /// Reads the token file and the fingerprint file next to it (copy both from the job
    /// directory to every worker machine).
    pub fn from_token_file(token_path: &Path) -> Result<Self, CredentialsError> {
        let token = read_token(token_path)?;
        let fp_path = token_path.with_file_name(FINGERPRINT_FILE);
        let text = std::fs::read_to_string(&fp_path).map_err(io_err(&fp_path))?;
        let cert_sha256 =
            parse_fingerprint(text.trim()).map_err(|message| CredentialsError::Invalid {
                path: fp_path.clone(),
                message,
            })?;
        Ok(Self { token, cert_sha256 })
    }
}

/// Parses 64 hex digits (colons allowed, as `openssl x509 -fingerprint` prints them).
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], String> {
    let digits: String = text.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(&digits)
        .map_err(|e| format!("not a hex SHA-256 fingerprint ({e}): expected 64 hex digits"))?;
    bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("fingerprint has {} bytes, expected 32", b.len()))
}

fn read_token(path: &Path) -> Result<String, CredentialsError> {
    let token = std::fs::read_to_string(path)
        .map_err(io_err(path))?
        .trim()
        .to_owned();
    if token.len() < 16 {
        return Err(CredentialsError::Invalid {
            path: path.to_owned(),
            message: "token is shorter than 16 characters: use a long random secret, or delete the file to have one generated".into(),
        });
    }
    Ok(token)
}

/// Writes `bytes` to `path` atomically; `secret` files are readable by the owner only.
fn write_atomic(path: &Path, bytes: &[u8], secret: bool) -> Result<(), CredentialsError> {
    let options = crate::files::AtomicOptions { secret };
    crate::files::write_atomic_opts(path, bytes, options).map_err(|e| CredentialsError::Io {
        path: e.path,
        source: e.source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = JobCredentials::load_or_create(dir.path()).unwrap();
        let b = JobCredentials::load_or_create(dir.path()).unwrap();
        assert_eq!(a.token, b.token);
        assert_eq!(a.fingerprint, b.fingerprint);
        let client = ClientCredentials::from_token_file(&a.token_path).unwrap();
        assert_eq!(client.token, a.token);
        assert_eq!(client.cert_sha256, a.fingerprint);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&a.token_path)
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn the_private_key_is_kept_apart_from_what_workers_get() {
        let dir = tempfile::tempdir().unwrap();
        let created = JobCredentials::load_or_create(dir.path()).unwrap();
        let mut top: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        top.sort();
        assert_eq!(
            top,
            [CERT_FILE, FINGERPRINT_FILE, PRIVATE_DIR, TOKEN_FILE],
            "no key next to the token"
        );
        let key = dir.path().join(PRIVATE_DIR).join(KEY_FILE);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&dir.path().join(PRIVATE_DIR)), 0o700);
            assert_eq!(mode(&key), 0o600);
        }
        // A job directory from before: the key at the top is moved, and the same one is used.
        std::fs::rename(&key, dir.path().join(KEY_FILE)).unwrap();
        let again = JobCredentials::load_or_create(dir.path()).unwrap();
        assert_eq!(again.fingerprint, created.fingerprint);
        assert_eq!(
            again.key_der.secret_pkcs8_der(),
            created.key_der.secret_pkcs8_der()
        );
        assert!(key.exists() && !dir.path().join(KEY_FILE).exists());
    }

    #[test]
    fn a_short_token_or_bad_fingerprint_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKEN_FILE), "short").unwrap();
        let err = JobCredentials::load_or_create(dir.path()).unwrap_err();
        assert!(err.to_string().contains("token is shorter"), "{err}");
        assert!(parse_fingerprint("zz").is_err());
        assert_eq!(
            parse_fingerprint(&"ab:".repeat(32)[..95]).unwrap(),
            [0xab; 32]
        );
    }
}
