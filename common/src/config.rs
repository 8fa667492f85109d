//! Loading configuration files (YAML or TOML, chosen by extension) with errors that name the file,
//! the key and what would have been accepted.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Heartbeat period of a worker on the control plane.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(500);
/// A worker silent for this long is declared dead.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
/// QUIC idle timeout of control connections. Equal to the heartbeat timeout: keep-alives (sent
/// every heartbeat interval) keep a live connection open, and a dead peer's connection is closed
/// no later than heartbeats would have declared it dead.
pub const DEFAULT_QUIC_IDLE_TIMEOUT: Duration = DEFAULT_HEARTBEAT_TIMEOUT;
/// A new connection must send its `Hello` within this time.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// At start, how long to wait for the expected number of workers before training with fewer
/// (but at least the minimum).
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Members of a new generation must build their process group and report ready within this time,
/// or they are dropped from the job.
pub const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(120);
/// All votes of a step must arrive within this time after its assignment, or the step is aborted.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(600);
/// After a failed vote, members must answer a probe within this time or are declared dead
/// (much faster than the heartbeat timeout for a killed peer).
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the coordinator re-evaluates its membership decision (timeouts).
pub const DEFAULT_DECISION_TICK_INTERVAL: Duration = Duration::from_millis(100);

/// Serde for `Duration` fields written as seconds (`heartbeat_timeout: 2.5`) in config files.
pub mod duration_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(|_| {
            serde::de::Error::custom(format!(
                "{secs} is not a valid duration: give a non-negative number of seconds"
            ))
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: unsupported extension (accepted: .yaml, .yml, .toml)")]
    Extension { path: PathBuf },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// Format of a configuration file, decided by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigFormat {
    Yaml,
    Toml,
}

impl ConfigFormat {
    pub fn from_path(path: &Path) -> Result<Self, ConfigError> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml") | Some("yml") => Ok(Self::Yaml),
            Some("toml") => Ok(Self::Toml),
            _ => Err(ConfigError::Extension {
                path: path.to_owned(),
            }),
        }
    }
}

/// Parses `text` as the format of `path`; serde's messages (which name the key path and, for enums,
/// the accepted variants) are prefixed with the file name.
pub fn parse_config<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    let parse_err = |message: String| ConfigError::Parse {
        path: path.to_owned(),
        message,
    };
    match ConfigFormat::from_path(path)? {
        ConfigFormat::Yaml => serde_yaml::from_str(text).map_err(|e| parse_err(e.to_string())),
        ConfigFormat::Toml => toml::from_str(text).map_err(|e| parse_err(e.to_string())),
    }
}

/// Reads and parses a configuration file, then runs its own validation.
pub fn load_config<T: DeserializeOwned + Validate>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let cfg: T = parse_config(path, &text)?;
    cfg.validate()
        .map_err(|(key, message)| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        })?;
    Ok(cfg)
}

/// Semantic checks after parsing. Returns the offending key and a message saying what is accepted.
pub trait Validate {
    fn validate(&self) -> Result<(), (String, String)>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        steps: u32,
        mode: Mode,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Linear,
        Constant,
    }

    impl Validate for Sample {
        fn validate(&self) -> Result<(), (String, String)> {
            if self.steps == 0 {
                return Err(("steps".into(), "must be at least 1".into()));
            }
            Ok(())
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn yaml_and_toml_load_the_same_struct() {
        let dir = tempfile::tempdir().unwrap();
        let y: Sample =
            load_config(&write(dir.path(), "a.yaml", "steps: 3\nmode: linear\n")).unwrap();
        let t: Sample = load_config(&write(
            dir.path(),
            "a.toml",
            "steps = 3\nmode = \"constant\"\n",
        ))
        .unwrap();
        assert_eq!(y.steps, 3);
        assert_eq!(t.steps, 3);
        assert!(matches!(y.mode, Mode::Linear));
        assert!(matches!(t.mode, Mode::Constant));
    }

    #[test]
    fn bad_enum_value_names_file_and_accepted_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "bad.yaml", "steps: 3\nmode: cosine\n");
        let err = load_config::<Sample>(&p).unwrap_err().to_string();
        assert!(err.contains("bad.yaml"), "{err}");
        assert!(err.contains("linear") && err.contains("constant"), "{err}");
    }

    #[test]
    fn unknown_key_and_failed_validation_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(
            dir.path(),
            "u.toml",
            "steps = 3\nmode = \"linear\"\nstpes = 4\n",
        );
        let err = load_config::<Sample>(&p).unwrap_err().to_string();
        assert!(err.contains("stpes"), "{err}");
        let p = write(dir.path(), "v.toml", "steps = 0\nmode = \"linear\"\n");
        let err = load_config::<Sample>(&p).unwrap_err().to_string();
        assert!(err.contains("v.toml") && err.contains("`steps`"), "{err}");
    }

    #[test]
    fn unknown_extension_is_refused() {
        let err = ConfigFormat::from_path(Path::new("x.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(".yaml") && err.contains(".toml"), "{err}");
    }
}
