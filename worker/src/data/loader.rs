//! A prefetching batch loader: worker threads decode and augment whole batches ahead of the
//! training loop (like PyTorch's DataLoader workers) and hand them over in order as tch tensors.
//! A batch is fully determined by its sample indices and the epoch seed, whichever thread or
//! machine builds it.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use tch::Tensor;

use super::DataError;

/// Anything that can write sample `index` (augmented with `seed`) into a CHW float buffer.
pub trait SampleSource: Send + Sync {
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// [C, H, W] of every sample.
    fn image_shape(&self) -> [usize; 3];

    /// Writes the sample into `out` (C*H*W floats) and returns its label. An error means the
    /// sample is skipped; the source has already logged it.
    fn load_into(&self, index: usize, seed: u64, out: &mut [f32]) -> Result<i64, DataError>;
}

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Decoding threads.
    pub num_threads: usize,
    /// Finished batches each thread may hold ahead of the consumer.
    pub prefetch_per_thread: usize,
    /// The epoch seed (see `transform::epoch_seed`).
    pub seed: u64,
}

impl LoaderConfig {
    /// All cores but one (the training thread), at least one, two batches ahead per thread.
    pub fn with_seed(seed: u64) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            num_threads: cores.saturating_sub(1).max(1),
            prefetch_per_thread: 2,
            seed,
        }
    }

    pub fn with_threads(mut self, num_threads: usize) -> Self {
        self.num_threads = num_threads.max(1);
        self
    }
}

/// One batch: `images` [B, C, H, W] float in [-1, 1], `labels` [B] int64. `indices` are the
/// samples it holds, in order; `skipped` those of its requested indices that were unreadable
/// (then B is smaller than requested, possibly 0).
pub struct Batch {
    pub position: usize,
    pub images: Tensor,
    pub labels: Tensor,
    pub indices: Vec<usize>,
    pub skipped: Vec<usize>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
}

/// Builds one batch on the calling thread.
pub fn load_batch(
    source: &dyn SampleSource,
    position: usize,
    indices: &[usize],
    seed: u64,
) -> Batch {
    let [c, h, w] = source.image_shape();
    let numel = c * h * w;
    let mut pixels = vec![0f32; indices.len() * numel];
    let mut labels = Vec::with_capacity(indices.len());
    let mut kept = Vec::with_capacity(indices.len());
    let mut skipped = Vec::new();
    for &index in indices {
        let slot = kept.len();
        match source.load_into(index, seed, &mut pixels[slot * numel..(slot + 1) * numel]) {
            Ok(label) => {
                labels.push(label);
                kept.push(index);
            }
            Err(_) => skipped.push(index),
        }
    }
    pixels.truncate(kept.len() * numel);
    let b = kept.len() as i64;
    Batch {
        position,
        images: Tensor::from_slice(&pixels).view([b, c as i64, h as i64, w as i64]),
        labels: Tensor::from_slice(&labels),
        indices: kept,
        skipped,
    }
}

/// Iterates over the batches of a fixed list, in order, while threads prepare the next ones.
/// Dropping it stops the threads.
pub struct BatchLoader {
    receivers: Vec<Receiver<Batch>>,
    workers: Vec<JoinHandle<()>>,
    next: usize,
    total: usize,
}

impl BatchLoader {
    /// Loads `batches` (each a list of sample indices) in order.
    pub fn new(
        source: Arc<dyn SampleSource>,
        batches: Vec<Vec<usize>>,
        config: &LoaderConfig,
    ) -> Self {
        let total = batches.len();
        let batches = Arc::new(batches);
        let threads = config.num_threads.max(1).min(total.max(1));
        let mut receivers = Vec::with_capacity(threads);
        let mut workers = Vec::with_capacity(threads);
        for thread in 0..threads {
            let (tx, rx) = sync_channel(config.prefetch_per_thread.max(1));
            let (source, batches, seed) = (source.clone(), batches.clone(), config.seed);
            let handle = std::thread::Builder::new()
                .name(format!("eqim-loader-{thread}"))
                .spawn(move || run_worker(&*source, &batches, thread, threads, seed, tx))
                .expect("spawning a data loader thread");
            receivers.push(rx);
            workers.push(handle);
        }
        Self {
            receivers,
            workers,
            next: 0,
            total,
        }
    }

    /// Splits `indices` into consecutive batches of `batch_size` (the last one may be shorter).
    pub fn from_indices(
        source: Arc<dyn SampleSource>,
        indices: &[usize],
        batch_size: usize,
        config: &LoaderConfig,
    ) -> Self {
        let batches = indices
            .chunks(batch_size.max(1))
            .map(|c| c.to_vec())
            .collect();
        Self::new(source, batches, config)
    }

    pub fn num_batches(&self) -> usize {
        self.total
    }
}

/// Thread `thread` of `threads` builds batches thread, thread + threads, ... so the consumer can
/// read them in order by polling the threads round-robin.
fn run_worker(
    source: &dyn SampleSource,
    batches: &[Vec<usize>],
    thread: usize,
    threads: usize,
    seed: u64,
    tx: SyncSender<Batch>,
) {
    for position in (thread..batches.len()).step_by(threads) {
        let batch = load_batch(source, position, &batches[position], seed);
        if tx.send(batch).is_err() {
            return; // the loader was dropped
        }
    }
}

impl Iterator for BatchLoader {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        let thread = self.next % self.receivers.len();
        let item = match self.receivers[thread].recv() {
            Ok(batch) => Ok(batch),
            Err(_) => Err(DataError::LoaderThread { thread }),
        };
        self.next += 1;
        Some(item)
    }
}

impl Drop for BatchLoader {
    fn drop(&mut self) {
        self.receivers.clear();
        for handle in self.workers.drain(..) {
            // A panicked worker already surfaced as DataError::LoaderThread to the consumer.
            let _ = handle.join();
        }
    }
}
