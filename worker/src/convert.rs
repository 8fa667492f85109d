//! Checkpoint conversion (`eqim convert-checkpoint IN OUT.safetensors`): turns a reference
//! PyTorch checkpoint (a torch.save zip with a pickle that also holds non-tensor objects) into
//! safetensors with the same key names, by running `scripts/convert-checkpoint` (Python
//! standard library only, no torch).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What `eqim convert-checkpoint` converts, and how.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// The checkpoint: tokenizer.ckpt (Lightning, `state_dict`) or a generator checkpoint
    /// (`model` / `model_ema`).
    pub input: PathBuf,
    /// The safetensors file to write.
    pub output: PathBuf,
    /// Generator checkpoints: `ema` converts `model_ema`, `live` converts `model`.
    pub generator_weights: String,
    /// Keep the `loss.*` keys of a Lightning checkpoint.
    pub keep_loss: bool,
}

/// The converter script: `$EQIM_SCRIPTS_DIR/convert-checkpoint`, else the repository's `scripts/`.
pub fn script_path() -> PathBuf {
    let dir = std::env::var_os("EQIM_SCRIPTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts"));
    dir.join("convert-checkpoint")
}

/// Runs the converter; returns its report (stderr), which lists the ignored keys.
pub fn run(args: &ConvertOptions) -> Result<String> {
    let script = script_path();
    if !script.exists() {
        bail!(
            "checkpoint converter {} not found: set EQIM_SCRIPTS_DIR to the folder holding \
             convert-checkpoint (the repository's scripts/)",
            script.display()
        );
    }
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .arg(&args.input)
        .arg(&args.output)
        .arg("--generator-weights")
        .arg(&args.generator_weights);
    if args.keep_loss {
        cmd.arg("--keep-loss");
    }
    let out = cmd
        .output()
        .context("running python3 (needed by convert-checkpoint; any Python 3, no packages)")?;
    let report = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!(
            "converting {} failed:\n{}",
            args.input.display(),
            report.trim_end()
        );
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::{ema, randomize, EquivariantTokenizer, TokenizerConfig};
    use crate::model::weights::{read_safetensors, write_safetensors_atomic};
    use std::collections::BTreeMap;
    use tch::{nn, Device, Kind, Tensor};

    fn make_checkpoint(src: &Path, out: &Path, layout: &str) {
        let script = script_path().with_file_name("make-test-checkpoint");
        let st = Command::new("python3")
            .arg(script)
            .arg(src)
            .arg(out)
            .args(["--layout", layout])
            .status()
            .expect("python3 runs");
        assert!(st.success());
    }

    fn tiny_config() -> TokenizerConfig {
        let dir = crate::verify::tokenizer::fixtures_dir();
        let text = std::fs::read_to_string(dir.join("tokenizer_tiny.json")).unwrap();
        TokenizerConfig::from_json(&serde_json::from_str(&text).unwrap()).unwrap()
    }

    #[test]
    fn lightning_tokenizer_checkpoint_converts_and_loads_its_ema_weights() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_config();
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = EquivariantTokenizer::new(vs.root(), &cfg);
        // Live weights from seed 1, EMA shadows from seed 2, plus bookkeeping and loss keys.
        let mut named: Vec<(String, Tensor)> = Vec::new();
        randomize(&vs, 2);
        for (k, v) in vs.variables() {
            named.push((ema::ema_name(&k).unwrap(), v.copy()));
        }
        let ema_weights: BTreeMap<String, Tensor> = vs
            .variables()
            .into_iter()
            .map(|(k, v)| (k, v.copy()))
            .collect();
        randomize(&vs, 1);
        for (k, v) in vs.variables() {
            named.push((k, v.copy()));
        }
        for m in ema::EMA_MODULES {
            named.push((format!("ema_{m}.decay"), Tensor::from(0.99f32)));
            named.push((format!("ema_{m}.num_updates"), Tensor::from(42i32)));
        }
        named.push(("loss.logvar".into(), Tensor::from(0f32)));
        named.push((
            "loss.perceptual_loss.lin0.model.1.weight".into(),
            Tensor::ones([1, 64, 1, 1], (Kind::Float, Device::Cpu)),
        ));
        let src = dir.path().join("src.safetensors");
        write_safetensors_atomic(&named, &src).unwrap();
        let ckpt = dir.path().join("tokenizer.ckpt");
        make_checkpoint(&src, &ckpt, "lightning");

        let out = dir.path().join("tokenizer.safetensors");
        let args = ConvertOptions {
            input: ckpt.clone(),
            output: out.clone(),
            generator_weights: "ema".into(),
            keep_loss: false,
        };
        let report = run(&args).unwrap();
        assert!(report.contains("ignored 2 training-loss keys"), "{report}");
        let converted = read_safetensors(&out).unwrap();
        assert_eq!(converted.len(), named.len() - 2);

        let fresh = nn::VarStore::new(Device::Cpu);
        let _m = EquivariantTokenizer::new(fresh.root(), &cfg);
        let load = EquivariantTokenizer::load(&fresh, &converted, "converted", None).unwrap();
        assert_eq!(load.choice, crate::model::tokenizer::WeightChoice::Ema);
        for (k, v) in fresh.variables() {
            assert!(v.equal(&ema_weights[&k]), "{k} is not the EMA shadow");
        }

        // Kept loss keys are ignored and reported by the loader; other strays are refused.
        let kept = dir.path().join("kept.safetensors");
        run(&ConvertOptions {
            output: kept.clone(),
            keep_loss: true,
            ..args.clone()
        })
        .unwrap();
        let mut with_loss = read_safetensors(&kept).unwrap();
        let load = EquivariantTokenizer::load(&fresh, &with_loss, "kept", None).unwrap();
        assert_eq!(load.ignored_loss_keys.len(), 2);
        with_loss.insert("discriminator.w".into(), Tensor::from(1f32));
        assert!(EquivariantTokenizer::load(&fresh, &with_loss, "kept", None).is_err());

        let err = run(&ConvertOptions { input: src, ..args }).unwrap_err();
        assert!(
            format!("{err:#}").contains("not a torch zip archive"),
            "{err:#}"
        );
    }

    #[test]
    fn generator_checkpoint_converts_model_ema_by_default_and_model_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let opts = (Kind::Float, Device::Cpu);
        let named = vec![
            ("model.fake_latent".to_string(), Tensor::randn([1, 8], opts)),
            (
                "model.z_proj.weight".to_string(),
                Tensor::randn([8, 4], opts),
            ),
            ("model.z_proj.bias".to_string(), Tensor::randn([8], opts)),
            (
                "model_ema.fake_latent".to_string(),
                Tensor::randn([1, 8], opts),
            ),
            (
                "model_ema.z_proj.weight".to_string(),
                Tensor::randn([8, 4], opts),
            ),
            (
                "model_ema.z_proj.bias".to_string(),
                Tensor::randn([8], opts),
            ),
        ];
        let src = dir.path().join("src.safetensors");
        write_safetensors_atomic(&named, &src).unwrap();
        let ckpt = dir.path().join("places_large.ckpt");
        make_checkpoint(&src, &ckpt, "generator");
        let source: BTreeMap<String, Tensor> = named.into_iter().collect();
        for (which, prefix) in [("ema", "model_ema."), ("live", "model.")] {
            let out = dir.path().join(format!("{which}.safetensors"));
            let report = run(&ConvertOptions {
                input: ckpt.clone(),
                output: out.clone(),
                generator_weights: which.into(),
                keep_loss: false,
            })
            .unwrap();
            assert!(report.contains("3 tensors"), "{report}");
            let converted = read_safetensors(&out).unwrap();
            assert_eq!(converted.len(), 3);
            for (k, v) in &converted {
                assert!(v.equal(&source[&format!("{prefix}{k}")]), "{which}: {k}");
            }
        }
    }
}
