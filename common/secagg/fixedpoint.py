"""Fixed-point encoding of site contributions, the modulus, and bit-packing for the wire.

A contribution is ``L`` float values in ``[-clip, clip]`` followed by ``C`` integer *count slots*
in ``[0, max_count]``. Values are quantised to ``value_bits``-bit unsigned integers
``q = round((x + clip) / step)`` with ``step = 2 * clip / (2**value_bits - 1)``; counts are used as
they are. Masked vectors live in ``Z_{2^m}`` where ``m`` is the smallest width at which the sum
of ``max_sites`` contributions never wraps, so the unmasked sum is exact in integers.

Error bound (:func:`error_bound`): for ``n`` sites with values ``x_i`` in ``[-clip, clip]``,

    | decode_sum(sum_i q_i, n) - sum_i x_i |  <=  n * step * (r + 2**-16)     per element,

with ``r = 1/2`` for ``rounding="nearest"`` and ``r = 1`` for ``rounding="stochastic"``
(stochastic rounding is unbiased: ``E[decode] = sum_i x_i``). The ``2**-16`` term covers float64
evaluation error for ``value_bits <= 30``. Dividing by ``n`` bounds the error of the mean by
``step * (r + 2**-16)``; a caller that rescales the sum by ``s`` scales the bound by ``|s|``.
"""

from __future__ import annotations

import secrets
from typing import Literal

import numpy as np
import numpy.typing as npt

from common.secagg.errors import ModulusError, ParameterError, PayloadError

__all__ = [
    "MAX_MODULUS_BITS",
    "MAX_VALUE_BITS",
    "Rounding",
    "check_packed",
    "choose_modulus_bits",
    "clip_l2",
    "decode_sum",
    "error_bound",
    "pack_bits",
    "packed_size",
    "quantization_step",
    "quantize",
    "unpack_bits",
]

MAX_MODULUS_BITS = 35
"""Wire limit: 35-bit elements keep an upload within 1.1x the fp32 bytes (35/32 = 1.094)."""
MAX_VALUE_BITS = 30
"""Beyond 30 bits the float64 evaluation slack of :func:`error_bound` no longer holds."""

Rounding = Literal["stochastic", "nearest"]
U64 = npt.NDArray[np.uint64]


def choose_modulus_bits(max_sites: int, value_bits: int, max_count: int = 0) -> int:
    """Return the smallest ``m`` with ``max_sites * max(2**value_bits - 1, max_count) < 2**m``.

    Raises :class:`ModulusError` when ``m`` exceeds :data:`MAX_MODULUS_BITS`.
    """
    if max_sites < 1:
        raise ParameterError(f"max_sites must be >= 1, got {max_sites}")
    if not 1 <= value_bits <= MAX_VALUE_BITS:
        raise ParameterError(f"value_bits must be in [1, {MAX_VALUE_BITS}], got {value_bits}")
    if max_count < 0:
        raise ParameterError(f"max_count must be >= 0, got {max_count}")
    largest_sum = max_sites * max((1 << value_bits) - 1, max_count)
    bits = largest_sum.bit_length()
    if bits > MAX_MODULUS_BITS:
        raise ModulusError(
            f"{max_sites} sites x {value_bits}-bit values (max_count={max_count}) need a "
            f"{bits}-bit modulus; the wire limit is {MAX_MODULUS_BITS}: lower value_bits, "
            "max_count or the number of sites"
        )
    return bits


def quantization_step(value_bits: int, clip: float) -> float:
    """Width of one quantisation level: ``2 * clip / (2**value_bits - 1)``."""
    if not clip > 0 or not np.isfinite(clip):
        raise ParameterError(f"clip must be a positive finite number, got {clip}")
    return 2.0 * clip / float((1 << value_bits) - 1)


def error_bound(n_sites: int, value_bits: int, clip: float, rounding: Rounding) -> float:
    """Per-element bound on ``|decode_sum(sum q) - sum x|`` over ``n_sites`` (see module doc)."""
    r = 0.5 if rounding == "nearest" else 1.0
    return n_sites * quantization_step(value_bits, clip) * (r + 2.0**-16)


