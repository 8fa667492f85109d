//! Frechet Inception Distance without libtorch: mergeable f64 feature moments (workers send
//! their images' features, the coordinator adds them up), statistics files (`mu`, `sigma` npz,
//! as pytorch-fid / torch-fidelity / ADM write them) and the distance itself in f64, so that the
//! coordinator can score an evaluation on a CPU head node.
//! FID: Heusel et al. 2017, https://arxiv.org/abs/1706.08500

use std::path::Path;

use nalgebra::{DMatrix, DVector, SymmetricEigen};
use serde::{Deserialize, Serialize};

use crate::npz::{read_named_arrays, write_npz, NamedArrays, NpyArray, NpyError};

/// Below this many images FID is strongly biased upwards (the standard protocols use 10k-50k).
pub const FID_MIN_UNBIASED_IMAGES: u64 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum FidError {
    #[error("feature dimensions differ: {left} vs {right}")]
    DimMismatch { left: usize, right: usize },
    #[error("features must be whole rows of {dim} values, got {len} values")]
    Ragged { dim: usize, len: usize },
    #[error("covariance needs at least 2 images, have {count}")]
    TooFewImages { count: u64 },
    #[error("{path}: {reason}; a stats file is an npz with 'mu' [D] and 'sigma' [D, D] (np.savez(path, mu=mu, sigma=sigma), eqim fid-stats, ADM's reference batches) or torch-fidelity's cached '*-stat-fid-2048.pt'")]
    StatsFile { path: String, reason: String },
    #[error(transparent)]
    Npy(#[from] NpyError),
}

/// Mean and covariance of a feature set, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct FidStats {
    pub dim: usize,
    /// [dim]
    pub mu: Vec<f64>,
    /// [dim, dim], row-major
    pub sigma: Vec<f64>,
}

impl FidStats {
    pub fn new(mu: Vec<f64>, sigma: Vec<f64>) -> Result<Self, FidError> {
        let dim = mu.len();
        if sigma.len() != dim * dim {
            return Err(FidError::DimMismatch {
                left: dim * dim,
                right: sigma.len(),
            });
        }
        Ok(Self { dim, mu, sigma })
    }

    /// Reads reference statistics `mu` [D] and `sigma` [D, D] (f64 or f32) from an `.npz`
    /// (`eqim fid-stats`, pytorch-fid, ADM's reference batches, whose other members such as the
    /// `arr_0` images are skipped) or from torch-fidelity's cached statistics
    /// (`<name>-inception-v3-compat-stat-fid-2048.pt`, a `torch.save` of {"mu", "sigma"}).
    pub fn read(path: &Path) -> Result<Self, FidError> {
        let shown = path.display().to_string();
        let NamedArrays { mut arrays, keys } = read_named_arrays(path, &["mu", "sigma"])?;
        let bad = |reason: String| FidError::StatsFile {
            path: shown.clone(),
            reason,
        };
        let (Some(mu), Some(sigma)) = (arrays.remove("mu"), arrays.remove("sigma")) else {
            return Err(bad(format!(
                "no float arrays named 'mu' and 'sigma' (the file holds {keys:?})"
            )));
        };
        let dim = mu.data.len();
        if mu.shape != [dim] || sigma.shape != [dim, dim] {
            return Err(bad(format!(
                "shapes mu {:?} and sigma {:?} do not form [D] and [D, D]",
                mu.shape, sigma.shape
            )));
        }
        Self::new(mu.data, sigma.data)
    }

    pub fn write(&self, path: &Path) -> Result<(), FidError> {
        let mu = NpyArray::new(vec![self.dim], self.mu.clone());
        let sigma = NpyArray::new(vec![self.dim, self.dim], self.sigma.clone());
        write_npz(path, &[("mu", &mu), ("sigma", &sigma)])?;
        Ok(())
    }
}

/// Running sums of features and of their outer products, in f64, so that partial sums from
/// different workers (or batches) add up to the moments of the union.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureMoments {
    pub dim: usize,
    pub count: u64,
    /// sum_i x_i, [dim]
    pub sum: Vec<f64>,
    /// sum_i x_i x_i^T, [dim, dim] row-major
    pub sum_outer: Vec<f64>,
}

impl FeatureMoments {
    pub fn new(dim: usize) -> Self {
        Self {
            dim,
            count: 0,
            sum: vec![0.0; dim],
            sum_outer: vec![0.0; dim * dim],
        }
    }

