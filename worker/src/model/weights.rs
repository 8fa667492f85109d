//! Loading and saving model weights by parameter name (safetensors), strictly: every missing,
//! unexpected or mis-shaped key is reported by name and a partial load is refused.

use anyhow::{Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use tch::{nn, Tensor};

/// Why a set of named tensors does not fit a model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyMismatch {
    /// Model parameters with no tensor of that name.
    pub missing: Vec<String>,
    /// Tensors with no model parameter of that name.
    pub unexpected: Vec<String>,
    /// (name, model shape, file shape)
    pub mis_shaped: Vec<(String, Vec<i64>, Vec<i64>)>,
}

impl KeyMismatch {
    pub fn is_empty(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty() && self.mis_shaped.is_empty()
    }
}

impl std::fmt::Display for KeyMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            let shown: Vec<&str> = v.iter().take(20).map(String::as_str).collect();
            let more = v.len().saturating_sub(20);
            if more > 0 {
                format!("{} (and {more} more)", shown.join(", "))
            } else {
                shown.join(", ")
            }
        };
        if !self.missing.is_empty() {
            writeln!(
                f,
                "missing keys ({}): {}",
                self.missing.len(),
                list(&self.missing)
            )?;
        }
        if !self.unexpected.is_empty() {
            writeln!(
                f,
                "unexpected keys ({}): {}",
                self.unexpected.len(),
                list(&self.unexpected)
            )?;
        }
        for (name, want, got) in &self.mis_shaped {
            writeln!(f, "mis-shaped key {name}: model {want:?}, file {got:?}")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("weights from {source_name} do not fit the model:\n{mismatch}")]
pub struct WeightsError {
    pub source_name: String,
    pub mismatch: KeyMismatch,
}

/// Reads every tensor of a safetensors file, keyed by name.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let named = Tensor::read_safetensors(path)
        .with_context(|| format!("reading safetensors file {}", path.display()))?;
    Ok(named.into_iter().collect())
}

/// Compares the model's variables with named tensors; `ignore` marks file keys that may be left
/// unused (e.g. `loss.*` in a tokenizer checkpoint).
pub fn compare(
    vars: &HashMap<String, Tensor>,
    tensors: &BTreeMap<String, Tensor>,
    ignore: impl Fn(&str) -> bool,
) -> KeyMismatch {
    let mut m = KeyMismatch::default();
    for (name, var) in vars {
        match tensors.get(name) {
            None => m.missing.push(name.clone()),
            Some(t) if t.size() != var.size() => {
                m.mis_shaped.push((name.clone(), var.size(), t.size()))
            }
            Some(_) => {}
        }
    }
    m.unexpected = tensors
        .keys()
        .filter(|k| !vars.contains_key(*k) && !ignore(k))
        .cloned()
        .collect();
    m.missing.sort();
    m.mis_shaped.sort();
    m
}

/// Copies named tensors into the variables of `vs` after checking that they fit exactly.
/// `source_name` names the input in errors (a file path, "fixture weights", ...).
pub fn load_strict(
    vs: &nn::VarStore,
    tensors: &BTreeMap<String, Tensor>,
    source_name: &str,
    ignore: impl Fn(&str) -> bool,
) -> Result<(), WeightsError> {
    let vars = vs.variables();
    let mismatch = compare(&vars, tensors, ignore);
    if !mismatch.is_empty() {
        return Err(WeightsError {
            source_name: source_name.to_owned(),
            mismatch,
        });
    }
    let _guard = tch::no_grad_guard();
    for (name, mut var) in vars {
        let src = &tensors[&name];
        var.copy_(&src.to_kind(var.kind()).to_device(var.device()));
    }
    Ok(())
}

/// Loads a safetensors file into `vs`, refusing any key mismatch.
pub fn load_file_strict(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let tensors = read_safetensors(path)?;
    load_strict(vs, &tensors, &path.display().to_string(), |_| false)?;
    Ok(())
}

/// Writes the variables of `vs` to a safetensors file atomically (temp file, fsync, rename).
pub fn save_file(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().to_device(tch::Device::Cpu).contiguous()))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    write_safetensors_atomic(&named, path)
}

/// Writes named tensors to `path` atomically: a crash leaves either the old file or the new one.
pub fn write_safetensors_atomic(named: &[(String, Tensor)], path: &Path) -> Result<()> {
    eqim_common::files::write_atomic_with(path, |tmp| {
        Tensor::write_safetensors(named, tmp).with_context(|| format!("writing {}", tmp.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn model(vs: &nn::VarStore) {
        let p = vs.root();
        let _w = p.sub("lin").var("weight", &[3, 2], nn::Init::Const(0.0));
        let _b = p.sub("lin").var("bias", &[3], nn::Init::Const(0.0));
    }

    #[test]
    fn save_then_load_round_trips_and_mismatches_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        model(&vs);
        tch::no_grad(|| {
            for (_, mut v) in vs.variables() {
                v.copy_(&Tensor::randn(v.size(), (Kind::Float, Device::Cpu)));
            }
        });
        let path = dir.path().join("w.safetensors");
        save_file(&vs, &path).unwrap();

        let vs2 = nn::VarStore::new(Device::Cpu);
        model(&vs2);
        load_file_strict(&vs2, &path).unwrap();
        let (a, b) = (vs.variables(), vs2.variables());
        for (k, v) in &a {
            assert!(v.equal(&b[k]), "{k} differs after round trip");
        }

        let mut tensors = read_safetensors(&path).unwrap();
        tensors.remove("lin.bias");
        tensors.insert(
            "lin.extra".into(),
            Tensor::zeros([1], (Kind::Float, Device::Cpu)),
        );
        tensors.insert(
            "lin.weight".into(),
            Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)),
        );
        let err = load_strict(&vs2, &tensors, "test input", |_| false).unwrap_err();
        assert_eq!(err.mismatch.missing, vec!["lin.bias".to_string()]);
        assert_eq!(err.mismatch.unexpected, vec!["lin.extra".to_string()]);
        assert_eq!(err.mismatch.mis_shaped.len(), 1);
        let msg = err.to_string();
        assert!(
            msg.contains("test input") && msg.contains("lin.bias") && msg.contains("lin.extra")
        );
        // A refused load leaves the weights untouched.
        assert!(vs2.variables()["lin.weight"].equal(&a["lin.weight"]));
    }
}
