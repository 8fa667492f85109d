//! The tokenizer's training loss terms as `LPIPSWithDiscriminator` computes them (stage 1 and 2):
//! L1 + LPIPS reconstruction, the fixed-std posterior's KL, the hinge GAN with the adaptive weight,
//! and the semantic alignment MSE.
//! Upstream: `tokenizer/modules/losses/contperceptual.py`, `vqperceptual.py` (`adopt_weight`,
//! `hinge_d_loss`), `tokenizer/modules/distributions/distributions.py` (`GaussianDistribution.kl`).

use tch::Tensor;

/// `adopt_weight`: `weight` from `threshold` on, 0 before.
pub fn adopt_weight(weight: f64, global_step: i64, threshold: i64) -> f64 {
    if global_step < threshold {
        0.0
    } else {
        weight
    }
}

/// `GaussianDistribution.kl()` summed over the batch and divided by B: Σ_b 0.5·Σ mean_b² / B.
pub fn kl_loss(mean: &Tensor) -> Tensor {
    let b = mean.size()[0] as f64;
    mean.square().sum(mean.kind()) * 0.5 / b
}

/// The per-pixel reconstruction term |x − x̂| + perceptual_weight·LPIPS(x, x̂) (LPIPS [B,1,1,1]
/// broadcast over every pixel and channel), summed and divided by B: the reference's `nll_loss`
/// with `logvar` fixed at 0 (it is in no optimizer).
pub fn nll_loss(x: &Tensor, xrec: &Tensor, lpips: Option<(&Tensor, f64)>) -> Tensor {
    let b = x.size()[0] as f64;
    let mut rec = (x - xrec).abs();
    if let Some((p_loss, weight)) = lpips {
        rec += p_loss * weight;
    }
    rec.sum(rec.kind()) / b
}

/// `hinge_d_loss`: 0.5·(mean(relu(1 − real)) + mean(relu(1 + fake))).
pub fn hinge_d_loss(logits_real: &Tensor, logits_fake: &Tensor) -> Tensor {
    let loss_real = (1.0f64 - logits_real).relu().mean(logits_real.kind());
    let loss_fake = (1.0f64 + logits_fake).relu().mean(logits_fake.kind());
    (loss_real + loss_fake) * 0.5
}

/// `vanilla_d_loss`: 0.5·(mean(softplus(−real)) + mean(softplus(fake))).
pub fn vanilla_d_loss(logits_real: &Tensor, logits_fake: &Tensor) -> Tensor {
    let loss_real = (-logits_real).softplus().mean(logits_real.kind());
    let loss_fake = logits_fake.softplus().mean(logits_fake.kind());
    (loss_real + loss_fake) * 0.5
}

/// The generator's GAN term: −mean(D(x̂)).
pub fn generator_hinge_loss(logits_fake: &Tensor) -> Tensor {
    -logits_fake.mean(logits_fake.kind())
}

/// `calculate_adaptive_weight`: ‖∇_W nll‖ / (‖∇_W g‖ + 1e-4), clamped to [0, 1e4], × disc_weight,
/// with W the decoder's last conv weight. The graph is kept for the total loss' backward pass.
pub fn adaptive_weight(
    nll: &Tensor,
    g_loss: &Tensor,
    last_layer: &Tensor,
    disc_weight: f64,
) -> f64 {
    let nll_grad = Tensor::run_backward(&[nll], &[last_layer], true, false);
    let g_grad = Tensor::run_backward(&[g_loss], &[last_layer], true, false);
    let ratio = nll_grad[0].norm().double_value(&[]) / (g_grad[0].norm().double_value(&[]) + 1e-4);
    ratio.clamp(0.0, 1e4) * disc_weight
}

