"""Site identities (Ed25519), signed per-round key bundles, and the AEAD channel for shares.

Each site holds a long-term Ed25519 identity key provisioned out of band; the server and every
site know all identity public keys through a :class:`SiteRegistry`. Per round, a site signs its
fresh X25519 share-encryption key and the digest of its Feldman commitments (whose first key
element is its mask-agreement public key, common.secagg.vss) together with the round id, its site
id and the digest of all round parameters, so a server relaying keys can neither substitute its
own nor show two sites different parameters. Sites also sign each Shamir share they deal (bound to
that commitments digest) and the survivor set of the consistency round.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from common.secagg.errors import DecryptionError, PayloadError, SignatureError
from common.secagg.prg import encode_context, hkdf

__all__ = [
    "SignedKeyBundle",
    "SiteIdentity",
    "SiteRegistry",
    "check_bundle_keys",
    "decrypt_from_peer",
    "encrypt_for_peer",
    "share_signature_ok",
    "sign_key_bundle",
    "sign_share",
    "sign_survivors",
    "survivors_signature_ok",
    "verify_key_bundle",
    "x25519_shared_secret",
]

_KEY = 32
_SIG = 64
SIGNATURE_BYTES = _SIG
_NONCE = 12
_MAX_ROUND_ID = 0xFFFF


@dataclass(frozen=True)
class SiteIdentity:
    """A site's long-term Ed25519 signing key."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SiteIdentity:
        """A fresh identity (provisioning time, once per site)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes, password: bytes | None = None) -> SiteIdentity:
        """Load a PKCS#8 PEM private key."""
        key = serialization.load_pem_private_key(pem, password=password)
        if not isinstance(key, Ed25519PrivateKey):
            raise SignatureError("identity key is not an Ed25519 private key")
        return cls(key)

    def to_pem(self, password: bytes | None = None) -> bytes:
        """PKCS#8 PEM, encrypted when ``password`` is given."""
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
        )

    def public_bytes(self) -> bytes:
        """Raw 32-byte public key, as stored in the registry."""
        return self.private_key.public_key().public_bytes_raw()

    def public_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM of the public key."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


