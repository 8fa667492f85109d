//! `eqim eval` end to end with real processes (a coordinator running an evaluation job and
//! `eqim eval-worker`s leasing batches over QUIC): the PNG bytes of every index are the same
//! with 1, 2 and 3 workers and when a worker is SIGKILLed mid-lease; the manifest describes the
//! files; the npz holds the same pixels; the coordinator's FID equals `eqim fid` on the folder.

use std::path::{Path, PathBuf};
use std::process::Command;

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

const IMAGES: u64 = 30;

/// The plan flags of the tiny fixture set, shared by `eqim eval` and `eqim eval-worker`.
fn plan_flags(command: &mut Command, out: &Path) {
    let f = fixtures();
    command
        .arg("--weights")
        .arg(f.join("generator_tiny.weights.safetensors"))
        .arg("--config")
        .arg(f.join("generator_tiny.json"))
        .arg("--tokenizer-config")
        .arg(f.join("tokenizer_tiny.json"))
        .arg("--tokenizer-checkpoint")
        .arg(f.join("tokenizer_tiny.weights.safetensors"))
        .arg("--out")
        .arg(out)
        .args(["--num-images", &IMAGES.to_string()])
        .args(["--length", "8", "--steps", "6", "--cfg", "3.0"])
        .args(["--batch-size", "2"]);
}

/// Runs `eqim eval` on the tiny fixtures and returns its stdout.
fn eval(out: &Path, extra: &[&str]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_eqim"));
    command.arg("eval");
    plan_flags(&mut command, out);
    let output = command
        .args(["--lease-images", "4"])
        // A killed worker is noticed after 1 s (QUIC idle timeout).
        .args(["--heartbeat-timeout-ms", "1000"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("running eqim eval");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "eqim eval {extra:?} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn png_bytes(dir: &Path) -> Vec<Vec<u8>> {
    (0..IMAGES)
        .map(|i| std::fs::read(dir.join(format!("{i:05}.png"))).expect("png written"))
        .collect()
}

#[test]
fn png_bytes_do_not_depend_on_the_worker_count_or_a_killed_worker() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (one, two, killed) = (
        dir.path().join("one"),
        dir.path().join("two"),
        dir.path().join("killed"),
    );
    let npz = dir.path().join("one.npz");
    eval(
        &one,
        &["--workers", "1", "--npz", npz.to_str().expect("utf-8")],
    );
    // Two workers through `eqim launch` and a coordinator config with an eval: section.
    let config = dir.path().join("eval.yaml");
    std::fs::write(
        &config,
        format!(
            "bind: 127.0.0.1:0\njob_dir: {}\nexpected_workers: 2\nmin_workers: 1\nmax_workers: 2\n\
             eval:\n  num_images: {IMAGES}\n  lease_images: 4\n  out: {}\n",
            dir.path().join("job").display(),
            two.display()
        ),
    )
    .expect("config");
    let mut launch = Command::new(env!("CARGO_BIN_EXE_eqim"));
    launch
        .args(["launch", "--workers", "2", "--config"])
        .arg(&config)
        .arg("--");
    plan_flags(&mut launch, &two);
    let launched = launch
        .env("RUST_LOG", "warn")
        .output()
        .expect("eqim launch");
    assert!(
        launched.status.success(),
        "eqim launch of an evaluation job failed:\n{}",
        String::from_utf8_lossy(&launched.stderr)
    );
    assert!(two.join("manifest.json").is_file());
    let report = eval(&killed, &["--workers", "3", "--kill-worker-after", "1:1"]);
    assert!(
        report.contains("1 died"),
        "worker 1 was not killed:\n{report}"
    );
    let reference = png_bytes(&one);
    assert_eq!(png_bytes(&two), reference, "1 vs 2 workers (eqim launch)");
    assert_eq!(png_bytes(&killed), reference, "3 workers, one SIGKILLed");
    assert_ne!(
        reference[0], reference[1],
        "indices differ in noise and label"
    );

    // The coordinator's manifest: labels in the balanced order, the workers' file hashes.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(killed.join("manifest.json")).expect("manifest"))
            .expect("json");
    let images = manifest["images"].as_array().expect("images");
    assert_eq!(images.len(), IMAGES as usize);
    assert_eq!(images[29]["label"], 9);
    for (i, entry) in images.iter().enumerate() {
        let digest = <sha2::Sha256 as sha2::Digest>::digest(&reference[i]);
        assert_eq!(entry["sha256"], hex::encode(digest), "image {i}");
    }
    assert_eq!(manifest["batch_size"], 2);

    // The npz holds the PNGs' pixels, [N, H, W, 3] uint8.
    let mut archive =
        zip::ZipArchive::new(std::fs::File::open(&npz).expect("npz")).expect("zip archive");
    let mut member = archive.by_name("arr_0.npy").expect("arr_0");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut member, &mut bytes).expect("read");
    let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let data = &bytes[10 + header_len..];
    let first = image::load_from_memory(&reference[0])
        .expect("png")
        .to_rgb8();
    let (w, h) = first.dimensions();
    assert_eq!(data.len(), IMAGES as usize * (w * h * 3) as usize);
    assert_eq!(&data[..(w * h * 3) as usize], first.as_raw().as_slice());
}

