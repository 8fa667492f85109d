//! `eqim plan-memory` against the measured peak RSS of real CPU training steps (its `--measure`
//! runs them in a fresh process, so the peak is this model's alone): the tiny generator at a
//! micro-batch whose activations dominate, within 15 %. The small preset is measured the same way
//! in BENCHMARKS.md (it needs ~3 GB and a minute, too much for every CI run).

use std::process::Command;

fn plan(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_eqim"))
        .arg("plan-memory")
        .args(args)
        .arg("--json")
        .env("OMP_NUM_THREADS", "1")
        .output()
        .expect("running eqim plan-memory");
    assert!(
        out.status.success(),
        "eqim plan-memory failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("plan-memory --json prints JSON")
}

fn config() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../configs/generator-tiny.toml"
    )
    .to_owned()
}

#[test]
fn tiny_plan_is_within_15_percent_of_the_measured_peak_rss() {
    let v = plan(&["--config", &config(), "--batch", "256", "--measure", "2"]);
    let planned = v["peak_bytes"].as_u64().unwrap();
    let measured = v["measured_peak_bytes"].as_u64().unwrap();
    let ratio = measured as f64 / planned as f64;
    println!("tiny, micro-batch 256: planned {planned} B, measured {measured} B, ratio {ratio:.3}");
    assert!(
        (0.85..=1.15).contains(&ratio),
        "measured {measured} B vs planned {planned} B (ratio {ratio:.3})"
    );
    // Activations dominate at this batch, so the check is about them, not the fixed state.
    assert!(v["activations_bytes"].as_u64().unwrap() > 4 * v["weights_bytes"].as_u64().unwrap());
}

#[test]
fn largest_micro_batch_fits_the_given_device_memory() {
    let v = plan(&["--preset", "base", "--batch", "64", "--device-memory", "80"]);
    let largest = v["largest_micro_batch"].as_u64().unwrap();
    assert!(largest >= 64, "{v}");
    let at_largest = plan(&[
        "--preset",
        "base",
        "--batch",
        &largest.to_string(),
        "--device-memory",
        "80",
    ]);
    assert_eq!(at_largest["fits"], true);
    let over = plan(&[
        "--preset",
        "base",
        "--batch",
        &(largest + 1).to_string(),
        "--device-memory",
        "80",
    ]);
    assert_eq!(over["fits"], false);
    let bf16 = plan(&[
        "--preset",
        "base",
        "--precision",
        "bf16",
        "--device-memory",
        "80",
    ]);
    assert!(bf16["largest_micro_batch"].as_u64().unwrap() > largest);
}
