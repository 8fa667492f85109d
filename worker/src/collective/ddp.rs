//! Data-parallel helpers over a [`ProcessGroup`]: gradient averaging in ~25 MB buckets (the
//! bucket size PyTorch DDP uses) and broadcast of parameters and other state from one rank, so
//! every rank starts identical. Generic over a `tch::nn::VarStore`; the training loop calls
//! [`GradientBuckets::allreduce_mean`] between backward and the optimizer step.
//!
//! Every rank must build its buckets from the same model: variables are ordered by name, so the
//! flattened layout (and thus the sequence of collectives) agrees across ranks.

use super::{CollectiveError, ProcessGroup, Result};
use tch::{nn::VarStore, Device, Kind, Tensor};

/// PyTorch DDP's default `bucket_cap_mb`.
pub const DEFAULT_BUCKET_BYTES: usize = 25 * 1024 * 1024;

fn torch(op: &'static str) -> impl Fn(tch::TchError) -> CollectiveError {
    move |source| CollectiveError::Torch { op, source }
}

/// A named tensor's place inside a bucket's flat buffer.
struct Slot {
    name: String,
    tensor: Tensor,
    offset: i64,
    numel: i64,
}

/// Consecutive same-dtype, same-device tensors flattened into one buffer.
struct Bucket {
    slots: Vec<Slot>,
    buffer: Tensor,
}

/// Splits `named` (already in the agreed order) into buckets of at most `bucket_bytes` each
/// (a single tensor larger than that gets a bucket of its own), never mixing dtypes or devices.
fn plan_buckets(named: Vec<(String, Tensor)>, bucket_bytes: usize) -> Result<Vec<Bucket>> {
    let mut buckets: Vec<Bucket> = Vec::new();
    let mut current: Vec<Slot> = Vec::new();
    let mut current_bytes = 0usize;
    let mut current_key: Option<(Kind, Device)> = None;
    let flush = |slots: &mut Vec<Slot>, buckets: &mut Vec<Bucket>| -> Result<()> {
        if slots.is_empty() {
            return Ok(());
        }
        let first = &slots[0].tensor;
        let total: i64 = slots.iter().map(|s| s.numel).sum();
        let buffer = Tensor::f_zeros([total], (first.kind(), first.device()))
            .map_err(torch("allocating a bucket"))?;
        buckets.push(Bucket {
            slots: std::mem::take(slots),
            buffer,
        });
        Ok(())
    };
    for (name, tensor) in named {
        let key = (tensor.kind(), tensor.device());
        let numel = i64::try_from(tensor.numel()).expect("tensor sizes fit i64");
        let bytes = tensor.numel() * key.0.elt_size_in_bytes();
        let fits = current_bytes + bytes <= bucket_bytes;
        if current_key != Some(key) || (!current.is_empty() && !fits) {
            flush(&mut current, &mut buckets)?;
            current_bytes = 0;
            current_key = Some(key);
        }
        let offset = current.iter().map(|s| s.numel).sum();
        current.push(Slot {
            name,
            tensor,
            offset,
            numel,
        });
        current_bytes += bytes;
    }
    flush(&mut current, &mut buckets)?;
    Ok(buckets)
}

/// The trainable variables of `vs`, sorted by name so every rank agrees on the order.
fn sorted_trainable(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut named: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    named
}

/// Averages the gradients of a model over all ranks of a group, bucket by bucket.
pub struct GradientBuckets {
    buckets: Vec<Bucket>,
}

impl GradientBuckets {
    /// Plans buckets over the trainable variables of `vs` (built once, reused every step).
    pub fn new(vs: &VarStore, bucket_bytes: usize) -> Result<Self> {
        Ok(Self {
            buckets: plan_buckets(sorted_trainable(vs), bucket_bytes)?,
        })
    }

    /// Number of buckets, i.e. all-reduce calls per step.
    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    /// Elements per bucket, in the order they are reduced.
    pub fn bucket_numels(&self) -> Vec<i64> {
        self.buckets
            .iter()
            .map(|b| b.slots.iter().map(|s| s.numel).sum())
            .collect()
    }

    /// Replaces every gradient by its mean over the group's ranks: flatten into each bucket,
    /// all-reduce (sum), divide by the world size, copy back.
    ///
    /// On error the gradients may be partly averaged and must not be applied: the caller drops
    /// the step (zeroes the gradients) and, with the coordinator, re-forms the group.
    pub fn allreduce_mean(&mut self, group: &ProcessGroup) -> Result<()> {
        self.allreduce_sum_divided(group, group.world_size() as f64)
    }

