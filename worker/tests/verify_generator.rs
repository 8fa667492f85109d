//! `eqim verify-reference` on the generator_tiny fixture, at 1e-5.

use std::path::PathBuf;

/// The shared fixtures: `$EQIM_FIXTURES`, else `<repo>/../shared/fixtures` (CI clones the repo
/// next to `shared/`).
fn fixtures() -> PathBuf {
    // One intra-op thread: the models are tiny, and on a loaded 2-core CI box spinning OpenMP
    // workers make these tests 30-50x slower.
    tch::set_num_threads(1);
    std::env::var_os("EQIM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        })
}

#[test]
fn generator_tiny_matches_the_reference_at_1e_5() {
    let prefix = fixtures().join("generator_tiny");
    let opts = eqim_worker::verify::VerifyOptions::new(1e-5);
    let reports = eqim_worker::verify::run(&prefix, &opts).expect("running the fixture");
    let names: Vec<&str> = reports.iter().map(|r| r.case.as_str()).collect();
    for case in [
        "encoder",
        "encoder_uncond",
        "encoder_long",
        "head",
        "head_cfg",
        "loss",
        "sample",
        "sample_cached",
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
fn a_wrong_config_or_an_extra_weight_is_caught() {
    let src = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("g");
    for ext in ["weights.safetensors", "io.safetensors"] {
        std::fs::copy(
            src.join(format!("generator_tiny.{ext}")),
            dir.path().join(format!("g.{ext}")),
        )
        .unwrap();
    }
    let text = std::fs::read_to_string(src.join("generator_tiny.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    // The window decides every output: a wider one must show up as an error above tolerance.
    json["cond_length"] = serde_json::json!(4);
    std::fs::write(dir.path().join("g.json"), json.to_string()).unwrap();
    let opts = eqim_worker::verify::VerifyOptions::new(1e-5);
    let reports = eqim_worker::verify::run(&prefix, &opts).unwrap();
    let encoder = reports.iter().find(|r| r.case == "encoder").unwrap();
    assert!(!encoder.passed(), "a wrong window passed: {encoder:?}");

    // One block too many: the fixture's weights miss its keys and the load is refused.
    json["cond_length"] = serde_json::json!(3);
    json["encoder_depth"] = serde_json::json!(2);
    json["parameter_count"] = serde_json::Value::Null;
    std::fs::write(dir.path().join("g.json"), json.to_string()).unwrap();
    let err = eqim_worker::verify::run(&prefix, &opts).unwrap_err();
    assert!(
        format!("{err:#}").contains("encoder_blocks.2.attn.qkv.weight"),
        "{err:#}"
    );
}
