//! The `train` case of `eqim verify-reference` on the generator_train_tiny fixture: two steps of
//! the reference's recipe (grad, grad norm, clipping, AdamW groups, EMA) within the README's
//! tolerances.

use std::path::PathBuf;
use tch::Tensor;

/// The shared fixtures: `$EQIM_FIXTURES`, else `<repo>/../shared/fixtures` (CI clones the repo
/// next to `shared/`).
fn fixtures() -> PathBuf {
    std::env::var_os("EQIM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        })
}

fn train_reports(prefix: &std::path::Path) -> Vec<eqim_worker::verify::CaseReport> {
    // One intra-op thread: parallel tests with spinning OpenMP workers crawl on 2 cores.
    tch::set_num_threads(1);
    let opts = eqim_worker::verify::VerifyOptions::new(1e-5);
    let reports = eqim_worker::verify::run(prefix, &opts).expect("running the fixture");
    reports
        .into_iter()
        .filter(|r| r.case.starts_with("train"))
        .collect()
}

#[test]
fn generator_train_tiny_matches_the_reference_recipe() {
    let reports = train_reports(&fixtures().join("generator_train_tiny"));
    let names: Vec<&str> = reports.iter().map(|r| r.case.as_str()).collect();
    for case in [
        "train.step0.grads",
        "train.step0.loss",
        "train.step0.grad_norm",
        "train.step1.loss",
        "train.step1.grad_norm",
        "train.final",
        "train.final.small_grad",
        "train.ema",
        "train.ema.small_grad",
    ] {
        assert!(names.contains(&case), "case {case} not run: {names:?}");
    }
    for r in &reports {
        println!("{} {:.3e} {}", r.case, r.max_abs_err, r.detail);
        assert!(
            r.passed(),
            "{} failed: {:.3e} > {:.0e} ({})",
            r.case,
            r.max_abs_err,
            r.tol,
            r.detail
        );
    }
}

#[test]
fn a_different_learning_rate_fails_the_final_weights() {
    let src = fixtures();
    let dir = tempfile::tempdir().unwrap();
    for ext in ["json", "weights.safetensors"] {
        std::fs::copy(
            src.join(format!("generator_train_tiny.{ext}")),
            dir.path().join(format!("g.{ext}")),
        )
        .unwrap();
    }
    let io = Tensor::read_safetensors(src.join("generator_train_tiny.io.safetensors")).unwrap();
    let io: Vec<(String, Tensor)> = io
        .into_iter()
        .map(|(k, t)| {
            if k == "train.hparams" {
                let h = t.copy();
                let _doubled = h.get(0).g_mul_scalar_(2.0);
                (k, h)
            } else {
                (k, t)
            }
        })
        .collect();
    Tensor::write_safetensors(&io, dir.path().join("g.io.safetensors")).unwrap();
    let reports = train_reports(&dir.path().join("g"));
    let last = reports.iter().find(|r| r.case == "train.final").unwrap();
    assert!(!last.passed(), "twice the lr passed: {last:?}");
    // The gradients of step 0 do not depend on the lr.
    let grads = reports
        .iter()
        .find(|r| r.case == "train.step0.grads")
        .unwrap();
    assert!(grads.passed(), "{grads:?}");
}
