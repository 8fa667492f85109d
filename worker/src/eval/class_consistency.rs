//! Class consistency of class-conditional samples: a nearest-class-mean classifier on Inception
//! pool3 features, fitted on real images of each class, labels every generated image; the score
//! is the fraction labelled as the class it was sampled for. The classifier's accuracy on
//! held-out real images is the ceiling the samples can be compared with (`eqim class-consistency`,
//! used by `scripts/demo`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use super::inception::{preprocess_images, read_rgb_image, Inception, INCEPTION_DIM};
use super::InceptionOptions;
use crate::data::ImageFolder;
use eqim_common::eval_plan::EvalPlan;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ClassConsistencyError {
    #[error("class {class} has no fitting features: every class needs at least one")]
    EmptyClass { class: usize },
    #[error("{features} feature rows but {labels} labels")]
    LabelCount { features: usize, labels: usize },
    #[error("label {label} is outside the {class_num} classes")]
    LabelRange { label: usize, class_num: usize },
    #[error("feature row {row} has {got} values, expected {expected}")]
    Width {
        row: usize,
        got: usize,
        expected: usize,
    },
    #[error("no features to fit or score")]
    Empty,
}

/// Nearest-class-mean classifier: a feature gets the class whose mean feature is nearest
/// (squared Euclidean distance; ties go to the lower class index).
#[derive(Debug, Clone, PartialEq)]
pub struct NearestClassMean {
    means: Vec<Vec<f64>>,
}

/// How a set of labelled features fared: hits per class and in all.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    pub correct: usize,
    pub total: usize,
    /// (correct, total) of each true class.
    pub per_class: Vec<(usize, usize)>,
}

impl Score {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

impl NearestClassMean {
    /// Class means of `features` (rows of equal width) grouped by `labels` (0..class_num).
    pub fn fit(
        features: &[Vec<f32>],
        labels: &[usize],
        class_num: usize,
    ) -> Result<Self, ClassConsistencyError> {
        let width = check_rows(features, labels, class_num)?;
        let mut sums = vec![vec![0.0f64; width]; class_num];
        let mut counts = vec![0usize; class_num];
        for (row, &label) in features.iter().zip(labels) {
            counts[label] += 1;
            for (s, &v) in sums[label].iter_mut().zip(row) {
                *s += f64::from(v);
            }
        }
        if let Some(class) = counts.iter().position(|&c| c == 0) {
            return Err(ClassConsistencyError::EmptyClass { class });
        }
        for (sum, &count) in sums.iter_mut().zip(&counts) {
            sum.iter_mut().for_each(|s| *s /= count as f64);
        }
        Ok(Self { means: sums })
    }

    pub fn class_num(&self) -> usize {
        self.means.len()
    }

    pub fn predict(&self, feature: &[f32]) -> usize {
        let distance = |mean: &Vec<f64>| -> f64 {
            mean.iter()
                .zip(feature)
                .map(|(m, &v)| (f64::from(v) - m).powi(2))
                .sum()
        };
        let mut best = (0, f64::INFINITY);
        for (class, mean) in self.means.iter().enumerate() {
            let d = distance(mean);
            if d < best.1 {
                best = (class, d);
            }
        }
        best.0
    }

    /// How many of `features` are predicted as their `labels`.
    pub fn score(
        &self,
        features: &[Vec<f32>],
        labels: &[usize],
    ) -> Result<Score, ClassConsistencyError> {
        let width = check_rows(features, labels, self.class_num())?;
        let expected = self.means[0].len();
        if width != expected {
            return Err(ClassConsistencyError::Width {
                row: 0,
                got: width,
                expected,
            });
        }
        let mut per_class = vec![(0, 0); self.class_num()];
        for (row, &label) in features.iter().zip(labels) {
            per_class[label].1 += 1;
            if self.predict(row) == label {
                per_class[label].0 += 1;
            }
        }
        Ok(Score {
            correct: per_class.iter().map(|c| c.0).sum(),
            total: features.len(),
            per_class,
        })
    }
}

/// Checks counts, label range and equal widths; returns the width.
fn check_rows(
    features: &[Vec<f32>],
    labels: &[usize],
    class_num: usize,
) -> Result<usize, ClassConsistencyError> {
    if features.len() != labels.len() {
        return Err(ClassConsistencyError::LabelCount {
            features: features.len(),
            labels: labels.len(),
        });
    }
    let width = features.first().ok_or(ClassConsistencyError::Empty)?.len();
    if let Some(row) = features.iter().position(|r| r.len() != width) {
        return Err(ClassConsistencyError::Width {
            row,
            got: features[row].len(),
            expected: width,
        });
    }
    if let Some(&label) = labels.iter().find(|&&l| l >= class_num) {
        return Err(ClassConsistencyError::LabelRange { label, class_num });
    }
    Ok(width)
}

/// `count` indices spread evenly over `0..len`, starting `phase` (0..1) of a step in, so picks
/// cover every photo of a class folder whose crops are numbered photo by photo.
pub fn spread_indices(len: usize, count: usize, phase: f64) -> Vec<usize> {
    let count = count.min(len);
    let step = len as f64 / count.max(1) as f64;
    (0..count)
        .map(|j| (((j as f64 + phase) * step) as usize).min(len - 1))
        .collect()
}

/// What `eqim class-consistency` compares (its flags: `cli/eval.rs`).
#[derive(Debug, Clone)]
pub struct ClassConsistencyOptions {
    /// Class-per-folder tree of real images.
    pub real: PathBuf,
    /// Generated images `{i:05}.png` in the balanced label order of `eqim eval`.
    pub samples: PathBuf,
    /// Real images per class that fit the class means.
    pub fit_per_class: usize,
    /// Other real images per class that measure the ceiling.
    pub heldout_per_class: usize,
    pub inception: InceptionOptions,
}

/// What `eqim class-consistency` measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassConsistencyReport {
    pub classes: Vec<String>,
    /// The classifier on held-out real images.
    pub ceiling: Score,
    /// The classifier on the generated images, against the labels they were sampled for.
    pub samples: Score,
}

