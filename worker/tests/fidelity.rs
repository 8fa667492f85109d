//! eqim's FID/IS pipeline against torch-fidelity 0.4.0 (the paper's metric code) run with the same
//! Inception weights: the TF1-resized 299x299 input, the 2048-d features, numpy's
//! RandomState(2020) permutation and the Inception Score on a random 1008-class layer. The
//! fixture comes from `scripts/make-fidelity-fixture` (see scripts/fidelity_reference.py).

use std::collections::HashMap;
use std::path::PathBuf;

use eqim_common::fid::reference_cases::SplitMix64;
use eqim_common::fid::{FeatureMoments, FidStats};
use eqim_common::npz::{write_npz, NpyArray};
use eqim_worker::eval::fid::inception_score;
use eqim_worker::eval::inception::{
    default_inception_path, preprocess_images, read_classifier, resize_bilinear_tf1, Inception,
    INCEPTION_DIM, INCEPTION_SIZE,
};
use eqim_worker::eval::numpy_rng::numpy_permutation;
use tch::{Device, Kind, Tensor};

/// The fixture's images, in the order of its logits rows.
const IMAGES: [&str; 5] = ["32", "48x64", "256", "331x300", "299"];

fn fixture() -> HashMap<String, Tensor> {
    tch::set_num_threads(2);
    let path = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fidelity/fixture.npz"
    ));
    Tensor::read_npz(&path)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run scripts/make-fidelity-fixture)",
                path.display()
            )
        })
        .into_iter()
        .collect()
}

fn get<'a>(f: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    f.get(name)
        .unwrap_or_else(|| panic!("fixture has no array '{name}'"))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    f64::try_from(
        (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
            .abs()
            .max(),
    )
    .expect("max")
}

/// The real Inception, or None (and a note) when scripts/fetch-inception has not run.
fn real_inception() -> Option<Inception> {
    let path = default_inception_path();
    if !path.is_file() {
        eprintln!(
            "skipping: Inception file {} absent (run scripts/fetch-inception)",
            path.display()
        );
        return None;
    }
    Some(Inception::load(&path, Device::Cpu).expect("load the fetched Inception"))
}

/// The fixture's random classifier: splitmix64(seed) uniform [-1, 1) times scale, [1008, 2048].
fn random_classifier(f: &HashMap<String, Tensor>) -> Tensor {
    let seed_scale = Vec::<f64>::try_from(get(f, "classifier_seed_scale")).expect("f64");
    let values: Vec<f32> = SplitMix64(seed_scale[0] as u64)
        .uniform(1008 * INCEPTION_DIM)
        .into_iter()
        .map(|v| (v * seed_scale[1]) as f32)
        .collect();
    Tensor::from_slice(&values).view([1008, INCEPTION_DIM as i64])
}

#[test]
fn tf1_resize_equals_torch_fidelity_input() {
    let f = fixture();
    for name in IMAGES {
        let image = get(&f, &format!("image_{name}")).unsqueeze(0);
        // torch-fidelity stores rows 0, 10, 20, ... of the resized (not yet normalized) input.
        let want = get(&f, &format!("resized_rows10_{name}"));
        let rows = Tensor::arange_start_step(0, INCEPTION_SIZE, 10, (Kind::Int64, Device::Cpu));
        let ours = resize_bilinear_tf1(&image.to_kind(Kind::Float), INCEPTION_SIZE, INCEPTION_SIZE);
        let diff = max_abs_diff(&ours.get(0).index_select(1, &rows), want);
        assert!(diff <= 1e-5, "{name}: resized input differs by {diff}");
        // What the network sees: the same, normalized.
        let input = preprocess_images(&image, Device::Cpu).expect("preprocess");
        let diff = max_abs_diff(
            &input.get(0).index_select(1, &rows),
            &((want - 128.0) / 128.0),
        );
        assert!(diff <= 1e-7, "{name}: normalized input differs by {diff}");
    }
}

