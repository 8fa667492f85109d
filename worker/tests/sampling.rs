//! The KV-cached sampler against full recompute on long sequences, prefixes and unconditional
//! sampling, with the generator_tiny fixture's weights.

use eqim_worker::model::generator::{EquivariantGenerativeModel, Mode};
use eqim_worker::sampling::{
    sample_cached, sample_exact, seeded_noise, CfgSchedule, KvCache, SampleSpec,
};
use eqim_worker::verify::{generator::load_model, max_abs_diff, FixtureFiles};
use std::path::PathBuf;
use tch::{nn, Device, Kind, Tensor};

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

fn tiny() -> (nn::VarStore, EquivariantGenerativeModel) {
    let files = FixtureFiles::from_prefix(&fixtures().join("generator_tiny")).unwrap();
    let json = files.read_json().unwrap();
    load_model(&files, &json).unwrap()
}

fn both(model: &EquivariantGenerativeModel, spec: &SampleSpec, seed: i64) -> f64 {
    // Drawn once: other tests in this binary initialise models on the global CPU generator
    // concurrently, so two separate draws of the same seed are not guaranteed to match.
    let noise = seeded_noise(seed, spec.num_iter, spec.batch, 16);
    let exact = sample_exact(model, spec, &mut noise.clone(), &mut |_| {}).unwrap();
    let cached = sample_cached(model, spec, &mut noise.clone(), &mut |_| {}).unwrap();
    assert_eq!(exact.size(), vec![spec.batch, spec.num_iter, 16]);
    if let Some(prefix) = spec.prefix {
        let p = prefix.size()[1];
        assert!(exact.narrow(1, 0, p).equal(prefix) && cached.narrow(1, 0, p).equal(prefix));
    }
    max_abs_diff(&exact, &cached).unwrap()
}

fn spec(num_iter: i64, labels: Option<&Tensor>) -> SampleSpec<'_> {
    SampleSpec {
        batch: 2,
        labels,
        prefix: None,
        num_iter,
        cfg: 3.0,
        cfg_schedule: CfgSchedule::Linear,
        num_steps: 8,
        temperature: 1.0,
    }
}

#[test]
fn cached_sampler_equals_full_recompute_on_64_tokens() {
    let (_vs, model) = tiny();
    let labels = Tensor::from_slice(&[3i64, 7]);
    let err = both(&model, &spec(64, Some(&labels)), 11);
    println!("64 tokens: max abs diff {err:.3e}");
    assert!(err < 1e-4, "{err}");
}

#[test]
fn cached_sampler_equals_full_recompute_on_256_tokens() {
    let (_vs, model) = tiny();
    let labels = Tensor::from_slice(&[0i64, 9]);
    let mut s = spec(256, Some(&labels));
    s.num_steps = 4;
    let err = both(&model, &s, 12);
    println!("256 tokens: max abs diff {err:.3e}");
    assert!(err < 1e-4, "{err}");
}

#[test]
fn prefix_unconditional_and_unguided_sampling_agree_too() {
    let (_vs, model) = tiny();
    let prefix = Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu));
    let mut s = spec(12, None);
    s.prefix = Some(&prefix);
    s.cfg_schedule = CfgSchedule::Constant;
    assert!(both(&model, &s, 3) < 1e-4);
    let labels = Tensor::from_slice(&[1i64, 2]);
    let mut s = spec(12, Some(&labels));
    s.cfg = 1.0;
    assert!(both(&model, &s, 4) < 1e-4);
}

#[test]
fn the_cache_holds_one_window_whatever_the_length() {
    let (_vs, model) = tiny();
    let _g = tch::no_grad_guard();
    let ce = model.fake_class_embedding(2);
    let tokens = Tensor::randn([2, 300, 16], (Kind::Float, Device::Cpu));
    let full = model.forward_encoder(&tokens, &ce, Mode::Eval).unwrap();
    let mut cache = KvCache::new(&model, &ce, 300);
    assert!(max_abs_diff(cache.first_row(), &full.select(1, 0)).unwrap() < 1e-5);
    let mut worst = 0f64;
    for j in 0..299 {
        let row = cache.feed(&model, &tokens.select(1, j));
        worst = worst.max(max_abs_diff(&row, &full.select(1, j + 1)).unwrap());
        assert!(cache.cached_keys() <= model.cfg.cond_length + 1);
    }
    assert_eq!(cache.fed(), 299);
    assert!(
        worst < 1e-5,
        "cached rows differ from the full forward by {worst}"
    );
}

#[test]
fn sample_tokens_command_writes_the_tokens_of_either_sampler() {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: eqim_worker::cli::sample::SampleTokensArgs,
    }
    let f = fixtures().join("generator_tiny");
    let dir = tempfile::tempdir().unwrap();
    let mut outputs = Vec::new();
    for exact in [false, true] {
        let out = dir.path().join(format!("t{exact}.safetensors"));
        let mut argv = vec![
            "x".to_string(),
            format!("--weights={}.weights.safetensors", f.display()),
            format!("--config={}.json", f.display()),
            "--labels=1,2,3".into(),
            "--length=6".into(),
            "--cfg=2.0".into(),
            "--steps=5".into(),
            format!("--output={}", out.display()),
        ];
        if exact {
            argv.push("--exact".into());
        }
        eqim_worker::cli::sample::sample_tokens(Cli::parse_from(argv).args).unwrap();
        let t = eqim_worker::model::weights::read_safetensors(&out).unwrap();
        assert_eq!(t["tokens"].size(), vec![3, 6, 16]);
        assert_eq!(Vec::<i64>::try_from(&t["labels"]).unwrap(), vec![1, 2, 3]);
        outputs.push(t["tokens"].shallow_clone());
    }
    assert!(max_abs_diff(&outputs[0], &outputs[1]).unwrap() < 1e-4);
    assert!(outputs[0].abs().sum(Kind::Float).double_value(&[]) > 0.0);
}
