//! Models in tch. File layout mirrors the reference's module tree so that `nn::Path` segments spell
//! the reference state_dict keys exactly.

pub mod tokenizer;
pub mod weights;
