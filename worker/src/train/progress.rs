//! Where a trainer stands: the optimizer step and the position in the epoch, which the lr
//! schedule reads. The runtime sets it from the coordinator's (or the local run's) assignment
//! before each update, so it is never saved: a checkpoint's `job.json` cursor is the truth.

/// Where training stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Optimizer steps taken.
    pub step: u64,
    pub epoch: u64,
    /// Steps of `epoch` already taken (the next step's index in the epoch).
    pub batch_in_epoch: u64,
    pub samples_seen: u64,
}

impl Progress {
    pub fn advance(&mut self, steps_per_epoch: u64, rows: u64) {
        self.step += 1;
        self.samples_seen += rows;
        self.batch_in_epoch += 1;
        if self.batch_in_epoch >= steps_per_epoch {
            self.epoch += 1;
            self.batch_in_epoch = 0;
        }
    }
}
