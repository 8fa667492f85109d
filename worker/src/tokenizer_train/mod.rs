//! Tokenizer training (`eqim train-tokenizer`): the reference's `LPIPSWithDiscriminator` losses,
//! two Adam optimizers stepped alternately per batch, the warm-up + step-decay schedule, `LitEma`,
//! and stage 2 (decoder fine-tuning).
//! Upstream: `tokenizer/models/tokenizer.py`, `tokenizer/modules/losses/contperceptual.py`.

pub mod losses;
pub mod optim;
pub mod config;
pub mod images;
