"""Shamir sharing, mask expansion, signed key bundles and the share AEAD channel."""

from __future__ import annotations

import itertools
import secrets

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from common.secagg import SiteIdentity, SiteRegistry
from common.secagg.errors import DecryptionError, ParameterError, ShamirError, SignatureError
from common.secagg.identity import (
    SignedKeyBundle,
    decrypt_from_peer,
    encrypt_for_peer,
    sign_key_bundle,
    verify_key_bundle,
)
from common.secagg.prg import encode_context, expand_mask, pairwise_seed
from common.secagg.shamir import PRIME, SHARE_BYTES, Share, combine, split

# ---------------------------------------------------------------- Shamir


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), data=st.data())
def test_any_threshold_subset_recovers_the_secret(n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    ids = data.draw(st.lists(st.integers(1, 2**32 - 1), min_size=n, max_size=n, unique=True))
    secret = secrets.token_bytes(32)
    shares = split(secret, ids, t)
    subset = data.draw(st.permutations(shares))[:t]
    assert combine(subset, t) == secret


def test_too_few_duplicate_and_out_of_field_shares_rejected() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, [1, 2, 3, 4, 5], 3)
    with pytest.raises(ShamirError, match="needed"):
        combine(shares[:2], 3)
    with pytest.raises(ShamirError, match="duplicate"):
        combine([shares[0], shares[0], shares[1]], 3)
    with pytest.raises(ShamirError, match="outside the field"):
        Share(1, PRIME)
    with pytest.raises(ShamirError):
        Share(0, 5)  # x = 0 would be the secret itself
    with pytest.raises(ShamirError):
        split(secret, [1, 1, 2], 2)
    with pytest.raises(ShamirError):
        split(secret, [1, 2], 3)


def test_fewer_than_threshold_shares_say_nothing_useful() -> None:
    # With t - 1 shares every secret is equally consistent: interpolating them with a guessed
    # extra share gives an arbitrary field element, almost never a valid 32-byte secret.
    shares = split(secrets.token_bytes(32), [1, 2, 3], 3)
    with pytest.raises(ShamirError, match="inconsistent"):
        combine([shares[0], shares[1], Share(3, 12345)], 3)


def test_garbled_share_detected() -> None:
    # A random field element in place of a share interpolates to a value >= 2^256 (w.p. 1 - 2^-265).
    # A small deliberate shift is not caught here: the server checks recovered secrets against
    # the commitments of the signed key bundle instead (see the protocol tests).
    shares = split(secrets.token_bytes(32), [1, 2, 3, 4], 3)
    bad = Share(shares[0].x, secrets.randbelow(PRIME))
    with pytest.raises(ShamirError, match="inconsistent"):
        combine([bad, shares[1], shares[2]], 3)


def test_share_serialisation_is_fixed_length() -> None:
    for share in split(secrets.token_bytes(32), [1, 2**32 - 1], 2):
        blob = share.to_bytes()
        assert len(blob) == SHARE_BYTES == 70
        assert Share.from_bytes(blob) == share
    with pytest.raises(ShamirError):
        Share.from_bytes(b"\x00" * 69)
    with pytest.raises(ShamirError):
        Share.from_bytes(b"\x00\x00\x00\x01" + b"\xff" * 66)  # y >= p


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
        mask_public=X25519PrivateKey.generate().public_key().public_bytes_raw(),
        seed_commitment=secrets.token_bytes(32),
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
    swapped = SignedKeyBundle(
        b"r1", 1, DIGEST, forged.share_public, bundle.mask_public, bundle.seed_commitment, bundle.signature
    )
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


def test_all_shares_from_one_split_differ() -> None:
    shares = split(b"\x00" * 32, list(range(1, 6)), 3)
    assert len({s.y for s in shares}) == 5
    for a, b in itertools.combinations(shares, 2):
        assert a.to_bytes() != b.to_bytes()
