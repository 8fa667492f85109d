//! The eval plan as pure functions: image i's class label (the reference's balanced order),
//! its noise seed and file name, and a lease table over index ranges.
//! Reference: engine_generator.evaluate in https://github.com/drx-code/EquivariantModeling
