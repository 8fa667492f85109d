//! Exponential moving average of every trainable parameter, as the reference's `update_ema`:
//! `ema = ema * rate + param * (1 - rate)` after every optimizer step, no warm-up, the list
//! aligned with `named_parameters()` and initialised as a copy of the weights.
//!
//! PyTorch's `add_(src, alpha)` fuses the multiply-add on the CPU; tch exposes no `alpha`, so the
//! product is rounded once more here (a difference of at most one float ulp per step).

use super::params::{named_cpu_copies, NamedParams};
use tch::Tensor;

#[derive(Debug)]
pub struct Ema {
    pub rate: f64,
    /// One shadow tensor per parameter, same order as [`NamedParams`].
    pub shadow: Vec<Tensor>,
}

impl Ema {
    /// Starts the average at the current weights.
    pub fn new(params: &NamedParams, rate: f64) -> Self {
        let _guard = tch::no_grad_guard();
        Self {
            rate,
            shadow: params.tensors.iter().map(|t| t.detach().copy()).collect(),
        }
    }

    pub fn update(&mut self, params: &NamedParams) {
        let _guard = tch::no_grad_guard();
        for (ema, param) in self.shadow.iter_mut().zip(&params.tensors) {
            let _scaled = ema.g_mul_scalar_(self.rate);
            let _added = ema.g_add_(&(param.detach() * (1.0 - self.rate)));
        }
    }

    /// The EMA weights as named CPU tensors.
    pub fn to_named_cpu(&self, names: &[String]) -> Vec<(String, Tensor)> {
        named_cpu_copies(names, &self.shadow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device, Kind};

    #[test]
    fn ema_moves_toward_the_weights_at_the_given_rate() {
        let vs = nn::VarStore::new(Device::Cpu);
        let mut w = vs.root().var("w", &[3], nn::Init::Const(1.0));
        let params = NamedParams::from_var_store(&vs).unwrap();
        let mut ema = Ema::new(&params, 0.9);
        tch::no_grad(|| {
            let _set = w.fill_(3.0);
        });
        ema.update(&params);
        ema.update(&params);
        // 3 - 2 * 0.9^2
        let want = 3.0 - 2.0 * 0.81;
        let got = ema.shadow[0].to_kind(Kind::Double);
        for i in 0..3 {
            assert!((got.double_value(&[i]) - want).abs() < 1e-6);
        }
        assert_eq!(ema.to_named_cpu(&params.names)[0].0, "w");
    }
}
