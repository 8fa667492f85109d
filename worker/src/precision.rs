//! Mixed precision: `precision: fp32 | bf16` of the model configs and the `--precision` flags.
//! In bf16, eligible ops (linear, matmul, convolution) run in bfloat16 under libtorch's autocast,
//! on the CPU as on CUDA, while weights, gradients, optimizer moments, EMA, the loss and the
//! gradient norm stay float32: autocast casts a weight to bf16 inside the op, so its gradient
//! comes back float32, and the loss is read back as float32 ([`to_fp32`]).

use crate::collective::autocast::{AutocastGuard, LowPrecision};
use tch::{Device, Kind, Tensor};

/// The arithmetic precision of forwards (and so of backward) in training and sampling.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in float32 (the reference's default).
    #[default]
    Fp32,
    /// bfloat16 autocast around float32 master weights.
    Bf16,
}

impl Precision {
    pub fn is_fp32(&self) -> bool {
        *self == Precision::Fp32
    }

    /// Bytes of an activation element saved for backward by an autocast op.
    pub fn activation_bytes(self) -> u64 {
        match self {
            Precision::Fp32 => 4,
            Precision::Bf16 => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fp32" | "float32" => Ok(Precision::Fp32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => Err(format!("precision {other:?}: use fp32 or bf16")),
        }
    }
}

/// Runs `f` under autocast to `precision` for `device`'s type (no autocast in fp32). Nested calls
/// are fine; the state on return is the state before the call, also when `f` panics.
pub fn autocast<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> T {
    match precision {
        Precision::Fp32 => f(),
        Precision::Bf16 => {
            // Entering can only fail for a device type autocast does not know (mps, vulkan);
            // those run without autocast, i.e. in float32, which is correct if slower.
            let guard = enter(precision, device);
            let out = f();
            drop(guard);
            out
        }
    }
}

/// Autocast to `precision` for `device`'s type until the returned guard is dropped (`None` in
/// fp32, or where autocast is unavailable), for code that cannot be wrapped in [`autocast`].
#[must_use = "autocast ends when the guard is dropped"]
pub fn enter(precision: Precision, device: Device) -> Option<AutocastGuard> {
    match precision {
        Precision::Fp32 => None,
        Precision::Bf16 => AutocastGuard::enter(device, LowPrecision::BFloat16)
            .map_err(|e| tracing::warn!(cause = %e, "bf16 autocast unavailable; running fp32"))
            .ok(),
    }
}

/// `t` as float32 (a no-op for float32 tensors): what leaves an autocast region to be reduced,
/// compared or stored.
pub fn to_fp32(t: &Tensor) -> Tensor {
    if t.kind() == Kind::Float {
        t.shallow_clone()
    } else {
        t.to_kind(Kind::Float)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::autocast::autocast_enabled;

    #[test]
    fn cpu_autocast_runs_linear_in_bf16_and_restores_the_state() {
        let x = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let w = Tensor::randn([3, 8], (Kind::Float, Device::Cpu));
        assert!(!autocast_enabled(Device::Cpu));
        let (kind, inner_enabled) = autocast(Precision::Bf16, Device::Cpu, || {
            let nested = autocast(Precision::Bf16, Device::Cpu, || {
                x.linear::<Tensor>(&w, None).kind()
            });
            assert_eq!(nested, Kind::BFloat16);
            (
                x.linear::<Tensor>(&w, None).kind(),
                autocast_enabled(Device::Cpu),
            )
        });
        assert_eq!(kind, Kind::BFloat16);
        assert!(inner_enabled);
        assert!(
            !autocast_enabled(Device::Cpu),
            "state restored after the region"
        );
        let fp32 = autocast(Precision::Fp32, Device::Cpu, || {
            x.linear::<Tensor>(&w, None)
        });
        assert_eq!(fp32.kind(), Kind::Float);
    }

    #[test]
    fn autocast_state_is_restored_after_a_panic() {
        let caught = std::panic::catch_unwind(|| {
            autocast(Precision::Bf16, Device::Cpu, || -> i32 {
                panic!("inside autocast")
            })
        });
        assert!(caught.is_err());
        assert!(!autocast_enabled(Device::Cpu));
    }

    #[test]
    fn gradients_of_float32_weights_stay_float32_under_bf16() {
        let w = Tensor::randn([3, 8], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::randn([4, 8], (Kind::Float, Device::Cpu));
        let loss = autocast(Precision::Bf16, Device::Cpu, || {
            to_fp32(&x.linear::<Tensor>(&w, None))
                .square()
                .mean(Kind::Float)
        });
        assert_eq!(loss.kind(), Kind::Float);
        loss.backward();
        assert_eq!(w.grad().kind(), Kind::Float);
    }

    #[test]
    fn precision_parses_and_prints_its_config_names() {
        assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
        assert_eq!("fp32".parse::<Precision>(), Ok(Precision::Fp32));
        assert!("fp16"
            .parse::<Precision>()
            .unwrap_err()
            .contains("fp32 or bf16"));
        assert_eq!(Precision::Bf16.to_string(), "bf16");
        let json: Precision = serde_json::from_str("\"bf16\"").unwrap();
        assert_eq!(json, Precision::Bf16);
    }
}
