//! `eqim verify-reference` (the tch models against a reference fixture) and `eqim doctor`
//! (the libtorch installation report).

use anyhow::{bail, Result};
use std::path::PathBuf;

/// `eqim verify-reference PREFIX`.
#[derive(clap::Args)]
pub struct VerifyReferenceArgs {
    /// Fixture prefix, e.g. ../shared/fixtures/generator_tiny
    prefix: PathBuf,
    /// Largest allowed max-abs error per case.
    #[arg(long, default_value_t = 1e-4)]
    tol: f64,
    /// Where to run the model: cpu, cuda, cuda:N (the reference outputs were made on the CPU;
    /// on CUDA, cuDNN's TF32 convolutions make the tokenizer's errors larger).
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Runs `eqim verify-reference`.
pub fn verify_reference(args: &VerifyReferenceArgs) -> Result<()> {
    let device = crate::device::parse_device(&args.device)?;
    crate::verify::run_cli(&args.prefix, args.tol, device)
}

/// Runs `eqim doctor [--json]`: fails when libtorch loads but cannot run a tiny forward pass.
pub fn doctor(json: bool) -> Result<()> {
    let r = crate::doctor::report()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        crate::doctor::print(&r);
    }
    if !r.smoke_forward_ok {
        bail!("libtorch loaded but a tiny forward pass failed: reinstall with scripts/setup");
    }
    Ok(())
}