class SiteRegistry(Mapping[int, Ed25519PublicKey]):
    """Read-only map of site id to identity public key, provisioned out of band."""

    def __init__(self, keys: Mapping[int, Ed25519PublicKey | bytes]) -> None:
        self._keys: dict[int, Ed25519PublicKey] = {}
        for site_id, raw in keys.items():
            key: object = raw
            if isinstance(raw, bytes):
                key = (
                    serialization.load_pem_public_key(raw)
                    if raw.startswith(b"-----BEGIN")
                    else Ed25519PublicKey.from_public_bytes(raw)
                )
            if not isinstance(key, Ed25519PublicKey):
                raise SignatureError(f"registry key of site {site_id} is not Ed25519")
            self._keys[int(site_id)] = key

    def __getitem__(self, site_id: int) -> Ed25519PublicKey:
        return self._keys[site_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def to_raw(self) -> dict[int, bytes]:
        """Site id to raw 32-byte public key (for JSON/TOML provisioning files, hex-encoded)."""
        return {sid: key.public_bytes_raw() for sid, key in self._keys.items()}


@dataclass(frozen=True)
class SignedKeyBundle:
    """A site's X25519 share-encryption public key for one round and the digest of its Feldman
    commitments (both sharing polynomials, its mask public key among them), signed by its identity
    key together with the digest of ALL the round's parameters (a bundle signed over other
    parameters is invalid). Small on purpose: a sparse round sends every bundle to every site."""

    round_id: bytes
    site_id: int
    params_digest: bytes
    share_public: bytes
    commitments_digest: bytes
    signature: bytes

    def signed_message(self) -> bytes:
        """The exact bytes covered by the signature."""
        return _bundle_message(self.round_id, self.site_id, self.params_digest, self.share_public,
                               self.commitments_digest)

    def to_bytes(self) -> bytes:
        """Wire encoding."""
        return (
            len(self.round_id).to_bytes(2, "big") + self.round_id + self.site_id.to_bytes(4, "big")
            + self.params_digest + self.share_public + self.commitments_digest + self.signature
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> SignedKeyBundle:
        """Parse :meth:`to_bytes` output; raises :class:`PayloadError` when malformed."""
        if not isinstance(data, bytes) or len(data) < 2:
            raise PayloadError("key bundle is not bytes or is truncated")
        n = int.from_bytes(data[:2], "big")
        expected = 2 + n + 4 + 3 * _KEY + _SIG
        if len(data) != expected:
            raise PayloadError(f"key bundle has {len(data)} bytes, expected {expected}")
        body = data[2 + n:]
        digest, share_public, commitments = (body[4 + i * _KEY:4 + (i + 1) * _KEY] for i in range(3))
        return cls(data[2:2 + n], int.from_bytes(body[:4], "big"), digest, share_public, commitments,
                   body[4 + 3 * _KEY:])


def _bundle_message(
    round_id: bytes, site_id: int, params_digest: bytes, share_public: bytes, commitments_digest: bytes,
) -> bytes:
    return encode_context("key-bundle", round_id, site_id, params_digest, share_public, commitments_digest)


def sign_key_bundle(
    identity: SiteIdentity, *, round_id: bytes, site_id: int, params_digest: bytes, share_public: bytes,
    commitments_digest: bytes,
) -> SignedKeyBundle:
    """Sign a round's key bundle (bound to the round's parameter digest) with the identity key."""
    if len(round_id) > _MAX_ROUND_ID:
        raise PayloadError("round id is too long")
    message = _bundle_message(round_id, site_id, params_digest, share_public, commitments_digest)
    signature = identity.private_key.sign(message)
    return SignedKeyBundle(round_id, site_id, params_digest, share_public, commitments_digest, signature)


def verify_key_bundle(
    bundle: SignedKeyBundle, registry: Mapping[int, Ed25519PublicKey], *, round_id: bytes, site_id: int,
    params_digest: bytes, check_keys: bool = True,
) -> None:
    """Check that ``bundle`` is ``site_id``'s, for ``round_id`` and exactly these parameters, signed
    by its registered key.

    Raises :class:`SignatureError` otherwise (wrong round, parameters or site, unknown site, bad
    signature, malformed fields). ``check_keys=False`` skips the X25519 key probe.
    """
    if bundle.round_id != round_id:
        raise SignatureError(f"bundle of site {site_id} is for another round")
    if bundle.params_digest != params_digest:
        raise SignatureError(f"bundle of site {site_id} was signed over other round parameters")
    if bundle.site_id != site_id:
        raise SignatureError(f"bundle relayed as site {site_id} claims site {bundle.site_id}")
    if site_id not in registry:
        raise SignatureError(f"site {site_id} is not in the registry")
    if len(bundle.share_public) != _KEY or len(bundle.commitments_digest) != _KEY:
        raise SignatureError(f"bundle of site {site_id} has malformed fields")
    try:
        registry[site_id].verify(bundle.signature, bundle.signed_message())
    except InvalidSignature as exc:
        raise SignatureError(f"bad signature on the key bundle of site {site_id}") from exc
    if check_keys:
        check_bundle_keys(bundle)


def _share_message(kind: str, params_digest: bytes, dealer: int, holder: int, commitments_digest: bytes,
                   share: bytes) -> bytes:
    return encode_context("dealt-share", kind, params_digest, dealer, holder, commitments_digest, share)


def sign_share(identity: SiteIdentity, kind: str, *, params_digest: bytes, dealer: int, holder: int,
               commitments_digest: bytes, share: bytes) -> bytes:
    """The dealer's signature on one Shamir share (``kind`` "seed" or "key") and on the commitments
    it claims to lie on, so that a holder who returns a different share is caught share by share,
    and a share off those commitments is its dealer's own proof of cheating (common.secagg.proof):
    two deals of one round (a restored session) cannot be mixed to frame an honest dealer."""
    return identity.private_key.sign(_share_message(kind, params_digest, dealer, holder, commitments_digest, share))


def share_signature_ok(public_key: Ed25519PublicKey, signature: bytes, kind: str, *, params_digest: bytes,
                       dealer: int, holder: int, commitments_digest: bytes, share: bytes) -> bool:
    """Whether ``signature`` is the dealer's on this share and these commitments."""
    if not isinstance(signature, bytes) or len(signature) != _SIG:
        return False
    try:
        public_key.verify(signature, _share_message(kind, params_digest, dealer, holder, commitments_digest, share))
    except InvalidSignature:
        return False
    return True


def _survivors_message(params_digest: bytes, survivors: frozenset[int]) -> bytes:
    ordered = sorted(survivors)
    return encode_context("survivors", params_digest, len(ordered), *ordered)


def sign_survivors(identity: SiteIdentity, params_digest: bytes, survivors: frozenset[int]) -> bytes:
    """A site's consistency-round signature on the survivor set (Bonawitz et al. 2017, round 3)."""
    return identity.private_key.sign(_survivors_message(params_digest, survivors))


def survivors_signature_ok(public_key: Ed25519PublicKey, signature: bytes, params_digest: bytes,
                           survivors: frozenset[int]) -> bool:
    """Whether ``signature`` is a valid signature on exactly this survivor set and these parameters."""
    if not isinstance(signature, bytes) or len(signature) != _SIG:
        return False
    try:
        public_key.verify(signature, _survivors_message(params_digest, survivors))
    except InvalidSignature:
        return False
    return True


def check_bundle_keys(bundle: SignedKeyBundle) -> None:
    """Raise :class:`SignatureError` unless the X25519 share key gives a usable (non-zero) secret."""
    x25519_shared_secret(X25519PrivateKey.generate(), bundle.share_public)


def x25519_shared_secret(private_key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The full 32-byte X25519 shared secret; raises :class:`SignatureError` for a bad peer key."""
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # wrong length or a low-order point (all-zero secret)
        raise SignatureError("peer public key is invalid") from exc


def _channel(shared: bytes, round_id: bytes, sender: int, receiver: int) -> tuple[bytes, bytes]:
    """Direction-specific AEAD key and the associated data binding round, sender and receiver."""
    ad = encode_context("share-aead", round_id, sender, receiver)
    return hkdf(shared, ad), ad


def encrypt_for_peer(
    private_key: X25519PrivateKey, peer_public: bytes, *, round_id: bytes, sender: int,
    receiver: int, plaintext: bytes,
) -> bytes:
    """ChaCha20Poly1305 encryption to a peer: ``nonce(12) || ciphertext || tag(16)``."""
    key, ad = _channel(x25519_shared_secret(private_key, peer_public), round_id, sender, receiver)
    nonce = os.urandom(_NONCE)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, ad)


def decrypt_from_peer(
    private_key: X25519PrivateKey, peer_public: bytes, *, round_id: bytes, sender: int,
    receiver: int, ciphertext: bytes,
) -> bytes:
    """Inverse of :func:`encrypt_for_peer`; raises :class:`DecryptionError` on any tampering."""
    if len(ciphertext) < _NONCE + 16:
        raise DecryptionError("ciphertext is truncated")
    key, ad = _channel(x25519_shared_secret(private_key, peer_public), round_id, sender, receiver)
    try:
        return ChaCha20Poly1305(key).decrypt(ciphertext[:_NONCE], ciphertext[_NONCE:], ad)
    except InvalidTag as exc:
        raise DecryptionError(f"share ciphertext from site {sender} failed authentication") from exc
