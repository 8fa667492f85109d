#!/usr/bin/env python3
"""Offline reference values for worker/src/eval/fid.rs's tests (run once; outputs are hard-coded there).

Inputs come from splitmix64 streams (seeded below) that the Rust tests regenerate bit for bit, so only
scipy's outputs are copied into the tests. The distance is the pytorch-fid formula with scipy's sqrtm:
  |mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)).

Produced with scipy 1.17.1, numpy 2.4.6. Usage: python3 -m venv /tmp/v && /tmp/v/bin/pip install scipy numpy && /tmp/v/bin/python scripts/fid-reference-values.py
"""
import numpy as np
from scipy import linalg

MASK = (1 << 64) - 1


class SplitMix64:
    def __init__(self, seed):
        self.state = seed & MASK

    def next_u64(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)

    def uniform(self, n):
        """n values in [-1, 1): (u64 >> 11) * 2^-53 * 2 - 1, exact in f64."""
        return np.array([(self.next_u64() >> 11) * 2.0**-53 * 2.0 - 1.0 for _ in range(n)])


def fid(mu1, s1, mu2, s2):
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1.dot(s2))
    if isinstance(covmean, tuple):  # scipy < 1.16 with disp=False
        covmean = covmean[0]
    covmean = covmean.real
    return diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean)


def random_case(seed, d):
    """mu1, A1 (d x 2d), mu2, A2 from one stream; S = A A^T / (2d) + 0.1 I."""
    rng = SplitMix64(seed)
    mu1 = rng.uniform(d)
    a1 = rng.uniform(d * 2 * d).reshape(d, 2 * d)
    mu2 = rng.uniform(d)
    a2 = rng.uniform(d * 2 * d).reshape(d, 2 * d)
    s1 = a1 @ a1.T / (2 * d) + 0.1 * np.eye(d)
    s2 = a2 @ a2.T / (2 * d) + 0.1 * np.eye(d)
    return fid(mu1, s1, mu2, s2)


def feature_case(seed, d, n1, n2):
    """Two feature sets X1 [n1, d], X2 [n2, d] = 1.5 * U + 0.2 from one stream; np.cov stats."""
    rng = SplitMix64(seed)
    x1 = rng.uniform(n1 * d).reshape(n1, d)
    x2 = rng.uniform(n2 * d).reshape(n2, d) * 1.5 + 0.2
    return fid(x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False))


if __name__ == "__main__":
    for seed, d in [(1, 16), (2, 32), (3, 64)]:
        print(f"random_case(seed={seed}, d={d}) = {float(random_case(seed, d))!r}")
    print(f"feature_case(seed=4, d=16, n1=200, n2=300) = {float(feature_case(4, 16, 200, 300))!r}")
