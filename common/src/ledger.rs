//! The data ledger: which sample indices each committed step consumed. The coordinator appends
//! to it on every commit (aborted steps never reach it) and saves it with checkpoints; its
//! per-epoch summary says how many samples were seen once, twice, more, or never.

use crate::proto::Generation;
use serde::{Deserialize, Serialize};
use std::fmt;

/// One committed step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    pub step: u64,
    pub epoch: u32,
    pub generation: Generation,
    pub indices: Vec<u64>,
}

/// Every committed step of a job, in commit order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub dataset_len: u64,
    pub entries: Vec<LedgerEntry>,
}

/// How often each sample of one epoch was consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochCoverage {
    pub epoch: u32,
    pub once: u64,
    pub twice: u64,
    /// Three times or more.
    pub more: u64,
    pub never: u64,
}

impl EpochCoverage {
    /// Every sample exactly once.
    pub fn is_exact(&self) -> bool {
        self.twice == 0 && self.more == 0 && self.never == 0
    }
}

impl fmt::Display for EpochCoverage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "epoch {}: once {}, twice {}, more {}, never {}",
            self.epoch, self.once, self.twice, self.more, self.never
        )?;
        if self.is_exact() {
            f.write_str(" (each sample exactly once)")?;
        }
        Ok(())
    }
}

impl Ledger {
    pub fn new(dataset_len: u64) -> Self {
        Self {
            dataset_len,
            entries: Vec::new(),
        }
    }

    pub fn record(&mut self, entry: LedgerEntry) {
        self.entries.push(entry);
    }

    /// Coverage of every epoch that has at least one committed step, in epoch order. An index
    /// outside the dataset (a corrupt ledger) counts in no bucket, so the sums then disagree with
    /// the dataset length.
    pub fn summary(&self) -> Vec<EpochCoverage> {
        let Some(last_epoch) = self.entries.iter().map(|e| e.epoch).max() else {
            return Vec::new();
        };
        (0..=last_epoch)
            .filter(|epoch| self.entries.iter().any(|e| e.epoch == *epoch))
            .map(|epoch| self.epoch_coverage(epoch))
            .collect()
    }

    fn epoch_coverage(&self, epoch: u32) -> EpochCoverage {
        let mut seen = vec![0u8; self.dataset_len as usize];
        for entry in self.entries.iter().filter(|e| e.epoch == epoch) {
            for &i in &entry.indices {
                if let Some(count) = seen.get_mut(i as usize) {
                    *count = count.saturating_add(1);
                }
            }
        }
        let mut c = EpochCoverage {
            epoch,
            once: 0,
            twice: 0,
            more: 0,
            never: 0,
        };
        for count in seen {
            match count {
                0 => c.never += 1,
                1 => c.once += 1,
                2 => c.twice += 1,
                _ => c.more += 1,
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(step: u64, epoch: u32, indices: &[u64]) -> LedgerEntry {
        LedgerEntry {
            step,
            epoch,
            generation: Generation(1),
            indices: indices.to_vec(),
        }
    }

    #[test]
    fn summary_counts_once_twice_more_and_never_per_epoch() {
        let mut l = Ledger::new(4);
        l.record(entry(0, 0, &[0, 1]));
        l.record(entry(1, 0, &[2, 3]));
        l.record(entry(2, 1, &[3, 3, 1]));
        l.record(entry(3, 1, &[3]));
        let s = l.summary();
        assert_eq!(s.len(), 2);
        assert!(s[0].is_exact());
        assert_eq!(
            s[0].to_string(),
            "epoch 0: once 4, twice 0, more 0, never 0 (each sample exactly once)"
        );
        assert_eq!(
            s[1],
            EpochCoverage {
                epoch: 1,
                once: 1,
                twice: 0,
                more: 1,
                never: 2
            }
        );
    }

    #[test]
    fn an_empty_ledger_has_no_epochs() {
        assert!(Ledger::new(10).summary().is_empty());
    }
}
