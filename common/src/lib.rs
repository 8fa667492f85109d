//! eqim's shared, libtorch-free half: configuration files (the coordinator's included), the wire
//! protocol and its framing, the data schedule and seeds, the checkpoint layout and ledger, the
//! metric table and registry, the `/metrics` HTTP server, and the control-plane client (QUIC,
//! certificate pinning, credentials, one connector with retry). Both the coordinator and the
//! worker build on it; neither depends on the other.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod client;
pub mod config;
pub mod coordinator_config;
pub mod device;
pub mod eval_plan;
pub mod fid;
pub mod files;
pub mod framing;
pub mod ledger;
pub mod metrics;
pub mod metrics_http;
pub mod metrics_registry;
pub mod net;
pub mod npz;
pub mod outcome;
pub mod proto;
pub mod schedule;
pub mod seed;
pub mod train_config;
