//! eqim's side of `scripts/bench-generator`: times one generator workload and prints one JSON line.
//!
//!     bench_generator train  --model tiny|small|... --batch 8 --iters 3
//!     bench_generator sample --model small --tokens 16 --batch 4 --steps 100 --cfg 4 [--exact]
//!
//! `--model tiny` is the generator_tiny fixture's shape; the others are the README presets.
//! Weights are random: timing does not depend on their values.

use anyhow::{bail, Context, Result};
use eqim_worker::model::generator::{EquivariantGenerativeModel, GeneratorConfig, Mode};
use eqim_worker::sampling::{sample_cached, sample_exact, seeded_noise, CfgSchedule, SampleSpec};
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

fn tiny() -> GeneratorConfig {
    GeneratorConfig {
        token_num: 16,
        encoder_embed_dim: 64,
        encoder_depth: 1,
        encoder_num_heads: 4,
        decoder_embed_dim: 64,
        decoder_depth: 1,
        decoder_num_heads: 4,
        vae_embed_dim: 16,
        class_num: 10,
        buffer_size: 16,
        diffloss_d: 2,
        diffloss_w: 64,
        num_sampling_steps: 8,
        cond_length: 3,
        ..GeneratorConfig::default()
    }
}

struct Opts {
    what: String,
    model: String,
    batch: i64,
    tokens: i64,
    steps: i64,
    cfg: f64,
    iters: usize,
    exact: bool,
}

fn parse() -> Result<Opts> {
    let mut args = std::env::args().skip(1);
    let what = args
        .next()
        .context("usage: bench_generator train|sample [options]")?;
    let mut o = Opts {
        what,
        model: "tiny".into(),
        batch: 8,
        tokens: 16,
        steps: 100,
        cfg: 4.0,
        iters: 3,
        exact: false,
    };
    while let Some(flag) = args.next() {
        if flag == "--exact" {
            o.exact = true;
            continue;
        }
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => o.model = value,
            "--batch" => o.batch = value.parse()?,
            "--tokens" => o.tokens = value.parse()?,
            "--steps" => o.steps = value.parse()?,
            "--cfg" => o.cfg = value.parse()?,
            "--iters" => o.iters = value.parse()?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(o)
}

fn main() -> Result<()> {
    let o = parse()?;
    let cfg = match o.model.as_str() {
        "tiny" => tiny(),
        name => GeneratorConfig::preset(name)?,
    };
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = EquivariantGenerativeModel::new(vs.root(), &cfg)?;
    // Random everything (the reference zero-initialises the head's output layers).
    tch::no_grad(|| {
        for (_, mut v) in vs.variables() {
            let r = Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.02;
            v.copy_(&r);
        }
    });
    let labels = Tensor::arange(o.batch, (Kind::Int64, Device::Cpu)).remainder(cfg.class_num);
    let seconds: Vec<f64> = match o.what.as_str() {
        "train" => {
            let x0 = Tensor::randn(
                [o.batch, o.tokens, cfg.vae_embed_dim],
                (Kind::Float, Device::Cpu),
            );
            let mut times = Vec::new();
            for _ in 0..=o.iters {
                let start = Instant::now();
                let loss = model.forward_loss(&x0, &labels, None, Mode::Train)?;
                // Forward + backward only: the optimizer and clipping belong to the training loop.
                loss.loss.backward();
                times.push(start.elapsed().as_secs_f64());
            }
            times.remove(0); // warm-up
            times
        }
        "sample" => {
            let spec = SampleSpec {
                batch: o.batch,
                labels: Some(&labels),
                prefix: None,
                num_iter: o.tokens,
                cfg: o.cfg,
                cfg_schedule: CfgSchedule::Linear,
                num_steps: o.steps,
                temperature: 1.0,
            };
            let mut times = Vec::new();
            for _ in 0..o.iters {
                let mut noise = seeded_noise(1, o.tokens, o.batch, cfg.vae_embed_dim);
                let start = Instant::now();
                if o.exact {
                    let _tokens = sample_exact(&model, &spec, &mut noise, &mut |_| {})?;
                } else {
                    let _tokens = sample_cached(&model, &spec, &mut noise, &mut |_| {})?;
                }
                times.push(start.elapsed().as_secs_f64() / o.batch as f64);
            }
            times
        }
        other => bail!("unknown workload {other} (train or sample)"),
    };
    let best = seconds.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "{{\"impl\": \"eqim{}\", \"what\": \"{}\", \"model\": \"{}\", \"batch\": {}, \"tokens\": {}, \"seconds\": {best:.4}, \"threads\": {}}}",
        if o.exact { "-exact" } else { "" },
        o.what,
        o.model,
        o.batch,
        o.tokens,
        tch::get_num_threads()
    );
    Ok(())
}
