//! FID on libtorch: the fast path of `eqim fid` / `eqim fid-stats` (feature sums and the
//! eigendecompositions as tensor ops, LAPACK underneath). The types, statistics files and a
//! libtorch-free distance live in [`eqim_common::fid`], which the coordinator uses; tests here
//! check that both distances agree.
//! FID: Heusel et al. 2017, https://arxiv.org/abs/1706.08500

use tch::{Device, Kind, Tensor};

use super::numpy_rng::numpy_permutation;

pub use eqim_common::fid::{FeatureMoments, FidStats, FID_MIN_UNBIASED_IMAGES};

#[derive(Debug, thiserror::Error)]
pub enum FidError {
    #[error("features must be a 2-D [N, {expected}] tensor, got {got:?}")]
    FeatureShape { expected: usize, got: Vec<i64> },
    #[error(transparent)]
    Fid(#[from] eqim_common::fid::FidError),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

fn mu_tensor(stats: &FidStats) -> Tensor {
    Tensor::from_slice(&stats.mu)
}

fn sigma_tensor(stats: &FidStats) -> Tensor {
    Tensor::from_slice(&stats.sigma).view([stats.dim as i64, stats.dim as i64])
}

/// Adds a batch of features [N, dim] (any float kind, any device) to `moments`, with the sums
/// computed as one f64 matrix product.
pub fn add_feature_batch(moments: &mut FeatureMoments, features: &Tensor) -> Result<(), FidError> {
    let size = features.size();
    if size.len() != 2 || size[1] != moments.dim as i64 {
        return Err(FidError::FeatureShape {
            expected: moments.dim,
            got: size,
        });
    }
    let x = features.to_device(Device::Cpu).to_kind(Kind::Double);
    let batch_sum = Vec::<f64>::try_from(x.sum_dim_intlist(0, false, Kind::Double))?;
    // [dim, N] @ [N, dim] -> [dim, dim]
    let batch_outer = Vec::<f64>::try_from(x.tr().mm(&x).flatten(0, 1))?;
    moments.add_sums(size[0] as u64, &batch_sum, &batch_outer)?;
    Ok(())
}

/// Symmetric positive semi-definite square root through the eigendecomposition.
fn psd_sqrt(m: &Tensor) -> Result<Tensor, FidError> {
    let (eigenvalues, eigenvectors) = m.f_linalg_eigh("L")?;
    let roots = eigenvalues.clamp_min(0.0).sqrt();
    // V diag(sqrt(lambda)) V^T
    Ok((&eigenvectors * roots.unsqueeze(0)).mm(&eigenvectors.tr()))
}

/// d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), in f64.
///
/// tr(sqrt(S1 S2)) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
/// sqrt(S1) S2 sqrt(S1) (similar to S1 S2), which avoids the non-symmetric `sqrtm` and its
/// complex round-off that scipy-based implementations have to discard.
pub fn frechet_distance(a: &FidStats, b: &FidStats) -> Result<f64, FidError> {
    if a.dim != b.dim {
        return Err(eqim_common::fid::FidError::DimMismatch {
            left: a.dim,
            right: b.dim,
        }
        .into());
    }
    let _guard = tch::no_grad_guard();
    let diff = mu_tensor(a) - mu_tensor(b);
    let mean_term = f64::try_from(diff.dot(&diff))?;
    let (s1, s2) = (sigma_tensor(a), sigma_tensor(b));
    let trace_term = f64::try_from(s1.trace())? + f64::try_from(s2.trace())?;
    let root1 = psd_sqrt(&s1)?;
    let inner = root1.mm(&s2).mm(&root1);
    // Symmetrize: round-off makes the product very slightly non-symmetric.
    let inner = (&inner + inner.tr()) / 2.0;
    let eigenvalues = inner.f_linalg_eigvalsh("L")?;
    let trace_sqrt = f64::try_from(eigenvalues.clamp_min(0.0).sqrt().sum(Kind::Double))?;
    Ok(mean_term + trace_term - 2.0 * trace_sqrt)
}

/// The seed of the shuffle before the IS splits (torch-fidelity's default `rng_seed`).
pub const IS_SHUFFLE_SEED: u32 = 2020;

/// Inception Score exp(E_x KL(p(y|x) || p(y))) (Salimans et al. 2016,
/// https://arxiv.org/abs/1606.03498) from class logits [N, C], by torch-fidelity's protocol
/// (`isc_features_to_metric`): rows shuffled by `np.random.RandomState(2020).permutation(N)`,
/// then `splits` chunks [k N / splits, (k + 1) N / splits), each scored with p(y) the chunk's
/// mean of p(y|x); returns the mean and the population standard deviation of the chunk scores.
/// Computed in f64 from f32 logits, in torch-fidelity's order of operations.
pub fn inception_score(logits: &Tensor, splits: usize) -> Result<(f64, f64), FidError> {
    let size = logits.size();
    if size.len() != 2 || size[0] < splits as i64 || splits == 0 {
        return Err(FidError::FeatureShape {
            expected: splits,
            got: size,
        });
    }
    let _guard = tch::no_grad_guard();
    let n = size[0];
    let order: Vec<i64> = numpy_permutation(n as usize, IS_SHUFFLE_SEED)
        .into_iter()
        .map(|i| i as i64)
        .collect();
    let logits = logits
        .to_device(Device::Cpu)
        .index_select(0, &Tensor::from_slice(&order))
        .to_kind(Kind::Double);
    let p = logits.softmax(1, Kind::Double);
    let log_p = logits.log_softmax(1, Kind::Double);
    let mut scores = Vec::with_capacity(splits);
    for k in 0..splits as i64 {
        let (start, end) = (k * n / splits as i64, (k + 1) * n / splits as i64);
        let (p_part, log_p_part) = (
            p.narrow(0, start, end - start),
            log_p.narrow(0, start, end - start),
        );
        // [n_k, C] -> [1, C]
        let marginal = p_part.mean_dim(0, true, Kind::Double);
        let kl = (&p_part * (log_p_part - marginal.log())).sum_dim_intlist(1, false, Kind::Double);
        scores.push(f64::try_from(kl.mean(Kind::Double).exp())?);
    }
    let mean = scores.iter().sum::<f64>() / scores.len() as f64;
    let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / scores.len() as f64;
    Ok((mean, var.sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use eqim_common::fid::reference_cases::SplitMix64;

    fn matrix(rows: usize, cols: usize, data: Vec<f64>) -> Tensor {
        Tensor::from_slice(&data).view([rows as i64, cols as i64])
    }

    fn assert_close(got: f64, want: f64, rel: f64) {
        assert!(
            (got - want).abs() <= rel * want.abs().max(1.0),
            "got {got}, want {want}"
        );
    }

    #[test]
    fn reference_cases_hold() {
        for case in eqim_common::fid::reference_cases::all() {
            let got = frechet_distance(&case.a, &case.b).expect(case.name);
            assert!(
                (got - case.distance).abs() <= case.rel_tol * case.distance.abs().max(1.0),
                "{}: got {got}, want {}",
                case.name,
                case.distance
            );
            assert!(frechet_distance(&case.a, &case.a).expect("same").abs() < 1e-9);
        }
    }

    #[test]
    fn moments_merged_from_batches_match_numpy_cov() {
        let (d, n1, n2) = (16usize, 200usize, 300usize);
        let mut rng = SplitMix64(4);
        let x1 = matrix(n1, d, rng.uniform(n1 * d));
        let x2 = matrix(n2, d, rng.uniform(n2 * d)) * 1.5 + 0.2;
        // Set 1 in one go; set 2 as two "workers" with uneven batches, merged.
        let mut m1 = FeatureMoments::new(d);
        add_feature_batch(&mut m1, &x1).expect("add");
        let mut worker_a = FeatureMoments::new(d);
        add_feature_batch(&mut worker_a, &x2.narrow(0, 0, 7)).expect("add");
        add_feature_batch(&mut worker_a, &x2.narrow(0, 7, 100)).expect("add");
        let mut worker_b = FeatureMoments::new(d);
        add_feature_batch(&mut worker_b, &x2.narrow(0, 107, 193)).expect("add");
        worker_a.merge(&worker_b).expect("merge");
        assert_eq!(worker_a.count, 300);
        let fid = frechet_distance(&m1.stats().expect("s1"), &worker_a.stats().expect("s2"));
        // feature_case(seed=4, d=16, n1=200, n2=300) from the script (np.cov, unbiased).
        assert_close(fid.expect("fid"), 2.4447549491044, 1e-9);
    }

    #[test]
    fn moments_refuse_wrong_shapes_and_too_few_images() {
        let mut m = FeatureMoments::new(4);
        let wrong = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu));
        assert!(add_feature_batch(&mut m, &wrong).is_err());
        add_feature_batch(&mut m, &Tensor::ones([1, 4], (Kind::Float, Device::Cpu))).expect("add");
        assert!(matches!(
            m.stats(),
            Err(eqim_common::fid::FidError::TooFewImages { count: 1 })
        ));
        assert!(m.merge(&FeatureMoments::new(5)).is_err());
    }

    #[test]
    fn libtorch_and_pure_rust_distances_agree() {
        for (seed, d) in [(11u64, 48usize), (12, 96)] {
            let mut rng = SplitMix64(seed);
            let x1 = matrix(3 * d, d, rng.uniform(3 * d * d)).to_kind(Kind::Float);
            let x2 = (matrix(2 * d, d, rng.uniform(2 * d * d)) * 0.7 + 0.1).to_kind(Kind::Float);
            let (mut m1, mut m2) = (FeatureMoments::new(d), FeatureMoments::new(d));
            add_feature_batch(&mut m1, &x1).expect("add");
            // The coordinator's way: flat f32 rows accumulated in plain Rust.
            let rows = Vec::<f32>::try_from(x2.flatten(0, 1)).expect("rows");
            m2.add_rows(&rows).expect("rows");
            let (s1, s2) = (m1.stats().expect("s1"), m2.stats().expect("s2"));
            let fast = frechet_distance(&s1, &s2).expect("tch");
            let pure = eqim_common::fid::frechet_distance(&s1, &s2).expect("pure");
            assert_close(pure, fast, 1e-9);
        }
    }

    #[test]
    fn inception_score_is_one_for_constant_and_c_for_confident_distinct_classes() {
        let constant = Tensor::zeros([20, 10], (Kind::Float, Device::Cpu));
        let (is, _) = inception_score(&constant, 2).expect("is");
        assert_close(is, 1.0, 1e-12);
        // 4 classes, each predicted with near certainty by 5 images: exp(log 4) in one split.
        let confident = Tensor::eye(4, (Kind::Double, Device::Cpu)).repeat([5, 1]) * 100.0;
        let (is, std) = inception_score(&confident, 1).expect("is");
        assert_close(is, 4.0, 1e-6);
        assert!(std < 1e-9);
        // In 5 splits of 4 the shuffle (numpy RandomState(2020)) repeats classes within splits.
        // torch-fidelity 0.4.0: isc_features_to_metric(torch.eye(4).repeat(5, 1) * 100, splits=5)
        let (is, std) = inception_score(&confident, 5).expect("is");
        assert_close(is, 2.497056274847714, 1e-9);
        assert_close(std, 0.4058447489418305, 1e-9);
    }
}