    /// Adds feature rows given as one flat row-major slice [N * dim] (f32 as the Inception
    /// computes them; accumulated in f64).
    pub fn add_rows(&mut self, rows: &[f32]) -> Result<(), FidError> {
        let d = self.dim;
        if d == 0 || !rows.len().is_multiple_of(d) {
            return Err(FidError::Ragged {
                dim: d,
                len: rows.len(),
            });
        }
        let mut x = vec![0.0f64; d];
        for row in rows.chunks_exact(d) {
            for (xi, v) in x.iter_mut().zip(row) {
                *xi = f64::from(*v);
            }
            for (acc, xi) in self.sum.iter_mut().zip(&x) {
                *acc += xi;
            }
            for (r, xr) in x.iter().enumerate() {
                let out = &mut self.sum_outer[r * d..(r + 1) * d];
                for (acc, xc) in out.iter_mut().zip(&x) {
                    *acc += xr * xc;
                }
            }
            self.count += 1;
        }
        Ok(())
    }

    /// Adds precomputed sums of `count` rows (e.g. from a matrix product on an accelerator).
    pub fn add_sums(&mut self, count: u64, sum: &[f64], sum_outer: &[f64]) -> Result<(), FidError> {
        let d = self.dim;
        if sum.len() != d || sum_outer.len() != d * d {
            return Err(FidError::DimMismatch {
                left: d,
                right: sum.len(),
            });
        }
        for (acc, v) in self.sum.iter_mut().zip(sum) {
            *acc += v;
        }
        for (acc, v) in self.sum_outer.iter_mut().zip(sum_outer) {
            *acc += v;
        }
        self.count += count;
        Ok(())
    }

    /// Adds another worker's partial sums.
    pub fn merge(&mut self, other: &FeatureMoments) -> Result<(), FidError> {
        if other.dim != self.dim {
            return Err(FidError::DimMismatch {
                left: self.dim,
                right: other.dim,
            });
        }
        self.add_sums(other.count, &other.sum, &other.sum_outer)
    }

    /// Mean and unbiased covariance (divided by N-1, as `np.cov` and pytorch-fid do).
    pub fn stats(&self) -> Result<FidStats, FidError> {
        if self.count < 2 {
            return Err(FidError::TooFewImages { count: self.count });
        }
        let n = self.count as f64;
        let mu: Vec<f64> = self.sum.iter().map(|s| s / n).collect();
        let d = self.dim;
        let mut sigma = vec![0.0; d * d];
        for r in 0..d {
            for c in 0..d {
                sigma[r * d + c] = (self.sum_outer[r * d + c] - n * mu[r] * mu[c]) / (n - 1.0);
            }
        }
        FidStats::new(mu, sigma)
    }
}

/// d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), in f64.
///
/// tr(sqrt(S1 S2)) is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
/// sqrt(S1) S2 sqrt(S1) (similar to S1 S2), which avoids the non-symmetric `sqrtm` and its
/// complex round-off that scipy-based implementations have to discard.
pub fn frechet_distance(a: &FidStats, b: &FidStats) -> Result<f64, FidError> {
    if a.dim != b.dim {
        return Err(FidError::DimMismatch {
            left: a.dim,
            right: b.dim,
        });
    }
    let d = a.dim;
    let mean_term: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y).powi(2)).sum();
    let s1 = DMatrix::from_row_slice(d, d, &a.sigma);
    let s2 = DMatrix::from_row_slice(d, d, &b.sigma);
    let trace_term = s1.trace() + s2.trace();
    Ok(mean_term + trace_term - 2.0 * trace_sqrt_product(s1, s2))
}

/// tr(sqrt(S1 S2)) for symmetric PSD S1, S2.
///
/// When S1 is positive definite (more images than dimensions, the usual case) S1 = L L^T and
/// S1 S2 is similar to the symmetric L^T S2 L, whose eigenvalues need no eigenvectors: about a
/// third of the work of the general path, which takes sqrt(S1) from a full eigendecomposition
/// (rank-deficient S1, e.g. from fewer images than dimensions).
fn trace_sqrt_product(s1: DMatrix<f64>, s2: DMatrix<f64>) -> f64 {
    let inner = match nalgebra::Cholesky::new(s1.clone()) {
        Some(cholesky) => {
            let l = cholesky.l();
            l.transpose() * s2 * l
        }
        None => {
            let root1 = psd_sqrt(s1);
            &root1 * s2 * &root1
        }
    };
    sum_sqrt_eigenvalues(inner)
}

/// sqrt(S) = V diag(sqrt(max(lambda, 0))) V^T
fn psd_sqrt(s: DMatrix<f64>) -> DMatrix<f64> {
    let d = s.nrows();
    let eig = SymmetricEigen::new(s);
    let roots = DVector::from_iterator(d, eig.eigenvalues.iter().map(|v| v.max(0.0).sqrt()));
    &eig.eigenvectors * DMatrix::from_diagonal(&roots) * eig.eigenvectors.transpose()
}

fn sum_sqrt_eigenvalues(m: DMatrix<f64>) -> f64 {
    // Symmetrize: round-off makes the product very slightly non-symmetric.
    let m = (&m + m.transpose()) * 0.5;
    m.symmetric_eigenvalues()
        .iter()
        .map(|v| v.max(0.0).sqrt())
        .sum()
}

