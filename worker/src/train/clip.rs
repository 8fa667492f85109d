//! Total gradient norm and `torch.nn.utils.clip_grad_norm_`, with its arithmetic: per-tensor
//! 2-norms, the 2-norm of their stack, `clip_coef = max_norm * reciprocal(total + 1e-6)` (Python's
//! `float / Tensor`), clamped to at most 1, and every gradient multiplied by it (also when 1).

use tch::Tensor;

/// The 2-norm of all defined gradients together, as a 0-dim f32 tensor on the first gradient's
/// device (`None` when no parameter has a gradient).
pub fn total_grad_norm(grads: &[Option<Tensor>]) -> Option<Tensor> {
    let norms: Vec<Tensor> = grads.iter().flatten().map(|g| g.detach().norm()).collect();
    let device = norms.first()?.device();
    let norms: Vec<Tensor> = norms.iter().map(|n| n.to_device(device)).collect();
    Some(Tensor::stack(&norms, 0).norm())
}

/// Scales the gradients in place so that their total 2-norm is at most `max_norm`; returns the
/// total norm before clipping (0 when there are no gradients), as PyTorch does.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> f64 {
    let Some(total) = total_grad_norm(grads) else {
        return 0.0;
    };
    let clip_coef = (&total + 1e-6).reciprocal() * max_norm;
    let clip_coef = clip_coef.clamp_max(1.0);
    let _guard = tch::no_grad_guard();
    for g in grads.iter_mut().flatten() {
        let coef = clip_coef.to_device(g.device()).to_kind(g.kind());
        let _scaled = g.g_mul_(&coef);
    }
    total.double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grads(values: &[&[f32]]) -> Vec<Option<Tensor>> {
        values
            .iter()
            .map(|v| Some(Tensor::from_slice(v)))
            .chain([None])
            .collect()
    }

    #[test]
    fn total_norm_covers_every_defined_gradient() {
        let g = grads(&[&[3.0, 0.0], &[0.0, 4.0, 12.0]]);
        let n = total_grad_norm(&g).unwrap().double_value(&[]);
        assert!((n - 13.0).abs() < 1e-6, "{n}");
        assert!(total_grad_norm(&[None]).is_none());
    }

    #[test]
    fn clipping_scales_to_max_norm_and_leaves_small_gradients_alone() {
        let mut g = grads(&[&[3.0, 0.0], &[0.0, 4.0, 12.0]]);
        let before = clip_grad_norm(&mut g, 6.5);
        assert!((before - 13.0).abs() < 1e-6);
        let after = total_grad_norm(&g).unwrap().double_value(&[]);
        assert!((after - 6.5).abs() < 1e-5, "{after}");
        let coef = 6.5 / (13.0 + 1e-6);
        let want = 4.0 * coef;
        let got = g[1].as_ref().unwrap().double_value(&[1]);
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");

        let mut small = vec![Some(Tensor::from_slice(&[0.3f32, 0.4]))];
        let n = clip_grad_norm(&mut small, 3.0);
        assert!((n - 0.5).abs() < 1e-6);
        let unchanged = Tensor::from_slice(&[0.3f32, 0.4]);
        assert!(small[0].as_ref().unwrap().equal(&unchanged));
        assert_eq!(clip_grad_norm(&mut [None], 1.0), 0.0);
    }
}
