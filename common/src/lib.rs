//! eqim's shared, libtorch-free types: configuration files, the wire protocol and its framing,
//! the checkpoint manifest and metric names. The coordinator depends only on this crate, so it
//! runs on a CPU head node without libtorch.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod eval_plan;
pub mod fid;
pub mod files;
pub mod framing;
pub mod ledger;
pub mod metrics;
pub mod npz;
pub mod proto;
pub mod schedule;
pub mod seed;
pub mod train_config;
