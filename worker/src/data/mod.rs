//! Training data: class-per-folder image datasets (ImageNet and Places layouts), the reference's
//! transforms, a prefetching multi-threaded batch loader, the latent cache and the demo scene set.
//! Reference: torchvision `ImageFolder` + `Resize`/`RandomCrop`/`RandomHorizontalFlip` as used by
//! https://github.com/drx-code/EquivariantModeling/blob/main/scripts/train_generator.py

pub mod bench;
pub mod demo;
pub mod folder;
pub mod latent_cache;
pub mod loader;
pub mod resize;
pub mod transform;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

pub use folder::{ImageDataset, ImageFolder};
pub use latent_cache::{LatentCache, LatentCacheWriter};
pub use loader::{Batch, BatchLoader, LoaderConfig, SampleSource};
pub use transform::{epoch_seed, Augment, ImageTransform, SampleRng, TransformConfig};

/// File extensions (lowercase) the datasets load; other files in class folders are ignored.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("dataset folder {path} does not exist or is not a directory; point the data path at a folder with one sub-folder per class")]
    MissingRoot { path: PathBuf },
    #[error("dataset folder {path} has no class sub-folders; put the images in one sub-folder per class (label = alphabetical order of the folders)")]
    NoClasses { path: PathBuf },
    #[error("class folder {path} has no .jpg/.jpeg/.png images; add images or remove the folder")]
    EmptyClass { path: PathBuf },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable JPEG/PNG image ({reason}); it is skipped")]
    Decode { path: PathBuf, reason: String },
    #[error("sample {index} ({path}) was found unreadable earlier and is skipped")]
    KnownUnreadable { index: usize, path: PathBuf },
    #[error("sample index {index} is out of range for a dataset of {len} samples")]
    IndexOutOfRange { index: usize, len: usize },
    #[error("invalid image transform: {0}")]
    Transform(String),
    #[error("data loader thread {thread} stopped unexpectedly (it panicked; see the log above)")]
    LoaderThread { thread: usize },
    #[error("latent cache {path}: {reason}")]
    LatentCache { path: PathBuf, reason: String },
}

impl From<eqim_common::files::FileError> for DataError {
    fn from(e: eqim_common::files::FileError) -> Self {
        DataError::Io {
            path: e.path,
            source: e.source,
        }
    }
}

/// Unreadable or corrupt image files found so far in this process (each file counted once).
/// The metrics code exports it as `eqim_common::metrics::DATA_UNREADABLE_FILES_TOTAL`; training
/// goes on without those files.
static UNREADABLE_FILES_SKIPPED: AtomicU64 = AtomicU64::new(0);

/// How many distinct unreadable image files this process has skipped.
pub fn unreadable_files_skipped() -> u64 {
    UNREADABLE_FILES_SKIPPED.load(Ordering::Relaxed)
}

fn count_unreadable_file() {
    UNREADABLE_FILES_SKIPPED.fetch_add(1, Ordering::Relaxed);
}