/// Cases with known distances for testing any implementation of the Frechet distance (this
/// crate's and the worker's libtorch one): closed forms, and values computed offline with scipy
/// (`scripts/fid-reference-values.py`, scipy 1.17.1 `sqrtm`) on matrices drawn from the same
/// splitmix64 stream.
pub mod reference_cases {
    use super::FidStats;

    /// The splitmix64 stream of scripts/fid-reference-values.py ([`crate::seed::SplitMix64`]
    /// from state `.0`).
    pub struct SplitMix64(pub u64);

    impl SplitMix64 {
        /// `n` values uniform in [-1, 1).
        pub fn uniform(&mut self, n: usize) -> Vec<f64> {
            let mut rng = crate::seed::SplitMix64::new(self.0);
            let values = (0..n).map(|_| rng.unit_f64() * 2.0 - 1.0).collect();
            self.0 = rng.state();
            values
        }
    }

    /// Two statistics and the distance between them, to relative tolerance `rel_tol`.
    pub struct Case {
        pub name: &'static str,
        pub a: FidStats,
        pub b: FidStats,
        pub distance: f64,
        pub rel_tol: f64,
    }

    fn diag(values: &[f64]) -> Vec<f64> {
        let d = values.len();
        let mut m = vec![0.0; d * d];
        for (i, v) in values.iter().enumerate() {
            m[i * d + i] = *v;
        }
        m
    }

    /// mu, then S = A A^T / (2d) + 0.1 I with A [d, 2d] (random_case in the Python script).
    fn random_stats(rng: &mut SplitMix64, d: usize) -> FidStats {
        let mu = rng.uniform(d);
        let a = rng.uniform(d * 2 * d);
        let mut sigma = vec![0.0; d * d];
        for r in 0..d {
            for c in 0..d {
                let dot: f64 = (0..2 * d)
                    .map(|k| a[r * 2 * d + k] * a[c * 2 * d + k])
                    .sum();
                sigma[r * d + c] = dot / (2 * d) as f64 + if r == c { 0.1 } else { 0.0 };
            }
        }
        FidStats::new(mu, sigma).expect("square by construction")
    }

    pub fn all() -> Vec<Case> {
        let stats = |mu: Vec<f64>, sigma: Vec<f64>| FidStats::new(mu, sigma).expect("square");
        let mut cases = vec![
            Case {
                name: "identity covariances give |mu1 - mu2|^2",
                a: stats(vec![0.0, 1.0, 2.0, 3.0, 4.0], diag(&[1.0; 5])),
                b: stats(vec![1.0, 1.0, 0.0, 3.0, 4.5], diag(&[1.0; 5])),
                distance: 1.0 + 4.0 + 0.25,
                rel_tol: 1e-12,
            },
            {
                let (va, vb) = ([1.0, 4.0, 9.0, 0.25], [4.0, 1.0, 9.0, 2.0]);
                Case {
                    name: "diagonal covariances give sum (sqrt a_i - sqrt b_i)^2 + |dmu|^2",
                    a: stats(vec![0.5; 4], diag(&va)),
                    b: stats(vec![0.0; 4], diag(&vb)),
                    distance: 4.0 * 0.25
                        + va.iter()
                            .zip(&vb)
                            .map(|(x, y): (&f64, &f64)| (x.sqrt() - y.sqrt()).powi(2))
                            .sum::<f64>(),
                    rel_tol: 1e-12,
                }
            },
        ];
        for (name, seed, d, distance) in [
            ("scipy, random d=16", 1, 16, 9.954001075414515),
            ("scipy, random d=32", 2, 32, 27.376305404206853),
            ("scipy, random d=64", 3, 64, 45.106390097315774),
        ] {
            let mut rng = SplitMix64(seed);
            let a = random_stats(&mut rng, d);
            let b = random_stats(&mut rng, d);
            cases.push(Case {
                name,
                a,
                b,
                distance,
                rel_tol: 1e-9,
            });
        }
        cases
    }
}

#[cfg(test)]
mod tests {
    use super::reference_cases::SplitMix64;
    use super::*;

    #[test]
    fn identical_sets_give_zero() {
        let mut m = FeatureMoments::new(8);
        let rows: Vec<f32> = SplitMix64(9)
            .uniform(8 * 24)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        m.add_rows(&rows).expect("rows");
        let stats = m.stats().expect("stats");
        assert!(frechet_distance(&stats, &stats).expect("fid").abs() < 1e-10);
    }

    #[test]
    fn reference_cases_hold() {
        for case in reference_cases::all() {
            let got = frechet_distance(&case.a, &case.b).expect(case.name);
            assert!(
                (got - case.distance).abs() <= case.rel_tol * case.distance.abs().max(1.0),
                "{}: got {got}, want {}",
                case.name,
                case.distance
            );
        }
    }

