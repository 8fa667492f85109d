//! Models in tch. File layout mirrors the reference's module tree so that `nn::Path` segments spell
//! the reference state_dict keys exactly.

pub mod flow_head;
pub mod generator;
pub mod layers;
pub mod tokenizer;
pub mod weights;
