//! Models in tch. File layout mirrors the reference's module tree so that `nn::Path` segments spell
//! the reference state_dict keys exactly.

pub mod diffaug;
pub mod dino_disc;
pub mod dinov2;
pub mod flow_head;
pub mod generator;
pub mod layers;
pub mod lpips;
pub mod nlayer_disc;
pub mod tokenizer;
pub mod weights;
