"""Quantisation, modulus choice, error bound and bit-packing of the secure-aggregation wire."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.secagg import (
    MAX_MODULUS_BITS,
    ModulusError,
    PayloadError,
    SecAggParams,
    choose_modulus_bits,
    decode_sum,
    error_bound,
    pack_bits,
    packed_size,
    quantization_step,
    quantize,
    unpack_bits,
)

LORA_LENGTH = 74_883  # MiniLM + LoRA r=8 on query,value, with the head


def test_modulus_never_wraps_up_to_5000_sites() -> None:
    # Prepare: default value bits and a 2^20 count cap, as SecAggParams uses.
    value_bits, max_count = 20, (1 << 20) - 1
    for n in range(1, 5001):
        # Execute
        m = choose_modulus_bits(n, value_bits, max_count)
        # Assert: the largest possible sum fits, and m is the smallest width that does.
        largest = n * max((1 << value_bits) - 1, max_count)
        assert largest < 1 << m
        assert largest >= 1 << (m - 1)
    assert choose_modulus_bits(5000, value_bits, max_count) == 33


def test_old_flower_overflow_point_is_fine() -> None:
    # Flower's SecAgg+ wraps at about 1,024 sites with 22-bit values in 32 bits; we widen instead.
    m = choose_modulus_bits(1024, 22)
    assert (1024 * ((1 << 22) - 1)) < 1 << m <= 1 << MAX_MODULUS_BITS


def test_modulus_too_large_raises() -> None:
    with pytest.raises(ModulusError, match="wire limit"):
        choose_modulus_bits(5000, 30)
    with pytest.raises(ModulusError):
        SecAggParams(round_id=b"r", site_ids=tuple(range(5000)), vector_length=1, value_bits=24)


def test_sum_of_max_values_decodes_exactly_at_5000_sites() -> None:
    # Every site at +clip: the integer sum is the largest possible and must not wrap mod 2^m.
    n, bits, clip = 5000, 20, 1.0
    m = choose_modulus_bits(n, bits)
    q = quantize(np.full(4, clip), value_bits=bits, clip=clip, rounding="nearest")
    total = (q * np.uint64(n)) & np.uint64((1 << m) - 1)
    np.testing.assert_allclose(decode_sum(total, n, value_bits=bits, clip=clip), n * clip, rtol=1e-12)


def test_quantize_range_and_clamping() -> None:
    q = quantize(np.array([-5.0, -1.0, 0.0, 1.0, 5.0]), value_bits=8, clip=1.0, rounding="nearest")
    assert q.tolist() == [0, 0, 128, 255, 255]  # 127.5 rounds half to even → 128


def test_stochastic_rounding_is_unbiased() -> None:
    x = np.full(200_000, 0.3)
    q = quantize(x, value_bits=4, clip=1.0, rounding="stochastic")
    mean = float(decode_sum(q, 1, value_bits=4, clip=1.0).mean())
    assert abs(mean - 0.3) < 5 * quantization_step(4, 1.0) / np.sqrt(x.size)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 50),
    bits=st.integers(2, 24),
    clip=st.floats(1e-3, 1e3),
    rounding=st.sampled_from(["nearest", "stochastic"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_decoded_sum_within_error_bound(n: int, bits: int, clip: float, rounding: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    xs = rng.uniform(-clip, clip, size=(n, 64)).astype(np.float32)
    qs = [quantize(x, value_bits=bits, clip=clip, rounding=rounding) for x in xs]  # type: ignore[arg-type]
    decoded = decode_sum(np.sum(qs, axis=0, dtype=np.uint64), n, value_bits=bits, clip=clip)
    err = np.abs(decoded - xs.astype(np.float64).sum(axis=0)).max()
    assert err <= error_bound(n, bits, clip, rounding)  # type: ignore[arg-type]


def test_error_bound_formula() -> None:
    step = 2.0 / (2**8 - 1)
    assert error_bound(10, 8, 1.0, "nearest") == pytest.approx(10 * step * (0.5 + 2**-16))
    assert error_bound(10, 8, 1.0, "stochastic") == pytest.approx(10 * step * (1 + 2**-16))


@settings(max_examples=40, deadline=None)
@given(length=st.integers(0, 300), bits=st.integers(1, 64), seed=st.integers(0, 2**32 - 1))
def test_pack_round_trip(length: int, bits: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    full = rng.integers(0, 2**64 - 1, size=length, dtype=np.uint64, endpoint=True)
    values = full >> np.uint64(64 - bits)
    payload = pack_bits(values, bits)
    assert len(payload) == packed_size(length, bits) == (length * bits + 7) // 8
    np.testing.assert_array_equal(unpack_bits(payload, length, bits), values)


def test_pack_rejects_values_too_wide() -> None:
    with pytest.raises(ValueError):
        pack_bits(np.array([8], dtype=np.uint64), 3)


def test_unpack_rejects_wrong_length_and_padding() -> None:
    payload = pack_bits(np.arange(10, dtype=np.uint64), 5)  # 50 bits → 7 bytes, 6 padding bits
    with pytest.raises(PayloadError, match="truncated"):
        unpack_bits(payload[:-1], 10, 5)
    with pytest.raises(PayloadError, match="oversized"):
        unpack_bits(payload + b"\x00", 10, 5)
    with pytest.raises(PayloadError, match="padding"):
        unpack_bits(payload[:-1] + bytes([payload[-1] | 0x80]), 10, 5)


def test_wire_size_within_1_1x_fp32_for_lora_adapter() -> None:
    # Worst case the wire allows: a 35-bit modulus.
    raw_fp32 = 4 * LORA_LENGTH
    assert packed_size(LORA_LENGTH, MAX_MODULUS_BITS) <= 1.1 * raw_fp32
    # The defaults at 1,000 sites, with an example count and two metric slots, header included.
    params = SecAggParams(round_id=b"r", site_ids=tuple(range(1000)), vector_length=LORA_LENGTH, count_slots=3)
    header = 4 + 16 + 4 + 4 + 4 * params.degree
    assert params.packed_bytes + header <= 1.1 * raw_fp32
    values = np.full(params.total_length, params.modulus_mask, dtype=np.uint64)
    assert len(pack_bits(values, params.modulus_bits)) == params.packed_bytes