/// The semantic alignment term Σ(out − f)² / B, out the semantic decoder's [B, C, h, w] output
/// flattened to [B, C, h·w] and f the teacher's patch features [B, C, h·w].
pub fn semantic_loss(semantic_out: &Tensor, teacher_features: &Tensor) -> Tensor {
    let b = semantic_out.size()[0];
    let c = semantic_out.size()[1];
    let out = semantic_out.reshape([b, c, -1]); // [B, C, h·w]
    (out - teacher_features).square().sum(semantic_out.kind()) / b as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

    fn t(v: &[f64], shape: &[i64]) -> Tensor {
        Tensor::from_slice(v).view(shape)
    }

    #[test]
    fn adopt_weight_switches_on_at_the_threshold() {
        assert_eq!(adopt_weight(0.5, 5000, 5001), 0.0);
        assert_eq!(adopt_weight(0.5, 5001, 5001), 0.5);
        assert_eq!(adopt_weight(5.0, 0, 0), 5.0);
    }

    #[test]
    fn nll_is_l1_plus_broadcast_lpips_summed_per_image() {
        // B=2, C=1, H=1, W=2
        let x = t(&[0.0, 1.0, -1.0, 0.5], &[2, 1, 1, 2]);
        let y = t(&[0.5, 0.0, -1.0, -0.5], &[2, 1, 1, 2]);
        // |x−y| = 0.5, 1.0, 0.0, 1.0 → sum 2.5
        let l1 = nll_loss(&x, &y, None).double_value(&[]);
        assert!((l1 - 2.5 / 2.0).abs() < 1e-12);
        // LPIPS 0.1 and 0.3 per image, weight 1, added to each of the 2 pixels of that image
        let p = t(&[0.1, 0.3], &[2, 1, 1, 1]);
        let nll = nll_loss(&x, &y, Some((&p, 1.0))).double_value(&[]);
        let want = (2.5 + 2.0 * 0.1 + 2.0 * 0.3) / 2.0;
        assert!((nll - want).abs() < 1e-12, "{nll} vs {want}");
    }

    #[test]
    fn kl_is_half_the_squared_mean_summed_per_image() {
        let mean = t(&[1.0, 2.0, 0.0, -3.0], &[2, 2, 1]);
        let want = 0.5 * (1.0 + 4.0 + 0.0 + 9.0) / 2.0;
        assert!((kl_loss(&mean).double_value(&[]) - want).abs() < 1e-12);
    }

    #[test]
    fn hinge_losses_match_hand_values() {
        let real = t(&[2.0, 0.5, -1.0], &[3]);
        let fake = t(&[-2.0, 0.0, 1.5], &[3]);
        // relu(1 − real) = 0, 0.5, 2 → mean 5/6; relu(1 + fake) = 0, 1, 2.5 → mean 7/6
        let want = 0.5 * (2.5 / 3.0 + 3.5 / 3.0);
        assert!((hinge_d_loss(&real, &fake).double_value(&[]) - want).abs() < 1e-12);
        // softplus(−real) = ln(1+e^−2), ln(1+e^−0.5), ln(1+e^1); softplus(fake) likewise
        let sp = |v: f64| (1.0 + v.exp()).ln();
        let want_vanilla =
            0.5 * ((sp(-2.0) + sp(-0.5) + sp(1.0)) / 3.0 + (sp(-2.0) + sp(0.0) + sp(1.5)) / 3.0);
        let got = vanilla_d_loss(&real, &fake).double_value(&[]);
        assert!(
            (got - want_vanilla).abs() < 1e-12,
            "{got} vs {want_vanilla}"
        );
        assert!((generator_hinge_loss(&fake).double_value(&[]) - 0.5 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer() {
        // W = [w0, w1]; nll = Σ (3·W)² → ∇ = 18·W; g = −mean(2·W) → ∇ = [−1, −1].
        let w = t(&[1.0, -2.0], &[2]).set_requires_grad(true);
        let nll = (&w * 3.0).square().sum(Kind::Double);
        let g = -(&w * 2.0).mean(Kind::Double);
        let got = adaptive_weight(&nll, &g, &w, 0.5);
        let nll_norm = (18.0f64 * 18.0 * (1.0 + 4.0)).sqrt();
        let g_norm = 2.0f64.sqrt();
        let want = nll_norm / (g_norm + 1e-4) * 0.5;
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        // clamped at 1e4 when the GAN gradient vanishes
        let g0 = (&w * 0.0).sum(Kind::Double);
        let clamped = adaptive_weight(&nll, &g0, &w, 1.0);
        assert_eq!(clamped, 1e4);
        // the graph survives for the total loss
        let total = nll + g;
        total.backward();
        assert!(w.grad().defined());
    }

    #[test]
    fn semantic_loss_is_the_squared_error_summed_per_image() {
        let out = t(&[1.0, 2.0, 3.0, 4.0], &[1, 2, 1, 2]);
        let f = t(&[0.0, 2.0, 5.0, 3.0], &[1, 2, 2]);
        let want = 1.0 + 0.0 + 4.0 + 1.0;
        assert!((semantic_loss(&out, &f).double_value(&[]) - want).abs() < 1e-12);
    }
}
