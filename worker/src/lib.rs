//! eqim's worker: the models (generator, tokenizer) in tch, data, training, sampling, the c10d
//! collectives and the QUIC client. tch calls block, so they run on dedicated threads, never inside
//! async tasks.

pub mod convert;
pub mod doctor;
pub mod imageio;
pub mod model;
pub mod tokenizer_cli;
pub mod tokenizer_train;
pub mod verify;
