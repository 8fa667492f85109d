//! `eqim doctor`: what libtorch this binary runs on and what it can use.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// What the environment looks like to libtorch, for the user and for tests.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DoctorReport {
    pub libtorch_version: String,
    pub libtorch_dir: PathBuf,
    pub libtorch_lib_at_build: String,
    pub threads: i32,
    pub cuda_available: bool,
    pub cuda_devices: i64,
    pub cudnn_available: bool,
    pub smoke_forward_ok: bool,
}

/// Finds the folder of the libtorch_cpu.so that is actually mapped into this process.
fn loaded_libtorch_lib() -> Result<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").context("reading /proc/self/maps")?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .map(|p| Path::new(p).parent().unwrap_or(Path::new("/")).to_owned())
        .context("libtorch_cpu.so is not mapped into this process")
}

/// Reads the version of the libtorch in `torch_dir` (the folder above `lib/`): `build-version` in an
/// extracted libtorch, `version.py` in a Python torch package.
fn libtorch_version(torch_dir: &Path) -> Result<String> {
    if let Ok(v) = std::fs::read_to_string(torch_dir.join("build-version")) {
        return Ok(v.trim().to_owned());
    }
    let py = std::fs::read_to_string(torch_dir.join("version.py"))
        .with_context(|| format!("no build-version or version.py in {}", torch_dir.display()))?;
    py.lines()
        .find_map(|l| l.strip_prefix("__version__ = "))
        .map(|v| v.trim().trim_matches('\'').trim_matches('"').to_owned())
        .context("version.py has no __version__ line")
}

/// A tiny forward pass (linear + GELU + mean) checked against its closed form.
fn smoke_forward() -> Result<()> {
    let _guard = tch::no_grad_guard();
    let x = Tensor::ones([2, 4], (Kind::Float, Device::Cpu));
    let w = Tensor::full([3, 4], 0.25, (Kind::Float, Device::Cpu));
    let y = x.linear::<Tensor>(&w, None).gelu("none").mean(Kind::Float);
    let got = y.double_value(&[]);
    // linear gives 1.0 everywhere; GELU(1) = 0.5 * (1 + erf(1/sqrt 2)) = 0.8413447
    if (got - 0.841_344_7).abs() > 1e-5 {
        bail!("smoke forward pass gave {got}, expected 0.8413447");
    }
    Ok(())
}

pub fn report() -> Result<DoctorReport> {
    let lib = loaded_libtorch_lib()?;
    let torch_dir = lib.parent().unwrap_or(&lib).to_owned();
    Ok(DoctorReport {
        libtorch_version: libtorch_version(&torch_dir)?,
        libtorch_dir: torch_dir,
        libtorch_lib_at_build: env!("EQIM_LIBTORCH_LIB_AT_BUILD").to_owned(),
        threads: tch::get_num_threads(),
        cuda_available: tch::Cuda::is_available(),
        cuda_devices: tch::Cuda::device_count(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        smoke_forward_ok: smoke_forward().is_ok(),
    })
}

pub fn print(r: &DoctorReport) {
    println!("eqim {}", env!("CARGO_PKG_VERSION"));
    println!("  libtorch version : {}", r.libtorch_version);
    println!("  libtorch found at: {}", r.libtorch_dir.display());
    println!("  built against    : {}", r.libtorch_lib_at_build);
    println!("  CPU threads      : {}", r.threads);
    println!(
        "  CUDA             : {}",
        if r.cuda_available {
            format!(
                "available, {} device(s), cuDNN {}",
                r.cuda_devices, r.cudnn_available
            )
        } else {
            "not available (CPU only)".to_owned()
        }
    );
    println!(
        "  smoke forward    : {}",
        if r.smoke_forward_ok { "ok" } else { "FAILED" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doctor_reports_libtorch_2_11_and_a_working_forward_pass() {
        let r = report().unwrap();
        assert!(r.libtorch_version.starts_with("2.11.0"), "{r:?}");
        assert!(r.smoke_forward_ok);
        assert!(r.threads >= 1);
    }
}
