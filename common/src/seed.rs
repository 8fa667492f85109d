//! Every seed of eqim, derived rather than stored, from one PRNG written here: SplitMix64
//! (Steele, Lea, Flood 2014). It is tiny, fast, and its streams never change between crate
//! versions (unlike `rand`'s), which matters because a resumed job must see the same data order,
//! the same augmentations and the same noise as the run that wrote its checkpoint, on any machine.
//!
//! Named streams keep independent uses of one `(seed, index)` pair apart; see [`stream`].

/// The golden-ratio increment of SplitMix64.
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: a bijective 64-bit mixer with good avalanche.
pub fn finalize(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One SplitMix64 step from state `z`: a seedless hash of `z` (`mix(a) != mix(b)` for `a != b`).
pub fn mix(z: u64) -> u64 {
    finalize(z.wrapping_add(GOLDEN_GAMMA))
}

/// The seed of draw `slot` of optimizer step `step` in a run seeded with `seed` (and of other
/// `(seed, a, b)` triples: the named [`stream`]s use `step` = a stream constant). Kept below 2^63
/// so that it is a valid non-negative `i64` for libtorch's `manual_seed`.
pub fn derive_seed(seed: u64, step: u64, slot: u64) -> u64 {
    mix(mix(mix(seed) ^ step) ^ slot) >> 1
}

/// Stream constants for [`derive_seed`]'s `step` argument, out of the range of real steps.
pub mod stream {
    /// The draws that initialise model weights (no optimizer step reaches it).
    pub const INIT: u64 = u64::MAX;
    /// The horizontal flip of each latent-cache row, per epoch (`slot` = epoch).
    pub const LATENT_FLIPS: u64 = u64::MAX - 1;
}

/// The SplitMix64 generator.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(state: u64) -> Self {
        Self { state }
    }

    /// The state after the draws so far (`SplitMix64::new(state)` continues the stream).
    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN_GAMMA);
        finalize(self.state)
    }

    /// Uniform in `0..bound` (`bound > 0`) without modulo bias (rejection of the short last
    /// bucket).
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "SplitMix64::below needs a positive bound");
        let zone = u64::MAX - (u64::MAX % bound);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % bound;
            }
        }
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn unit_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_matches_the_published_splitmix64_sequence() {
        // First outputs for seed 1234567 of the reference C implementation (Vigna's splitmix64.c).
        let mut rng = SplitMix64::new(1234567);
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
        assert_eq!(mix(1234567), 6457827717110365317);
    }

    #[test]
    fn derived_seeds_differ_by_every_argument_and_repeat_exactly() {
        let a = derive_seed(1, 5, 0);
        assert_eq!(a, derive_seed(1, 5, 0));
        assert_ne!(a, derive_seed(1, 5, 1));
        assert_ne!(a, derive_seed(1, 6, 0));
        assert_ne!(a, derive_seed(2, 5, 0));
        assert_ne!(derive_seed(0, 1, 0), derive_seed(0, 0, 1));
        assert!(a < 1 << 63);
    }

    #[test]
    fn bounded_draws_stay_in_range_and_cover_it() {
        let mut rng = SplitMix64::new(3);
        let mut seen = [false; 7];
        for _ in 0..1000 {
            let x = rng.below(7);
            seen[x as usize] = true;
            let u = rng.unit_f64();
            assert!((0.0..1.0).contains(&u));
        }
        assert!(seen.iter().all(|&s| s));
    }
}
