//! The coordinator as a separate program: `eqim coordinator` and `eqim launch` run the
//! `eqim-coordinator` binary that ships next to `eqim` (the worker crate does not link the
//! coordinator, so a worker host needs no coordinator code and the coordinator no libtorch).

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;

/// The coordinator binary's file name.
pub const COORDINATOR_BIN: &str = "eqim-coordinator";

/// `eqim-coordinator` next to the running `eqim`, or `EQIM_COORDINATOR_BIN` when set.
pub fn coordinator_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("EQIM_COORDINATOR_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "EQIM_COORDINATOR_BIN={} is not a file: point it at the eqim-coordinator binary",
                path.display()
            );
        }
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating the eqim executable")?;
    let dir = exe
        .parent()
        .context("the eqim executable has no parent directory")?;
    // Test binaries live one level below the binaries, in target/<profile>/deps.
    for candidate in [
        dir.join(COORDINATOR_BIN),
        dir.join("..").join(COORDINATOR_BIN),
    ] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{COORDINATOR_BIN} is not next to {}: install both binaries together \
         (`cargo build --release -p eqim-coordinator -p eqim-worker`), or set EQIM_COORDINATOR_BIN",
        exe.display()
    )
}

/// A command that runs the coordinator binary.
pub fn coordinator_command() -> Result<Command> {
    Ok(Command::new(coordinator_binary()?))
}

/// `eqim coordinator ARGS`: runs `eqim-coordinator ARGS` in place of this process on Unix (same
/// pid, so signals from a supervisor reach it), and returns its status elsewhere.
pub fn exec_coordinator(args: &[std::ffi::OsString]) -> Result<()> {
    let mut command = coordinator_command()?;
    command.args(args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        let err = command.exec();
        Err(err).context("starting eqim-coordinator")
    }
    #[cfg(not(unix))]
    {
        let status = command.status().context("starting eqim-coordinator")?;
        if !status.success() {
            bail!("eqim-coordinator exited with {status}");
        }
        Ok(())
    }
}