def clip_l2(update: npt.ArrayLike, clip: float) -> tuple[npt.NDArray[np.float64], bool]:
    """Scale ``update`` so its L2 norm is at most ``clip``; return it and whether it was scaled."""
    vec = np.asarray(update, dtype=np.float64).ravel()
    if not np.all(np.isfinite(vec)):
        raise ParameterError("update contains NaN or infinite values")
    norm = float(np.linalg.norm(vec))
    if norm <= clip:
        return vec, False
    return vec * (clip / norm), True


def quantize(
    values: npt.ArrayLike,
    *,
    value_bits: int,
    clip: float,
    rounding: Rounding = "stochastic",
) -> U64:
    """Map floats in ``[-clip, clip]`` to integers in ``[0, 2**value_bits - 1]``.

    Values outside the range are clamped. Stochastic rounding draws its noise from a numpy
    Generator seeded by ``secrets``; that noise only rounds and never masks anything.
    """
    vec = np.asarray(values, dtype=np.float64).ravel()
    if not np.all(np.isfinite(vec)):
        raise ParameterError("values contain NaN or infinite values")
    top = float((1 << value_bits) - 1)
    scaled = (np.clip(vec, -clip, clip) + clip) / quantization_step(value_bits, clip)
    if rounding == "nearest":
        levels = np.rint(scaled)
    elif rounding == "stochastic":
        noise = np.random.default_rng(secrets.randbits(128)).random(vec.shape[0])
        levels = np.floor(scaled + noise)
    else:
        raise ParameterError(f"rounding must be 'stochastic' or 'nearest', got {rounding!r}")
    return np.clip(levels, 0.0, top).astype(np.uint64)


def decode_sum(
    summed: npt.NDArray[np.uint64], n_sites: int, *, value_bits: int, clip: float
) -> npt.NDArray[np.float64]:
    """Turn the integer sum of ``n_sites`` quantised vectors back into the float sum."""
    step = quantization_step(value_bits, clip)
    return summed.astype(np.float64) * step - n_sites * clip


def packed_size(length: int, modulus_bits: int) -> int:
    """Bytes that ``length`` integers of ``modulus_bits`` bits occupy on the wire."""
    return (length * modulus_bits + 7) // 8


def pack_bits(values: U64, modulus_bits: int) -> bytes:
    """Pack integers ``< 2**modulus_bits`` little-endian, bit-contiguously, padding with zeros."""
    if not 1 <= modulus_bits <= 64:
        raise ParameterError(f"modulus_bits must be in [1, 64], got {modulus_bits}")
    vec = np.ascontiguousarray(values, dtype="<u8").ravel()
    if modulus_bits < 64 and vec.size and int(vec.max()) >> modulus_bits:
        raise ParameterError(f"a value does not fit in {modulus_bits} bits")
    bits = np.unpackbits(vec.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
    return np.packbits(bits[:, :modulus_bits].ravel(), bitorder="little").tobytes()


def unpack_bits(payload: bytes, length: int, modulus_bits: int) -> U64:
    """Inverse of :func:`pack_bits`.

    Raises :class:`PayloadError` when the payload is truncated, oversized, or has non-zero
    padding bits (a non-canonical encoding).
    """
    check_packed(payload, length, modulus_bits)
    bits = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), bitorder="little")
    used = length * modulus_bits
    wide = np.zeros((length, 64), dtype=np.uint8)
    wide[:, :modulus_bits] = bits[:used].reshape(length, modulus_bits)
    packed = np.packbits(wide, axis=1, bitorder="little")
    return packed.view("<u8").ravel().astype(np.uint64)


def check_packed(payload: bytes, length: int, modulus_bits: int) -> None:
    """Raise :class:`PayloadError` unless :func:`unpack_bits` would accept ``payload``."""
    expected = packed_size(length, modulus_bits)
    if len(payload) != expected:
        kind = "truncated" if len(payload) < expected else "oversized"
        raise PayloadError(f"{kind} vector: {len(payload)} bytes, expected {expected}")
    padding = 8 * expected - length * modulus_bits
    if padding and payload[-1] >> (8 - padding):
        raise PayloadError("non-zero padding bits after the last element")
