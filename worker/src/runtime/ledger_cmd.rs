//! `eqim ledger CHECKPOINT_DIR`: per epoch, how many samples the job's committed steps consumed
//! once, twice, more often or never, read from the newest checkpoint that verifies.

use anyhow::{bail, Context, Result};
use eqim_common::checkpoint;
use std::path::Path;

/// The report lines; an error when no checkpoint verifies.
pub fn report(dir: &Path) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    let chosen = if dir.join(checkpoint::MANIFEST_FILE).exists() {
        checkpoint::verify(dir)?;
        dir.to_owned()
    } else {
        let (good, rejected) = checkpoint::latest_good(dir);
        for reason in rejected {
            lines.push(format!("skipped: {reason}"));
        }
        match good {
            Some((d, _)) => d,
            None => bail!(
                "no checkpoint under {} verifies: pass a job's checkpoint directory",
                dir.display()
            ),
        }
    };
    let state = checkpoint::read_job_state(&chosen)
        .with_context(|| format!("reading the ledger of {}", chosen.display()))?;
    lines.push(format!(
        "checkpoint {} (step {}, epoch {})",
        chosen.display(),
        state.cursor.step,
        state.cursor.epoch
    ));
    for coverage in state.ledger.summary() {
        lines.push(coverage.to_string());
    }
    Ok(lines)
}