    /// Like [`GradientBuckets::allreduce_mean`] but divides the sum by `divisor`: with gradient
    /// accumulation over uneven micro-batch counts per rank, the divisor is the global number of
    /// micro-batches (each rank then passes its locally summed, not averaged, gradients).
    pub fn allreduce_sum_divided(&mut self, group: &ProcessGroup, divisor: f64) -> Result<()> {
        if !(divisor.is_finite() && divisor > 0.0) {
            return Err(CollectiveError::InvalidArgument {
                op: "gradient all-reduce",
                reason: format!("divisor must be positive and finite, got {divisor}"),
            });
        }
        let _no_grad = tch::no_grad_guard();
        for bucket in &mut self.buckets {
            for slot in &bucket.slots {
                let grad = slot.tensor.grad();
                if !grad.defined() {
                    return Err(CollectiveError::MissingGradient {
                        name: slot.name.clone(),
                    });
                }
                bucket
                    .buffer
                    .narrow(0, slot.offset, slot.numel)
                    .f_copy_(&grad.reshape([-1]))
                    .map_err(torch("flattening gradients"))?;
            }
            group.allreduce_sum(&mut bucket.buffer)?;
            // The in-place op returns the same tensor again; nothing else to keep.
            let _ = bucket
                .buffer
                .f_div_scalar_(divisor)
                .map_err(torch("averaging gradients"))?;
            for slot in &bucket.slots {
                let mut grad = slot.tensor.grad();
                let averaged = bucket.buffer.narrow(0, slot.offset, slot.numel);
                grad.f_copy_(&averaged.view_as(&grad))
                    .map_err(torch("copying averaged gradients back"))?;
            }
        }
        Ok(())
    }
}

/// Copies `root`'s values of `tensors` into every other rank's, in place, flattening them into
/// buckets of at most `bucket_bytes` so a model takes a few collectives, not one per tensor.
/// Every rank passes tensors of the same shapes and dtypes in the same order.
pub fn broadcast_tensors(
    group: &ProcessGroup,
    tensors: &[Tensor],
    root: usize,
    bucket_bytes: usize,
) -> Result<()> {
    let _no_grad = tch::no_grad_guard();
    let named = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("tensor {i}"), t.shallow_clone()))
        .collect();
    for mut bucket in plan_buckets(named, bucket_bytes)? {
        for slot in &bucket.slots {
            bucket
                .buffer
                .narrow(0, slot.offset, slot.numel)
                .f_copy_(&slot.tensor.reshape([-1]))
                .map_err(torch("flattening tensors to broadcast"))?;
        }
        group.broadcast(&mut bucket.buffer, root)?;
        if group.rank() == root {
            continue;
        }
        for slot in &mut bucket.slots {
            let received = bucket.buffer.narrow(0, slot.offset, slot.numel);
            let shaped = received.view_as(&slot.tensor);
            slot.tensor
                .f_copy_(&shaped)
                .map_err(torch("copying broadcast tensors back"))?;
        }
    }
    Ok(())
}

/// Sums `tensors` over all ranks in place and divides by `divisor`, bucket by bucket: the
/// gradient all-reduce for models that keep their gradients outside `.grad` (a gradient
/// accumulator). Every rank passes tensors of the same shapes and dtypes in the same order. On
/// error the tensors may be partly reduced and must be dropped.
pub fn allreduce_sum_tensors(
    group: &ProcessGroup,
    tensors: &[Tensor],
    divisor: f64,
    bucket_bytes: usize,
) -> Result<()> {
    if !(divisor.is_finite() && divisor > 0.0) {
        return Err(CollectiveError::InvalidArgument {
            op: "tensor all-reduce",
            reason: format!("divisor must be positive and finite, got {divisor}"),
        });
    }
    let _no_grad = tch::no_grad_guard();
    let named = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (format!("tensor {i}"), t.shallow_clone()))
        .collect();
    for mut bucket in plan_buckets(named, bucket_bytes)? {
        for slot in &bucket.slots {
            bucket
                .buffer
                .narrow(0, slot.offset, slot.numel)
                .f_copy_(&slot.tensor.reshape([-1]))
                .map_err(torch("flattening tensors to all-reduce"))?;
        }
        group.allreduce_sum(&mut bucket.buffer)?;
        if divisor != 1.0 {
            let _ = bucket
                .buffer
                .f_div_scalar_(divisor)
                .map_err(torch("dividing reduced tensors"))?;
        }
        for slot in &mut bucket.slots {
            let reduced = bucket.buffer.narrow(0, slot.offset, slot.numel);
            let shaped = reduced.view_as(&slot.tensor);
            slot.tensor
                .f_copy_(&shaped)
                .map_err(torch("copying reduced tensors back"))?;
        }
    }
    Ok(())
}

