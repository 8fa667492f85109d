//! The trainable parameters of a var store by name, in creation order: PyTorch's
//! `named_parameters()` order when the model is built in the reference's registration order.
//! The optimizer, the EMA and the gradient lists are all aligned with this order.

use super::TrainError;
use std::collections::HashMap;
use tch::{nn, Tensor};

/// Names and (shallow) handles of a model's trainable parameters, in creation order.
#[derive(Debug)]
pub struct NamedParams {
    pub names: Vec<String>,
    pub tensors: Vec<Tensor>,
}

impl NamedParams {
    /// Reads the trainable variables of `vs`. tch keeps them in creation order without names
    /// and the names in a hash map, so names are matched by storage identity.
    pub fn from_var_store(vs: &nn::VarStore) -> Result<Self, TrainError> {
        let vars = vs.variables_.lock().expect("var store mutex poisoned");
        let by_ptr: HashMap<usize, &String> = vars
            .named_variables
            .iter()
            .map(|(name, t)| (t.data_ptr() as usize, name))
            .collect();
        let mut names = Vec::with_capacity(vars.trainable_variables.len());
        let mut tensors = Vec::with_capacity(vars.trainable_variables.len());
        for (index, var) in vars.trainable_variables.iter().enumerate() {
            let name = by_ptr
                .get(&(var.tensor.data_ptr() as usize))
                .ok_or(TrainError::UnnamedVariable { index })?;
            names.push((*name).clone());
            tensors.push(var.tensor.shallow_clone());
        }
        Ok(Self { names, tensors })
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(Tensor::numel).sum()
    }

    /// Detached CPU copies by name, for saving.
    pub fn to_named_cpu(&self) -> Vec<(String, Tensor)> {
        named_cpu_copies(&self.names, &self.tensors)
    }
}

/// Whether the reference's `add_weight_decay` puts a parameter in the decayed group: every 1-D
/// parameter, every name ending `.bias` and every name containing `diffloss` is not decayed.
pub fn decays(name: &str, shape: &[i64]) -> bool {
    !(shape.len() == 1 || name.ends_with(".bias") || name.contains("diffloss"))
}

/// Detached, contiguous CPU copies of `tensors` paired with `names`.
pub(crate) fn named_cpu_copies(names: &[String], tensors: &[Tensor]) -> Vec<(String, Tensor)> {
    names
        .iter()
        .zip(tensors)
        .map(|(n, t)| (n.clone(), t.detach().to_device(tch::Device::Cpu).copy()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn names_follow_creation_order_not_hash_order() {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let order = ["zeta.weight", "alpha.bias", "mid.weight", "beta", "a.b.c"];
        for name in order {
            let mut parts: Vec<&str> = name.split('.').collect();
            let last = parts.pop().unwrap();
            let mut p = root.clone();
            for part in parts {
                p = p / part;
            }
            let _param = p.var(last, &[2, 3], nn::Init::Const(1.0));
        }
        let _frozen = root.zeros_no_train("buffer", &[4]);
        let params = NamedParams::from_var_store(&vs).unwrap();
        assert_eq!(params.names, order);
        assert_eq!(params.numel(), 5 * 6);
    }

    #[test]
    fn weight_decay_groups_follow_the_reference() {
        assert!(decays("encoder_blocks.0.attn.qkv.weight", &[192, 64]));
        assert!(decays("fake_latent", &[1, 64]));
        assert!(decays("class_emb.weight", &[10, 64]));
        assert!(!decays("encoder_blocks.0.norm1.weight", &[64]));
        assert!(!decays("z_proj.bias", &[64]));
        assert!(!decays("diffloss.net.input_proj.weight", &[64, 16]));
    }
}
