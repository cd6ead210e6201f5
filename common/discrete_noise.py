"""Exact discrete noise from OS entropy (Canonne, Kamath & Steinke 2020, "The Discrete Gaussian for Differential
Privacy"): rational parameters, integer and Fraction arithmetic only, ``secrets`` for every draw, never a seed.
Light: no torch, no NumPy.
"""

from __future__ import annotations

import math
import secrets
from fractions import Fraction


def bernoulli_exp(gamma: Fraction) -> bool:
    """True with probability exp(−γ), exactly, for a rational γ ≥ 0 (CKS 2020, Algorithm 1)."""
    while gamma > 1:
        if not bernoulli_exp(Fraction(1)):
            return False
        gamma -= 1
    k = 1
    while secrets.randbelow(gamma.denominator * k) < gamma.numerator:  # Bernoulli(γ/k)
        k += 1
    return k % 2 == 1


def discrete_laplace(epsilon: Fraction) -> int:
    """Y with P(Y = y) ∝ exp(−ε·|y|), exactly (CKS 2020, Algorithm 2): n + Y is ε-DP for a count n that one unit
    moves by at most 1."""
    s, t = epsilon.numerator, epsilon.denominator  # scale t/s
    while True:
        u = secrets.randbelow(t)
        if not bernoulli_exp(Fraction(u, t)):
            continue
        v = 0
        while bernoulli_exp(Fraction(1)):
            v += 1
        magnitude, negative = (u + t * v) // s, secrets.randbits(1)
        if not (negative and magnitude == 0):  # else −0 and +0 would both count 0
            return -magnitude if negative else magnitude


def discrete_gaussian(sigma_sq: Fraction) -> int:
    """Y with P(Y = y) ∝ exp(−y²/(2σ²)) on the integers, exactly (CKS 2020, Algorithm 3: discrete Laplace
    proposals of scale t = ⌊σ⌋ + 1, accepted with probability exp(−(|Y| − σ²/t)²/(2σ²))). Its variance is
    below σ²; n + Y is (Δ²/2σ²)-zCDP for an integer n that one unit moves by at most Δ (CKS 2020, Theorem 4)."""
    if sigma_sq <= 0:
        raise ValueError(f"σ² must be > 0, got {sigma_sq}")
    t = math.isqrt(sigma_sq.numerator // sigma_sq.denominator) + 1
    while True:
        y = discrete_laplace(Fraction(1, t))
        if bernoulli_exp((abs(y) - sigma_sq / t) ** 2 / (2 * sigma_sq)):
            return y