    #[test]
    fn the_cholesky_and_eigen_paths_agree_and_singular_covariances_take_the_eigen_path() {
        let mut rng = SplitMix64(21);
        let d = 24;
        // Positive definite (60 rows > 24 dims) and rank-deficient (10 rows) feature sets.
        for rows in [60, 10] {
            let mut m1 = FeatureMoments::new(d);
            let mut m2 = FeatureMoments::new(d);
            let x: Vec<f32> = rng
                .uniform(rows * d)
                .into_iter()
                .map(|v| v as f32)
                .collect();
            let y: Vec<f32> = rng
                .uniform(80 * d)
                .into_iter()
                .map(|v| v as f32 * 0.5)
                .collect();
            m1.add_rows(&x).unwrap();
            m2.add_rows(&y).unwrap();
            let (a, b) = (m1.stats().unwrap(), m2.stats().unwrap());
            let s1 = DMatrix::from_row_slice(d, d, &a.sigma);
            let s2 = DMatrix::from_row_slice(d, d, &b.sigma);
            assert_eq!(
                nalgebra::Cholesky::new(s1.clone()).is_some(),
                rows > d,
                "{rows} rows"
            );
            let root1 = psd_sqrt(s1.clone());
            let by_eigen = sum_sqrt_eigenvalues(&root1 * &s2 * &root1);
            let chosen = trace_sqrt_product(s1, s2);
            assert!(
                (chosen - by_eigen).abs() <= 1e-9 * by_eigen.abs(),
                "{rows} rows: {chosen} vs {by_eigen}"
            );
        }
    }

    /// Timing at the Inception's 2048 dimensions (run by hand: `cargo test -p eqim-common --lib
    /// -- --ignored --nocapture fid_timing`).
    #[test]
    #[ignore]
    fn fid_timing_at_2048_dimensions() {
        let d = 2048;
        let mut rng = SplitMix64(5);
        let mut m1 = FeatureMoments::new(d);
        let mut m2 = FeatureMoments::new(d);
        let x: Vec<f32> = rng
            .uniform(3000 * d)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        m1.add_rows(&x).unwrap();
        let y: Vec<f32> = rng
            .uniform(3000 * d)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        m2.add_rows(&y).unwrap();
        let (a, b) = (m1.stats().unwrap(), m2.stats().unwrap());
        let started = std::time::Instant::now();
        let fid = frechet_distance(&a, &b).unwrap();
        println!(
            "positive definite: fid {fid:.6} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let s1 = DMatrix::from_row_slice(d, d, &a.sigma);
        let s2 = DMatrix::from_row_slice(d, d, &b.sigma);
        let started = std::time::Instant::now();
        let root1 = psd_sqrt(s1);
        let t = sum_sqrt_eigenvalues(&root1 * s2 * &root1);
        println!(
            "eigen path: trace {t:.6} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }

    #[test]
    fn rows_added_in_pieces_equal_rows_added_at_once() {
        let d = 6;
        let rows: Vec<f32> = SplitMix64(5)
            .uniform(d * 10)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let mut whole = FeatureMoments::new(d);
        whole.add_rows(&rows).expect("rows");
        let (mut a, mut b) = (FeatureMoments::new(d), FeatureMoments::new(d));
        a.add_rows(&rows[..3 * d]).expect("a");
        b.add_rows(&rows[3 * d..]).expect("b");
        a.merge(&b).expect("merge");
        assert_eq!(a.count, 10);
        for (x, y) in a.sum_outer.iter().zip(&whole.sum_outer) {
            assert!((x - y).abs() < 1e-12);
        }
        assert!(matches!(
            whole.add_rows(&rows[..d + 1]),
            Err(FidError::Ragged { dim: 6, len: 7 })
        ));
        assert!(matches!(
            FeatureMoments::new(4).stats(),
            Err(FidError::TooFewImages { count: 0 })
        ));
        assert!(a.merge(&FeatureMoments::new(5)).is_err());
    }

    #[test]
    fn stats_files_round_trip_and_bad_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.npz");
        let stats = FidStats::new(vec![1.0, 2.0], vec![1.0, 0.5, 0.5, 2.0]).expect("stats");
        stats.write(&path).expect("write");
        assert_eq!(FidStats::read(&path).expect("read"), stats);
        let only_mu = dir.path().join("mu.npz");
        let mu = NpyArray::new(vec![2], vec![0.0, 0.0]);
        write_npz(&only_mu, &[("mu", &mu)]).expect("write");
        let err = FidStats::read(&only_mu).expect_err("no sigma").to_string();
        assert!(err.contains("mu.npz") && err.contains("'sigma'"), "{err}");
    }
}