impl ClassConsistencyReport {
    pub fn chance(&self) -> f64 {
        1.0 / self.classes.len().max(1) as f64
    }

    /// `class-consistency ...` lines (parsed by scripts/demo).
    pub fn lines(&self) -> Vec<String> {
        let per_class = |s: &Score| {
            self.classes
                .iter()
                .zip(&s.per_class)
                .map(|(name, (c, t))| format!("{name} {c}/{t}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        vec![
            format!(
                "class-consistency {:.3} ({} of {} samples labelled as their own class; chance {:.3}; {})",
                self.samples.accuracy(),
                self.samples.correct,
                self.samples.total,
                self.chance(),
                per_class(&self.samples)
            ),
            format!(
                "class-consistency ceiling {:.3} (nearest-class-mean on {} held-out real images; {})",
                self.ceiling.accuracy(),
                self.ceiling.total,
                per_class(&self.ceiling)
            ),
        ]
    }
}

/// Pool3 features of `files`, one row each, in order.
pub fn feature_rows(
    net: &Inception,
    files: &[PathBuf],
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    anyhow::ensure!(batch_size > 0, "--batch-size must be at least 1");
    let mut rows = Vec::with_capacity(files.len());
    for chunk in files.chunks(batch_size) {
        let batch = chunk
            .iter()
            .map(|path| {
                let image = read_rgb_image(path)?.unsqueeze(0);
                Ok(preprocess_images(&image, net.device())?)
            })
            .collect::<Result<Vec<_>>>()?;
        let (features, _) = net.forward_preprocessed(&Tensor::cat(&batch, 0))?;
        let features = features.to_device(Device::Cpu).to_kind(Kind::Float);
        let flat =
            Vec::<f32>::try_from(features.flatten(0, -1)).context("reading Inception features")?;
        rows.extend(flat.chunks(INCEPTION_DIM).map(<[f32]>::to_vec));
    }
    Ok(rows)
}

/// Real files and labels: per class, `per_class` files spread over its folder at `phase`.
fn real_split(folder: &ImageFolder, per_class: usize, phase: f64) -> (Vec<PathBuf>, Vec<usize>) {
    let mut files = Vec::new();
    let mut labels = Vec::new();
    for class in 0..folder.classes().len() {
        let members: Vec<usize> = (0..folder.len())
            .filter(|&i| folder.label(i) == class as i64)
            .collect();
        for k in spread_indices(members.len(), per_class, phase) {
            files.push(folder.path(members[k]).to_path_buf());
            labels.push(class);
        }
    }
    (files, labels)
}

/// Generated files and the labels they were sampled with (eval's balanced order).
fn sample_split(dir: &Path, class_num: usize) -> Result<(Vec<PathBuf>, Vec<usize>)> {
    let files = super::image_files(dir)?;
    let plan = EvalPlan::new(files.len() as u64, class_num as u64, 0).with_context(|| {
        format!(
            "{}: {} images for {class_num} classes",
            dir.display(),
            files.len()
        )
    })?;
    let labels = (0..files.len() as u64)
        .map(|i| plan.label(i) as usize)
        .collect();
    Ok((files, labels))
}

pub fn run_class_consistency(args: &ClassConsistencyOptions) -> Result<ClassConsistencyReport> {
    anyhow::ensure!(
        args.fit_per_class > 0 && args.heldout_per_class > 0,
        "--fit-per-class and --heldout-per-class must be at least 1"
    );
    let folder = ImageFolder::open(&args.real)
        .with_context(|| format!("opening the real image tree {}", args.real.display()))?;
    let class_num = folder.classes().len();
    let (fit_files, fit_labels) = real_split(&folder, args.fit_per_class, 0.0);
    let (held_files, held_labels) = real_split(&folder, args.heldout_per_class, 0.5);
    anyhow::ensure!(
        fit_files.iter().all(|f| !held_files.contains(f)),
        "{}: too few images per class for {} fitting and {} held-out ones; lower --fit-per-class or --heldout-per-class",
        args.real.display(),
        args.fit_per_class,
        args.heldout_per_class
    );
    let (sample_files, sample_labels) = sample_split(&args.samples, class_num)?;
    let net = args.inception.load()?;
    let batch = args.inception.batch_size;
    let classifier = NearestClassMean::fit(
        &feature_rows(&net, &fit_files, batch)?,
        &fit_labels,
        class_num,
    )?;
    let ceiling = classifier.score(&feature_rows(&net, &held_files, batch)?, &held_labels)?;
    let samples = classifier.score(&feature_rows(&net, &sample_files, batch)?, &sample_labels)?;
    Ok(ClassConsistencyReport {
        classes: folder.classes().to_vec(),
        ceiling,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Features of class c near the point 10 * e_c, with a deterministic wobble.
    fn clustered(class_num: usize, per_class: usize, width: usize) -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for c in 0..class_num {
            for k in 0..per_class {
                let row = (0..width)
                    .map(|d| {
                        let wobble = ((c * 31 + k * 7 + d * 3) % 5) as f32 * 0.2 - 0.4;
                        if d == c {
                            10.0 + wobble
                        } else {
                            wobble
                        }
                    })
                    .collect();
                rows.push(row);
                labels.push(c);
            }
        }
        (rows, labels)
    }

    #[test]
    fn separable_classes_are_all_recognised() {
        let (rows, labels) = clustered(5, 8, 12);
        let nc = NearestClassMean::fit(&rows, &labels, 5).expect("fit");
        let score = nc.score(&rows, &labels).expect("score");
        assert_eq!(score.correct, 40);
        assert_eq!(score.accuracy(), 1.0);
        assert_eq!(score.per_class, vec![(8, 8); 5]);
    }

    #[test]
    fn features_of_the_wrong_class_score_zero() {
        let (rows, labels) = clustered(5, 8, 12);
        let nc = NearestClassMean::fit(&rows, &labels, 5).expect("fit");
        // Claim every sample is of the next class: the classifier must disagree every time.
        let shifted: Vec<usize> = labels.iter().map(|l| (l + 1) % 5).collect();
        let score = nc.score(&rows, &shifted).expect("score");
        assert_eq!(score.correct, 0);
        assert_eq!(score.accuracy(), 0.0);
    }

    #[test]
    fn classes_that_look_alike_are_confused() {
        // Class 1's features are copies of class 0's: the two means coincide, the tie goes to
        // class 0, so class 1 is never recognised while class 2 always is.
        let (mut rows, labels) = clustered(3, 6, 4);
        for k in 0..6 {
            rows[6 + k] = rows[k].clone();
        }
        let nc = NearestClassMean::fit(&rows, &labels, 3).expect("fit");
        let score = nc.score(&rows, &labels).expect("score");
        assert_eq!(score.per_class, vec![(6, 6), (0, 6), (6, 6)]);
        assert_eq!(score.correct, 12);
    }

    #[test]
    fn predict_picks_the_nearest_mean() {
        let rows = vec![vec![0.0, 0.0], vec![4.0, 0.0], vec![0.0, 4.0]];
        let nc = NearestClassMean::fit(&rows, &[0, 1, 2], 3).expect("fit");
        assert_eq!(nc.predict(&[3.0, 0.5]), 1);
        assert_eq!(nc.predict(&[0.5, 3.0]), 2);
        assert_eq!(nc.predict(&[0.5, 0.5]), 0);
    }

    #[test]
    fn bad_inputs_are_named() {
        let rows = vec![vec![1.0, 2.0], vec![3.0, 4.0]];
        assert_eq!(
            NearestClassMean::fit(&rows, &[0, 0], 2),
            Err(ClassConsistencyError::EmptyClass { class: 1 })
        );
        assert_eq!(
            NearestClassMean::fit(&rows, &[0], 2),
            Err(ClassConsistencyError::LabelCount {
                features: 2,
                labels: 1
            })
        );
        assert_eq!(
            NearestClassMean::fit(&rows, &[0, 2], 2),
            Err(ClassConsistencyError::LabelRange {
                label: 2,
                class_num: 2
            })
        );
        let ragged = vec![vec![1.0, 2.0], vec![3.0]];
        assert!(matches!(
            NearestClassMean::fit(&ragged, &[0, 1], 2),
            Err(ClassConsistencyError::Width { row: 1, .. })
        ));
        let nc = NearestClassMean::fit(&rows, &[0, 1], 2).expect("fit");
        assert!(matches!(
            nc.score(&[vec![1.0, 2.0, 3.0]], &[0]),
            Err(ClassConsistencyError::Width { .. })
        ));
    }

    #[test]
    fn spread_indices_cover_the_range_and_interleave() {
        assert_eq!(spread_indices(96, 4, 0.0), vec![0, 24, 48, 72]);
        assert_eq!(spread_indices(96, 4, 0.5), vec![12, 36, 60, 84]);
        assert_eq!(spread_indices(3, 5, 0.0), vec![0, 1, 2]);
        let fit = spread_indices(288, 20, 0.0);
        let held = spread_indices(288, 20, 0.5);
        assert!(fit.iter().all(|i| !held.contains(i)));
    }
}
