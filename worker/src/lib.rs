//! eqim's worker: the models (generator, tokenizer) in tch, data, training, sampling, the c10d
//! collectives and the QUIC client. tch calls block, so they run on dedicated threads, never inside
//! async tasks.

pub mod bench_step;
pub mod cli;
pub mod collective;
pub mod contact_sheet;
pub mod convert;
pub mod data;
pub mod demo;
pub mod device;
pub mod doctor;
pub mod eval;
pub mod imageio;
pub mod launch;
pub mod metrics;
pub mod model;
pub mod plan_memory;
pub mod precision;
pub mod progress;
pub mod runtime;
pub mod sample_images;
pub mod sample_tokens;
pub mod sampling;
pub mod tokenizer_io;
pub mod tokenizer_train;
pub mod train;
pub mod verify;
