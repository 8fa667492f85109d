//! The reference's learning rate (`util/lr_sched.py`, called every iteration with the epoch
//! fraction `epoch + iter / iters_per_epoch`): `lr = blr * batch / 256`, linear warm-up from 0
//! over `warmup_epochs`, then constant or a half-cycle cosine down to `min_lr`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The reference's default (`--lr_schedule constant`).
    #[default]
    Constant,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Peak learning rate (`blr * effective batch / 256`).
    pub lr: f64,
    pub warmup_epochs: f64,
    pub kind: ScheduleKind,
    /// Floor of the cosine schedule.
    pub min_lr: f64,
    /// Length of the run in epochs (the cosine's period).
    pub epochs: f64,
}

impl LrSchedule {
    /// `blr * effective_batch / 256`, as the reference scales its base learning rate.
    pub fn scaled_lr(blr: f64, effective_batch: u64) -> f64 {
        blr * effective_batch as f64 / 256.0
    }

    /// The learning rate at `epoch` (fractional: `epoch + iter / iters_per_epoch`).
    pub fn lr_at(&self, epoch: f64) -> f64 {
        if epoch < self.warmup_epochs {
            return self.lr * epoch / self.warmup_epochs;
        }
        match self.kind {
            ScheduleKind::Constant => self.lr,
            ScheduleKind::Cosine => {
                let progress = (epoch - self.warmup_epochs) / (self.epochs - self.warmup_epochs);
                self.min_lr
                    + (self.lr - self.min_lr)
                        * 0.5
                        * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }

    /// The epoch fraction of iteration `iter` of `epoch`.
    pub fn epoch_fraction(epoch: u64, iter: u64, iters_per_epoch: u64) -> f64 {
        iter as f64 / iters_per_epoch as f64 + epoch as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind) -> LrSchedule {
        LrSchedule {
            lr: LrSchedule::scaled_lr(1e-4, 2048),
            warmup_epochs: 100.0,
            kind,
            min_lr: 0.0,
            epochs: 1200.0,
        }
    }

    #[test]
    fn warm_up_is_linear_from_zero_then_constant() {
        let s = schedule(ScheduleKind::Constant);
        assert_eq!(s.lr, 8e-4);
        assert_eq!(s.lr_at(0.0), 0.0);
        assert!((s.lr_at(50.0) - 4e-4).abs() < 1e-15);
        let e = LrSchedule::epoch_fraction(3, 1, 4);
        assert_eq!(e, 3.25);
        assert!((s.lr_at(e) - 8e-4 * 3.25 / 100.0).abs() < 1e-18);
        assert_eq!(s.lr_at(100.0), 8e-4);
        assert_eq!(s.lr_at(1000.0), 8e-4);
    }

    #[test]
    fn cosine_decays_to_min_lr_at_the_end() {
        let mut s = schedule(ScheduleKind::Cosine);
        s.min_lr = 1e-6;
        assert!((s.lr_at(100.0) - 8e-4).abs() < 1e-15);
        assert!((s.lr_at(650.0) - (1e-6 + (8e-4 - 1e-6) * 0.5)).abs() < 1e-12);
        assert!((s.lr_at(1200.0) - 1e-6).abs() < 1e-15);
    }
}