#[test]
fn tf1_resize_is_not_half_pixel_bilinear() {
    // The two resizes disagree on the fixture's 32 px image, so the test above can tell them apart.
    let f = fixture();
    let image = get(&f, "image_32").unsqueeze(0).to_kind(Kind::Float);
    let tf1 = resize_bilinear_tf1(&image, INCEPTION_SIZE, INCEPTION_SIZE);
    let torch = image.upsample_bilinear2d([INCEPTION_SIZE, INCEPTION_SIZE], false, None, None);
    assert!(max_abs_diff(&tf1, &torch) > 10.0);
}

#[test]
fn features_equal_torch_fidelity() {
    let Some(net) = real_inception() else { return };
    let f = fixture();
    for name in IMAGES {
        let image = get(&f, &format!("image_{name}")).unsqueeze(0);
        let (features, _) = net.forward(&image).expect("forward");
        let want = get(&f, &format!("features_{name}")).unsqueeze(0);
        let diff = max_abs_diff(&features, &want);
        assert!(diff <= 1e-5, "{name}: features differ by {diff}");
    }
}

#[test]
fn permutation_equals_numpy_random_state_2020() {
    let f = fixture();
    for n in [1usize, 2, 10, 1000, 3001] {
        let want = Vec::<i64>::try_from(get(&f, &format!("permutation_{n}"))).expect("i64");
        let ours: Vec<i64> = numpy_permutation(n, 2020)
            .into_iter()
            .map(|i| i as i64)
            .collect();
        assert_eq!(ours, want, "permutation({n})");
    }
}

#[test]
fn inception_score_equals_torch_fidelity_on_random_logits() {
    let f = fixture();
    let (mean, std) = inception_score(get(&f, "random_logits"), 10).expect("is");
    let want = Vec::<f64>::try_from(get(&f, "isc_random_logits_splits10")).expect("f64");
    assert!(
        (mean - want[0]).abs() <= 1e-12 * want[0],
        "{mean} vs {}",
        want[0]
    );
    assert!(
        (std - want[1]).abs() <= 1e-10 * want[0],
        "{std} vs {}",
        want[1]
    );
}

#[test]
fn inception_score_with_a_1008_class_layer_equals_torch_fidelity() {
    let Some(net) = real_inception() else { return };
    let f = fixture();
    assert!(!net.has_logits());
    // Through the file `--inception-classifier` reads (f64 npz `weight`, as np.savez writes it).
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("fc.npz");
    let weight = random_classifier(&f);
    let values = Vec::<f64>::try_from(weight.to_kind(Kind::Double).flatten(0, 1)).expect("f64");
    write_npz(
        &file,
        &[("weight", &NpyArray::new(vec![1008, INCEPTION_DIM], values))],
    )
    .expect("write");
    let read = read_classifier(&file).expect("read classifier");
    assert_eq!(max_abs_diff(&read, &weight), 0.0);
    let net = net.with_classifier(read).expect("classifier");
    assert!(net.has_logits());
    let images: Vec<Tensor> = IMAGES
        .iter()
        .map(|name| {
            let image = get(&f, &format!("image_{name}")).unsqueeze(0);
            preprocess_images(&image, Device::Cpu).expect("preprocess")
        })
        .collect();
    let (_, logits) = net
        .forward_preprocessed(&Tensor::cat(&images, 0))
        .expect("forward");
    let logits = logits.expect("logits");
    let want = get(&f, "logits_unbiased");
    let diff = max_abs_diff(&logits, want);
    assert!(diff <= 1e-4, "logits differ by {diff}");
    for splits in [1usize, 2, 3] {
        let (mean, std) = inception_score(&logits, splits).expect("is");
        let want =
            Vec::<f64>::try_from(get(&f, &format!("isc_images_splits{splits}"))).expect("f64");
        assert!(
            (mean - want[0]).abs() <= 1e-5 * want[0],
            "splits {splits}: {mean} vs {}",
            want[0]
        );
        assert!(
            (std - want[1]).abs() <= 1e-5 * want[0],
            "splits {splits}: {std} vs {}",
            want[1]
        );
    }
}

fn fixture_file(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/fidelity"
    ))
    .join(name)
}

