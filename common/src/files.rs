//! Durable file writes and file hashes, the one place eqim writes a file that must never be seen
//! half-written: a temp file beside the target, fsync, rename over the target, fsync of the
//! directory. A crash leaves either the old file or the new one, plus at worst a stray
//! `.NAME.tmp-PID` that nothing reads.

use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// A file operation that failed, with the path it was on.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FileError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

fn at(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError {
        path: path.to_owned(),
        source,
    }
}

/// The temp name [`write_atomic_with`] writes `path` through (same directory, so the rename is
/// atomic; hidden, and unique per process).
pub fn temp_path(path: &Path) -> PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.tmp-{}", std::process::id()))
}

/// Options of an atomic write.
#[derive(Debug, Clone, Copy, Default)]
pub struct AtomicOptions {
    /// Readable by the owner only (mode 0600 on Unix): tokens and private keys.
    pub secret: bool,
}

/// Creates `path` atomically: `fill` writes the content to the temp path it is given (by any
/// means: a library that only writes to a path is fine), then the temp file is synced and
/// renamed over `path`, and the directory synced. On an error from `fill` the temp file is
/// removed and the error returned; `path` is untouched.
pub fn write_atomic_with<E>(path: &Path, fill: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E>
where
    E: From<FileError>,
{
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(at(dir))?;
    let tmp = temp_path(path);
    if let Err(e) = fill(&tmp) {
        // Never leave a half-written file behind; the error that matters is `fill`'s.
        let _ignored = std::fs::remove_file(&tmp);
        return Err(e);
    }
    publish(&tmp, path)?;
    Ok(())
}

/// Syncs the finished temp file `tmp`, renames it onto `path` and syncs the directory.
fn publish(tmp: &Path, path: &Path) -> Result<(), FileError> {
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(at(tmp))?;
    std::fs::rename(tmp, path).map_err(at(path))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    if let Ok(d) = std::fs::File::open(dir) {
        // Persists the rename; a failure here weakens durability, not correctness.
        let _ignored = d.sync_all();
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_atomic_opts(path, bytes, AtomicOptions::default())
}

/// Writes `bytes` to `path` atomically with `options`.
pub fn write_atomic_opts(
    path: &Path,
    bytes: &[u8],
    options: AtomicOptions,
) -> Result<(), FileError> {
    write_atomic_with(path, |tmp| {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        if options.secret {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut file = opts.open(tmp).map_err(at(tmp))?;
        file.write_all(bytes).map_err(at(tmp))
    })
}

/// Errors of [`write_json_atomic`].
#[derive(Debug, thiserror::Error)]
pub enum JsonFileError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{path}: cannot serialise as JSON: {source}")]
    Serialize {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Writes `value` as pretty JSON to `path` atomically.
pub fn write_json_atomic(path: &Path, value: &impl serde::Serialize) -> Result<(), JsonFileError> {
    let text = serde_json::to_vec_pretty(value).map_err(|source| JsonFileError::Serialize {
        path: path.to_owned(),
        source,
    })?;
    Ok(write_atomic(path, &text)?)
}

/// Size and SHA-256 of a file, read in 1 MiB chunks.
pub fn hash_file(path: &Path) -> Result<(u64, [u8; 32]), FileError> {
    let mut f = std::fs::File::open(path).map_err(at(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(at(path))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        h.update(&buf[..n]);
    }
    Ok((bytes, h.finalize().into()))
}

/// SHA-256 of a file as lowercase hex.
pub fn sha256_hex(path: &Path) -> Result<String, FileError> {
    Ok(hex::encode(hash_file(path)?.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_atomic_write_replaces_the_file_and_leaves_no_temp_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/a.json");
        write_json_atomic(&path, &serde_json::json!({"x": 1})).unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a.json")]);
    }

    #[test]
    fn a_failed_fill_keeps_the_old_file_and_removes_the_temp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        write_atomic(&path, b"old").unwrap();
        let failed: Result<(), FileError> = write_atomic_with(&path, |tmp| {
            std::fs::write(tmp, b"half").unwrap();
            Err(FileError {
                path: tmp.to_owned(),
                source: std::io::Error::other("disk full"),
            })
        });
        assert!(failed.unwrap_err().to_string().contains("disk full"));
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert!(!temp_path(&path).exists());
    }

    #[cfg(unix)]
    #[test]
    fn secret_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        write_atomic_opts(&path, b"s3cret", AtomicOptions { secret: true }).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn file_hashes_are_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_hex(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(hash_file(&path).unwrap().0, 3);
    }
}
