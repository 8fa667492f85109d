//! Class-per-folder image datasets: any `ROOT/<class>/**/*.{jpg,jpeg,png}` tree (Places: label =
//! alphabetical order of the class folders) and the ImageNet layout the reference reads,
//! `ROOT/ILSVRC2012_train/data/<wnid>/*.JPEG` (label = sorted wnid index). Sample order and labels
//! follow torchvision's `ImageFolder`, so label indices match the reference checkpoints.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use image::RgbImage;

use super::loader::SampleSource;
use super::transform::ImageTransform;
use super::{count_unreadable_file, DataError, IMAGE_EXTENSIONS};

/// The file list of a class-per-folder tree.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<(PathBuf, i64)>,
}

impl ImageFolder {
    /// Scans `root`: every sub-directory is a class (sorted by name, as torchvision does), and
    /// every JPEG/PNG below it (recursively, directories and files in sorted order) a sample.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, DataError> {
        let root = root.as_ref().to_path_buf();
        if !root.is_dir() {
            return Err(DataError::MissingRoot { path: root });
        }
        let mut classes = Vec::new();
        for entry in read_dir_sorted(&root)? {
            if entry.is_dir() {
                let name = entry.file_name().and_then(|n| n.to_str()).ok_or_else(|| {
                    DataError::Decode {
                        path: entry.clone(),
                        reason: "class folder name is not UTF-8".into(),
                    }
                })?;
                classes.push(name.to_string());
            }
        }
        if classes.is_empty() {
            return Err(DataError::NoClasses { path: root });
        }
        let mut samples = Vec::new();
        for (label, class) in classes.iter().enumerate() {
            let class_dir = root.join(class);
            let files = image_files_below(&class_dir)?;
            if files.is_empty() {
                return Err(DataError::EmptyClass { path: class_dir });
            }
            samples.extend(files.into_iter().map(|f| (f, label as i64)));
        }
        Ok(Self {
            root,
            classes,
            samples,
        })
    }

    /// The reference's ImageNet layout: `root/ILSVRC2012_{split}/data/<wnid>/*.JPEG`, with
    /// `split` "train" or "validation".
    pub fn imagenet(root: impl AsRef<Path>, split: &str) -> Result<Self, DataError> {
        Self::open(
            root.as_ref()
                .join(format!("ILSVRC2012_{split}"))
                .join("data"),
        )
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class folder names; a label is an index into this list.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    pub fn path(&self, index: usize) -> &Path {
        &self.samples[index].0
    }

    pub fn label(&self, index: usize) -> i64 {
        self.samples[index].1
    }

    pub fn labels(&self) -> Vec<i64> {
        self.samples.iter().map(|(_, l)| *l).collect()
    }
}

/// Decodes a JPEG or PNG (format guessed from the bytes) to 8-bit RGB. Decoder panics on hostile
/// files are caught and reported as decode errors, so one bad file cannot kill a loader thread.
pub fn decode_rgb(path: &Path) -> Result<RgbImage, DataError> {
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let decoded = std::panic::catch_unwind(|| {
        image::ImageReader::new(std::io::Cursor::new(&bytes))
            .with_guessed_format()
            .map_err(|e| e.to_string())?
            .decode()
            .map_err(|e| e.to_string())
    });
    match decoded {
        Ok(Ok(img)) if img.width() == 0 || img.height() == 0 => Err(DataError::Decode {
            path: path.to_path_buf(),
            reason: "the image has no pixels".into(),
        }),
        Ok(Ok(img)) => Ok(img.into_rgb8()),
        Ok(Err(reason)) => Err(DataError::Decode {
            path: path.to_path_buf(),
            reason,
        }),
        Err(_) => Err(DataError::Decode {
            path: path.to_path_buf(),
            reason: "the decoder panicked".into(),
        }),
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let io_err = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        entries.push(entry.map_err(io_err)?.path());
    }
    entries.sort();
    Ok(entries)
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Image files below `dir` in torchvision's order: `sorted(os.walk(dir))` visits directories by
/// their path string, files by name within each directory.
fn image_files_below(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut dirs = vec![dir.to_path_buf()];
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in read_dir_sorted(&d)? {
            if entry.is_dir() {
                dirs.push(entry.clone());
                pending.push(entry);
            }
        }
    }
    dirs.sort_by(|a, b| a.to_string_lossy().cmp(&b.to_string_lossy()));
    let mut files = Vec::new();
    for d in dirs {
        let mut in_dir: Vec<PathBuf> = read_dir_sorted(&d)?
            .into_iter()
            .filter(|p| p.is_file() && has_image_extension(p))
            .collect();
        in_dir.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
        files.extend(in_dir);
    }
    Ok(files)
}

/// An [`ImageFolder`] with a transform: what the batch loader reads. Unreadable files are
/// remembered so each one is warned about and counted once, then skipped quietly.
pub struct ImageDataset {
    folder: ImageFolder,
    transform: ImageTransform,
    unreadable: Mutex<HashSet<usize>>,
}

impl ImageDataset {
    pub fn new(folder: ImageFolder, transform: ImageTransform) -> Self {
        Self {
            folder,
            transform,
            unreadable: Mutex::new(HashSet::new()),
        }
    }

    pub fn folder(&self) -> &ImageFolder {
        &self.folder
    }

    pub fn transform(&self) -> &ImageTransform {
        &self.transform
    }

    /// Indices found unreadable so far.
    pub fn unreadable_indices(&self) -> Vec<usize> {
        let set = self
            .unreadable
            .lock()
            .expect("unreadable set lock poisoned");
        let mut v: Vec<usize> = set.iter().copied().collect();
        v.sort_unstable();
        v
    }

    fn mark_unreadable(&self, index: usize, err: &DataError) {
        let first_time = self
            .unreadable
            .lock()
            .expect("unreadable set lock poisoned")
            .insert(index);
        if first_time {
            count_unreadable_file();
            tracing::warn!(path = %self.folder.path(index).display(), cause = %err, "skipping unreadable image");
        }
    }
}

impl SampleSource for ImageDataset {
    fn len(&self) -> usize {
        self.folder.len()
    }

    fn image_shape(&self) -> [usize; 3] {
        self.transform.output_shape()
    }

    fn load_into(&self, index: usize, seed: u64, out: &mut [f32]) -> Result<i64, DataError> {
        if index >= self.folder.len() {
            return Err(DataError::IndexOutOfRange {
                index,
                len: self.folder.len(),
            });
        }
        let known_bad = self
            .unreadable
            .lock()
            .expect("unreadable set lock poisoned")
            .contains(&index);
        if known_bad {
            return Err(DataError::KnownUnreadable {
                index,
                path: self.folder.path(index).to_path_buf(),
            });
        }
        match decode_rgb(self.folder.path(index)) {
            Ok(img) => {
                self.transform.apply(&img, seed, index as u64, out);
                Ok(self.folder.label(index))
            }
            Err(err) => {
                self.mark_unreadable(index, &err);
                Err(err)
            }
        }
    }
}
