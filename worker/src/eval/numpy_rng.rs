//! numpy's legacy `np.random.RandomState(seed).permutation(n)`, bit for bit: the shuffle
//! torch-fidelity's Inception Score applies (seed 2020) before cutting the samples into splits.
//! MT19937: Matsumoto & Nishimura 1998, http://www.math.sci.hiroshima-u.ac.jp/m-mat/MT/emt.html;
//! the shuffle: numpy/random/mtrand.pyx (`RandomState.shuffle`) and
//! numpy/random/src/distributions/distributions.c (`random_interval`).

const N: usize = 624;
const M: usize = 397;

/// The 32-bit Mersenne Twister as numpy's `RandomState(seed)` seeds it (Knuth's
/// `init_genrand`, which numpy's legacy seeding uses for an integer seed).
pub struct Mt19937 {
    state: [u32; N],
    pos: usize,
}

impl Mt19937 {
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; N];
        state[0] = seed;
        for i in 1..N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, pos: N }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..N {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % N] & LOWER);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + M) % N] ^ (y >> 1) ^ mag;
        }
        self.pos = 0;
    }

    pub fn next_u32(&mut self) -> u32 {
        if self.pos >= N {
            self.twist();
        }
        let mut y = self.state[self.pos];
        self.pos += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// numpy's 64-bit draw for the legacy generator: two 32-bit outputs, high word first.
    fn next_u64(&mut self) -> u64 {
        let hi = u64::from(self.next_u32());
        (hi << 32) | u64::from(self.next_u32())
    }

    /// A uniform integer in [0, max] by rejection under the smallest all-ones mask >= max, as
    /// numpy's `random_interval` (32-bit draws while max fits in 32 bits).
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        if max <= u64::from(u32::MAX) {
            loop {
                let value = u64::from(self.next_u32()) & mask;
                if value <= max {
                    return value;
                }
            }
        }
        loop {
            let value = self.next_u64() & mask;
            if value <= max {
                return value;
            }
        }
    }
}

/// `np.random.RandomState(seed).permutation(n)`: arange(n) shuffled by Fisher-Yates from the
/// end, swapping i with `interval(i)` for i = n-1 down to 1.
pub fn numpy_permutation(n: usize, seed: u32) -> Vec<usize> {
    let mut rng = Mt19937::new(seed);
    let mut out: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.interval(i as u64) as usize;
        out.swap(i, j);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_output_for_seed_5489() {
        // The 10000th output of the reference generator seeded with 5489 (the C++ standard
        // requires it of std::mt19937).
        let mut rng = Mt19937::new(5489);
        let first = rng.next_u32();
        assert_eq!(first, 3_499_211_612);
        let last = (1..10_000).map(|_| rng.next_u32()).last();
        assert_eq!(last, Some(4_123_659_995));
    }

    #[test]
    fn permutation_of_small_n_is_a_permutation() {
        assert!(numpy_permutation(0, 2020).is_empty());
        assert_eq!(numpy_permutation(1, 2020), vec![0]);
        let mut p = numpy_permutation(97, 2020);
        assert_ne!(p, (0..97).collect::<Vec<_>>());
        p.sort_unstable();
        assert_eq!(p, (0..97).collect::<Vec<_>>());
    }
}