/// Makes every rank's variables (trainable or not, sorted by name) equal to `root`'s, followed by
/// any `extra_state` tensors (optimizer moments, EMA weights, ...) in the order given.
pub fn broadcast_var_store(
    group: &ProcessGroup,
    vs: &VarStore,
    extra_state: &[Tensor],
    root: usize,
) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tensors: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
    tensors.extend(extra_state.iter().map(Tensor::shallow_clone));
    broadcast_tensors(group, &tensors, root, DEFAULT_BUCKET_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collective::{GlooDevice, GroupOptions, Store};
    use std::time::Duration;

    fn world_of_one() -> (Store, ProcessGroup) {
        let timeout = Duration::from_secs(10);
        let store = Store::host("127.0.0.1", 0, timeout).expect("host");
        let options = GroupOptions::gloo(0, 1, timeout)
            .with_gloo_device(GlooDevice::Hostname("127.0.0.1".into()));
        let group = ProcessGroup::with_options(&store, &options).expect("group");
        (store, group)
    }

    #[test]
    fn gradients_are_divided_and_missing_ones_are_named() {
        let (_store, group) = world_of_one();
        let vs = VarStore::new(Device::Cpu);
        let used = vs.root().ones("used", &[3]);
        let _unused = vs.root().ones("unused", &[2]);
        let mut buckets = GradientBuckets::new(&vs, DEFAULT_BUCKET_BYTES).expect("plan");
        (&used * 4.0).sum(Kind::Float).backward();
        let err = buckets.allreduce_mean(&group).unwrap_err();
        assert!(err.to_string().contains("`unused`"), "{err}");

        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().ones("w", &[3]);
        let mut buckets = GradientBuckets::new(&vs, DEFAULT_BUCKET_BYTES).expect("plan");
        (&w * 4.0).sum(Kind::Float).backward();
        buckets.allreduce_mean(&group).expect("world of one");
        assert_eq!(
            w.grad().double_value(&[0]),
            4.0,
            "the mean over one rank is the gradient"
        );
        buckets.allreduce_sum_divided(&group, 8.0).expect("divide");
        assert_eq!(w.grad().double_value(&[2]), 0.5);
        assert!(buckets.allreduce_sum_divided(&group, 0.0).is_err());
    }

    fn named(sizes: &[(&str, i64, Kind)]) -> Vec<(String, Tensor)> {
        sizes
            .iter()
            .map(|(n, numel, kind)| (n.to_string(), Tensor::zeros([*numel], (*kind, Device::Cpu))))
            .collect()
    }

    #[test]
    fn buckets_respect_the_byte_cap_and_never_mix_dtypes() {
        let tensors = named(&[
            ("a", 10, Kind::Float),
            ("b", 10, Kind::Float),
            ("c", 30, Kind::Float),
            ("d", 5, Kind::Double),
            ("e", 5, Kind::Float),
        ]);
        // 80 bytes: a+b (80 bytes) fill one bucket, c (120 bytes) is alone, then dtype changes.
        let buckets = plan_buckets(tensors, 80).expect("plan");
        let numels: Vec<i64> = buckets.iter().map(|b| b.buffer.numel() as i64).collect();
        assert_eq!(numels, vec![20, 30, 5, 5]);
        assert_eq!(buckets[2].buffer.kind(), Kind::Double);
        assert_eq!(buckets[0].slots[1].offset, 10);
    }

    #[test]
    fn gradient_buckets_follow_variable_names_not_creation_order() {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let _z = root.zeros("z_last", &[3]);
        let _a = root.zeros("a_first", &[2]);
        let _frozen = root.zeros_no_train("buffer", &[100]);
        let buckets = GradientBuckets::new(&vs, DEFAULT_BUCKET_BYTES).expect("plan");
        assert_eq!(buckets.bucket_count(), 1);
        let names: Vec<&str> = buckets.buckets[0]
            .slots
            .iter()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(names, vec!["a_first", "z_last"], "sorted, trainable only");
    }
}
