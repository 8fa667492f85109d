//! `eqim sample` end to end on the parity fixtures: the generator's tokens, scaled back by
//! vae_norm and decoded by the tokenizer, become PNGs whose width follows the token count.

use eqim_worker::model::tokenizer::Parts;
use eqim_worker::sample_images::{run, SampleOptions};
use eqim_worker::sampling::CfgSchedule;
use eqim_worker::tokenizer_io::{
    decode_to_pngs, load_tokenizer_parts, read_tokens, TokenizerOptions,
};
use std::path::PathBuf;

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

#[test]
fn sample_writes_decoded_pngs_equal_to_decoding_its_tokens() {
    tch::set_num_threads(1);
    let fx = fixtures();
    let out = tempfile::tempdir().unwrap();
    let tokenizer = TokenizerOptions {
        config: Some(fx.join("tokenizer_tiny.json")),
        checkpoint: Some(fx.join("tokenizer_tiny.weights.safetensors")),
        weights: None,
        random_weights: false,
        seed: 0,
        device: tch::Device::Cpu,
    };
    let written = run(SampleOptions {
        generator_weights: fx.join("generator_tiny.weights.safetensors"),
        generator_config: fx.join("generator_tiny.json"),
        labels: vec![1, 7],
        num: None,
        length: Some(8),
        cfg: 2.0,
        cfg_schedule: CfgSchedule::Linear,
        steps: Some(2),
        sample_seed: 3,
        vae_norm: 0.5,
        out: out.path().to_owned(),
        precision: None,
        tokenizer: tokenizer.clone(),
    })
    .unwrap();
    assert_eq!(written.len(), 2);
    // tokenizer_tiny: 32 px tall, 2 px per token.
    let img = image::open(&written[1]).unwrap();
    assert_eq!((img.width(), img.height()), (16, 32));

    // The same tokens decoded separately give the same bytes.
    let tokens = read_tokens(&out.path().join("tokens.safetensors")).unwrap();
    assert_eq!(tokens.size(), vec![2, 8, 16]);
    let again = tempfile::tempdir().unwrap();
    let tok = load_tokenizer_parts(&tokenizer, Parts::DecoderOnly).unwrap();
    let paths = decode_to_pngs(&tok, &tokens, 0.5, again.path()).unwrap();
    for (a, b) in written.iter().zip(&paths) {
        assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    }
}