#[test]
fn an_eval_worker_survives_a_coordinator_restart_and_the_set_is_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reference_dir = dir.path().join("reference");
    eval(&reference_dir, &["--workers", "1"]);
    let out = dir.path().join("restarted");
    let job = dir.path().join("job");
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let config = dir.path().join("eval.yaml");
    std::fs::write(
        &config,
        format!(
            "bind: 127.0.0.1:{port}\njob_dir: {}\nexpected_workers: 1\nmin_workers: 1\nmax_workers: 1\n\
             timeouts:\n  heartbeat_interval: 0.2\n  heartbeat_timeout: 1.0\n  quic_idle_timeout: 1.0\n\
             eval:\n  num_images: {IMAGES}\n  lease_images: 2\n  out: {}\n",
            job.display(),
            out.display()
        ),
    )
    .expect("config");
    let coordinator = || {
        Command::new(env!("CARGO_BIN_EXE_eqim"))
            .args(["coordinator", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("coordinator")
    };
    let mut first = coordinator();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_eqim"));
    worker.arg("eval-worker");
    plan_flags(&mut worker, &out);
    let mut worker = worker
        .arg("--coordinator")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--token")
        .arg(job.join("token"))
        .args(["--connect-timeout", "60", "--batches-per-lease", "1"])
        .args(["--pause-after-each-image-ms", "100"])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("eval worker");
    // Kill the coordinator once a few leases are saved, then start it again.
    let state = out.join(".eval-state");
    let saved = || {
        std::fs::read_dir(&state)
            .map(|d| {
                d.filter(|e| {
                    e.as_ref()
                        .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "bin"))
                })
                .count()
            })
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while saved() < 3 {
        assert!(std::time::Instant::now() < deadline, "no leases saved");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    first.kill().expect("SIGKILL the coordinator");
    first.wait().expect("reap");
    let before = saved();
    assert!(
        before < (IMAGES / 2) as usize,
        "the set finished before the restart"
    );
    let mut second = coordinator();
    let worker_status = worker.wait().expect("worker");
    let coordinator_status = second.wait().expect("coordinator");
    assert!(
        worker_status.success(),
        "the worker did not finish: {worker_status}"
    );
    assert!(coordinator_status.success(), "{coordinator_status}");
    assert_eq!(
        png_bytes(&out),
        png_bytes(&reference_dir),
        "same set after the restart"
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).expect("manifest"))
            .expect("json");
    let hashes = manifest["images"].as_array().expect("images");
    assert!(
        hashes.iter().all(|e| e["sha256"].is_string()),
        "restored leases keep their hashes"
    );
}

#[test]
fn the_coordinators_fid_equals_fid_of_the_written_folder() {
    let inception = std::env::var_os("EQIM_INCEPTION")
        .map(PathBuf::from)
        .unwrap_or_else(eqim_worker::eval::inception::default_inception_path);
    if !inception.is_file() {
        // scripts/setup fetches it; the suite must not need 87 MB to build elsewhere.
        eprintln!(
            "skipping: Inception file {} absent (run scripts/fetch-inception)",
            inception.display()
        );
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // Reference statistics: 12 fixed random feature vectors.
    let stats = dir.path().join("ref.npz");
    let mut reference = eqim_common::fid::FeatureMoments::new(2048);
    let rows: Vec<f32> = (0..12 * 2048)
        .map(|k| ((k * 7919 % 1000) as f32) / 1000.0)
        .collect();
    reference.add_rows(&rows).expect("rows");
    reference
        .stats()
        .expect("stats")
        .write(&stats)
        .expect("write");
    let out = dir.path().join("set");
    let report = eval(
        &out,
        &[
            "--workers",
            "2",
            "--kill-worker-after",
            "0:1",
            "--fid-stats",
            stats.to_str().expect("utf-8"),
        ],
    );
    let fid_line = |text: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("fid "))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no fid line in:\n{text}"))
    };
    let from_coordinator = fid_line(&report);
    let folder = Command::new(env!("CARGO_BIN_EXE_eqim"))
        .args(["fid", "--device", "cpu", "--images"])
        .arg(&out)
        .arg("--stats")
        .arg(&stats)
        .output()
        .expect("eqim fid");
    assert!(folder.status.success(), "{folder:?}");
    let from_folder = fid_line(&String::from_utf8_lossy(&folder.stdout));
    // Both print 4 decimals; the sums differ only in f64 round-off.
    assert!(
        (from_coordinator - from_folder).abs() <= 1e-3 + 1e-6 * from_folder.abs(),
        "coordinator {from_coordinator} vs folder {from_folder}"
    );
}