/// eqim's statistics of the fixture's small [6, 8] feature set.
fn small_stats(f: &HashMap<String, Tensor>) -> FidStats {
    let rows = Vec::<f32>::try_from(get(f, "small_features").flatten(0, 1)).expect("f32");
    let mut moments = FeatureMoments::new(8);
    moments.add_rows(&rows).expect("rows");
    moments.stats().expect("stats")
}

/// sigma to f64 round-off; mu to f32 round-off, because torch-fidelity's mu is `np.mean` of the
/// f32 features, which numpy computes in f32 (`np.cov` converts to f64).
fn assert_stats_close(got: &FidStats, want: &FidStats) {
    assert_eq!(got.dim, want.dim);
    for (a, b) in got.sigma.iter().zip(&want.sigma) {
        assert!(
            (a - b).abs() <= 1e-12 * b.abs().max(1.0),
            "sigma {a} vs {b}"
        );
    }
    for (a, b) in got.mu.iter().zip(&want.mu) {
        assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "mu {a} vs {b}");
    }
}

#[test]
fn torch_fidelity_cached_statistics_load() {
    let f = fixture();
    let path = fixture_file("small-inception-v3-compat-stat-fid-8.pt");
    let stats = FidStats::read(&path).expect("torch-fidelity cache file");
    assert_stats_close(&stats, &small_stats(&f));
}

#[test]
fn adm_reference_batch_statistics_load_without_reading_the_images() {
    let f = fixture();
    let stats = FidStats::read(&fixture_file("adm_style_ref_batch.npz")).expect("ADM npz");
    assert_stats_close(&stats, &small_stats(&f));
}

#[test]
fn a_file_without_mu_and_sigma_is_refused_naming_its_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("other.npz");
    let m = NpyArray::new(vec![2], vec![1.0, 2.0]);
    write_npz(&path, &[("m", &m), ("s", &m)]).expect("write");
    let err = FidStats::read(&path).expect_err("no mu/sigma").to_string();
    assert!(
        err.contains("[\"m\", \"s\"]") && err.contains("'mu'"),
        "{err}"
    );
    // A torch.save archive of other arrays is refused the same way.
    let err = FidStats::read(&fixture_file("not-stats.pt"))
        .expect_err("no mu/sigma")
        .to_string();
    assert!(err.contains("[\"mean\", \"cov\"]"), "{err}");
}

/// Timing of the 2048-d distance at 3000 images per side, both implementations on the same
/// statistics (run by hand: `cargo test -p eqim-worker --test fidelity -- --ignored --nocapture`).
#[test]
#[ignore]
fn distance_timing_at_2048_dimensions_and_3000_images() {
    let d = INCEPTION_DIM;
    let mut rng = SplitMix64(5);
    let mut stats = Vec::new();
    for _ in 0..2 {
        let rows: Vec<f32> = rng
            .uniform(3000 * d)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let mut moments = FeatureMoments::new(d);
        eqim_worker::eval::fid::add_feature_batch(
            &mut moments,
            &Tensor::from_slice(&rows).view([3000, d as i64]),
        )
        .expect("add");
        stats.push(moments.stats().expect("stats"));
    }
    let started = std::time::Instant::now();
    let fast = eqim_worker::eval::fid::frechet_distance(&stats[0], &stats[1]).expect("tch");
    let tch_seconds = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let pure = eqim_common::fid::frechet_distance(&stats[0], &stats[1]).expect("pure");
    let pure_seconds = started.elapsed().as_secs_f64();
    println!(
        "2048-d, 3000 images per side: libtorch {fast:.6} in {tch_seconds:.2} s \
         ({} threads), pure Rust {pure:.6} in {pure_seconds:.2} s",
        tch::get_num_threads()
    );
    assert!((fast - pure).abs() <= 1e-9 * pure.abs());
}

#[test]
fn pickled_f32_and_fortran_arrays_load_and_big_endian_is_refused() {
    let f = fixture();
    let want = small_stats(&f);
    let got = FidStats::read(&fixture_file("f4-fortran-stat.pt")).expect("f4 + Fortran");
    assert_stats_close(&got, &want);
    let err = FidStats::read(&fixture_file("big-endian-stat.pt"))
        .expect_err("big-endian")
        .to_string();
    assert!(err.contains(">f8"), "{err}");
}
