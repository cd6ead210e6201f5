"""Shamir sharing, mask expansion, signed key bundles and the share AEAD channel."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from common.secagg import SiteIdentity, SiteRegistry
from common.secagg.errors import DecryptionError, ParameterError, PayloadError, ShamirError, SignatureError
from common.secagg.group import G, P, Q, element_from_bytes, element_to_bytes, exp, exp_g, new_secret
from common.secagg.identity import (
    SignedKeyBundle,
    decrypt_from_peer,
    encrypt_for_peer,
    sign_key_bundle,
    verify_key_bundle,
)
from common.secagg.prg import encode_context, expand_mask, pairwise_seed
from common.secagg.shamir import SHARE_BYTES, Share, combine, evaluate
from common.secagg.vss import Commitments, polynomial, share_ok, shares_ok

# ---------------------------------------------------------------- Shamir over Z_Q, Feldman commitments, the group


def _polynomial(t: int, secret: int | None = None) -> list[int]:
    return polynomial(new_secret() if secret is None else secret, secrets.token_bytes(32), DIGEST, "key", t)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), data=st.data())
def test_any_threshold_subset_recovers_the_secret(n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    ids = data.draw(st.lists(st.integers(1, 2**32 - 1), min_size=n, max_size=n, unique=True))
    coefficients = _polynomial(t)
    shares = evaluate(coefficients, ids)
    subset = data.draw(st.permutations(shares))[:t]
    assert combine(subset, t) == coefficients[0]


def test_too_few_duplicate_and_out_of_range_shares_rejected() -> None:
    shares = evaluate(_polynomial(3), [1, 2, 3, 4, 5])
    with pytest.raises(ShamirError, match="needed"):
        combine(shares[:2], 3)
    with pytest.raises(ShamirError, match="duplicate"):
        combine([shares[0], shares[0], shares[1]], 3)
    with pytest.raises(ShamirError, match="outside Z_Q"):
        Share(1, Q)
    with pytest.raises(ShamirError):
        Share(0, 5)  # x = 0 would be the secret itself
    with pytest.raises(ShamirError):
        evaluate(_polynomial(2), [1, 1, 2])
    with pytest.raises(ShamirError):
        evaluate([], [1, 2])


def test_share_serialisation_is_fixed_length() -> None:
    for share in evaluate(_polynomial(2), [1, 2**32 - 1]):
        blob = share.to_bytes()
        assert len(blob) == SHARE_BYTES == 260
        assert Share.from_bytes(blob) == share
    with pytest.raises(ShamirError):
        Share.from_bytes(b"\x00" * 259)
    with pytest.raises(ShamirError):
        Share.from_bytes(b"\x00\x00\x00\x01" + b"\xff" * 256)  # y >= Q


def test_group_is_rfc3526_group_14_of_prime_order() -> None:
    assert P.bit_length() == 2048 and P == 2 * Q + 1 and P % 8 == 7  # so 2 is a quadratic residue
    assert pow(G, Q, P) == 1 and exp_g(Q) == 1 and exp_g(1) == G
    a, b = new_secret(), new_secret()
    assert exp(exp_g(a), b) == exp(exp_g(b), a) == exp_g(a * b)  # the pairwise mask agreement
    assert exp(P - G, a) == exp_g(a)  # x and -x are one element
    for bad in (bytes(256), (Q + 1).to_bytes(256, "big"), (P - 1).to_bytes(256, "big"), b"\x02"):
        with pytest.raises(PayloadError):
            element_from_bytes(bad)
    assert element_from_bytes(element_to_bytes(Q)) == Q


def test_dealing_is_deterministic_per_key_round_and_kind() -> None:
    key, secret = secrets.token_bytes(32), new_secret()
    first = polynomial(secret, key, DIGEST, "key", 5)
    assert polynomial(secret, key, DIGEST, "key", 5) == first and first[0] == secret
    assert polynomial(secret, key, bytes(32), "key", 5)[1:] != first[1:]
    assert polynomial(secret, key, DIGEST, "seed", 5)[1:] != first[1:]
    assert polynomial(secret, secrets.token_bytes(32), DIGEST, "key", 5)[1:] != first[1:]


def test_feldman_check_accepts_exactly_the_committed_shares() -> None:
    seed, key = _polynomial(4), _polynomial(4)
    commitments = Commitments.of_polynomials(seed, key)
    assert commitments.mask_public == exp_g(key[0]) and commitments.seed[0] == exp_g(seed[0])
    assert Commitments.from_bytes(commitments.to_bytes(), 4) == commitments
    shares = evaluate(key, list(range(1, 8)))
    assert all(share_ok(s, commitments.key) for s in shares)
    assert shares_ok([(s, commitments.key) for s in shares] + [(evaluate(seed, [9])[0], commitments.seed)])
    bad = Share(shares[3].x, (shares[3].y + 1) % Q)
    assert not share_ok(bad, commitments.key) and not share_ok(shares[0], commitments.seed)
    assert not shares_ok([(s, commitments.key) for s in shares[:3]] + [(bad, commitments.key)])
    other = evaluate(_polynomial(4, key[0]), [1])[0]  # same secret, another polynomial
    assert not share_ok(other, commitments.key)
    with pytest.raises(PayloadError):
        Commitments.from_bytes(commitments.to_bytes()[:-1], 4)
    with pytest.raises(PayloadError):
        Commitments.from_bytes(commitments.to_bytes(), 3)


# ---------------------------------------------------------------- mask expansion


def test_expand_mask_is_deterministic_and_context_bound() -> None:
    seed = secrets.token_bytes(32)
    a = expand_mask(seed, 1000, 30, encode_context("self", b"r1", 1))
    assert np.array_equal(a, expand_mask(seed, 1000, 30, encode_context("self", b"r1", 1)))
    assert not np.array_equal(a, expand_mask(seed, 1000, 30, encode_context("self", b"r2", 1)))
    assert not np.array_equal(a, expand_mask(seed, 1000, 30, encode_context("self", b"r1", 2)))
    assert int(a.max()) < 2**30


def test_expand_mask_looks_uniform() -> None:
    m, length = 33, 100_000
    words = expand_mask(secrets.token_bytes(32), length, m, b"ctx")
    assert abs(float((words / 2.0**m).mean()) - 0.5) < 5 * (1 / 12 / length) ** 0.5
    bits = (words[:, None] >> np.arange(m, dtype=np.uint64)) & np.uint64(1)
    assert np.all(np.abs(bits.mean(axis=0) - 0.5) < 5 * 0.5 / length**0.5)


def test_expand_mask_rejects_bad_seed() -> None:
    with pytest.raises(ParameterError):
        expand_mask(b"short", 10, 20, b"ctx")


def test_context_encoding_is_unambiguous() -> None:
    assert encode_context(b"ab", b"c") != encode_context(b"a", b"bc")
    assert encode_context("1") != encode_context(1) != encode_context(b"1")


def test_pairwise_seed_is_symmetric_and_uses_the_full_secret() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    s_ab = a.exchange(b.public_key())
    assert s_ab == b.exchange(a.public_key())
    assert pairwise_seed(s_ab, b"r", 3, 7) == pairwise_seed(s_ab, b"r", 7, 3)
    assert pairwise_seed(s_ab, b"r", 3, 7) != pairwise_seed(s_ab, b"r2", 3, 7)
    flipped = bytes([s_ab[0] ^ 1]) + s_ab[1:]  # changing any bit of the secret changes the seed
    assert pairwise_seed(flipped, b"r", 3, 7) != pairwise_seed(s_ab, b"r", 3, 7)


# ---------------------------------------------------------------- identities and bundles


def _bundle(identity: SiteIdentity, site: int, round_id: bytes = b"r1") -> SignedKeyBundle:
    return sign_key_bundle(
        identity, round_id=round_id, site_id=site, params_digest=DIGEST,
        share_public=X25519PrivateKey.generate().public_key().public_bytes_raw(),
        commitments_digest=secrets.token_bytes(32),
    )


DIGEST = bytes(range(32))


def test_bundle_round_trip_and_verification() -> None:
    alice, mallory = SiteIdentity.generate(), SiteIdentity.generate()
    registry = SiteRegistry({1: alice.public_bytes(), 2: mallory.public_pem()})
    bundle = _bundle(alice, 1)
    parsed = SignedKeyBundle.from_bytes(bundle.to_bytes())
    assert parsed == bundle
    verify_key_bundle(parsed, registry, round_id=b"r1", site_id=1, params_digest=DIGEST)
    with pytest.raises(SignatureError, match="other round parameters"):  # bound to ALL parameters
        verify_key_bundle(parsed, registry, round_id=b"r1", site_id=1, params_digest=bytes(32))
    with pytest.raises(SignatureError, match="another round"):
        verify_key_bundle(bundle, registry, round_id=b"r2", site_id=1, params_digest=DIGEST)
    with pytest.raises(SignatureError, match="claims site"):
        verify_key_bundle(bundle, registry, round_id=b"r1", site_id=2, params_digest=DIGEST)
    forged = _bundle(mallory, 1)  # right site id, signed by the wrong key
    with pytest.raises(SignatureError, match="bad signature"):
        verify_key_bundle(forged, registry, round_id=b"r1", site_id=1, params_digest=DIGEST)
    swapped = SignedKeyBundle(b"r1", 1, DIGEST, forged.share_public, bundle.commitments_digest, bundle.signature)
    with pytest.raises(SignatureError, match="bad signature"):
        verify_key_bundle(swapped, registry, round_id=b"r1", site_id=1, params_digest=DIGEST)
    with pytest.raises(SignatureError, match="not in the registry"):
        verify_key_bundle(_bundle(alice, 9), registry, round_id=b"r1", site_id=9, params_digest=DIGEST)


def test_identity_pem_round_trip() -> None:
    ident = SiteIdentity.generate()
    assert SiteIdentity.from_pem(ident.to_pem()).public_bytes() == ident.public_bytes()
    enc = ident.to_pem(password=b"pw")
    assert SiteIdentity.from_pem(enc, password=b"pw").public_bytes() == ident.public_bytes()


def test_aead_binds_round_sender_and_receiver() -> None:
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    a_pub, b_pub = (k.public_key().public_bytes_raw() for k in (a, b))
    ct = encrypt_for_peer(a, b_pub, round_id=b"r", sender=1, receiver=2, plaintext=b"share")
    assert decrypt_from_peer(b, a_pub, round_id=b"r", sender=1, receiver=2, ciphertext=ct) == b"share"
    wrong = [
        dict(round_id=b"r2", sender=1, receiver=2, ciphertext=ct),
        dict(round_id=b"r", sender=3, receiver=2, ciphertext=ct),
        dict(round_id=b"r", sender=1, receiver=3, ciphertext=ct),
        dict(round_id=b"r", sender=1, receiver=2, ciphertext=ct[:-1] + bytes([ct[-1] ^ 1])),
        dict(round_id=b"r", sender=1, receiver=2, ciphertext=b"garbage"),
    ]
    for kwargs in wrong:
        with pytest.raises(DecryptionError):
            decrypt_from_peer(b, a_pub, **kwargs)  # type: ignore[arg-type]


def test_aead_rejects_low_order_peer_key() -> None:
    with pytest.raises(SignatureError):
        encrypt_for_peer(X25519PrivateKey.generate(), bytes(32), round_id=b"r", sender=1, receiver=2, plaintext=b"x")
