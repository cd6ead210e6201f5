"""Model passports: a signed statement of what a global adapter is and how it was made.

The coordinator signs one ``passport.json`` beside every global adapter it publishes. It binds
the adapter's weights (sha256 of ``adapter_model.safetensors``) and PEFT config to the base model
they belong to, the round, the number of contributing sites and each site's reported ε. Anyone
holding the federation's ``passport-signing.pub`` (every startup kit has it) can check that an
adapter is the federation's, unmodified, before deploying it.

File layout::

    {"passport": {...}, "signature": "<hex Ed25519 over canonical JSON>", "key_id": "<sha256 hex>"}

The signature covers the canonical JSON of ``passport`` (sorted keys, compact separators, UTF-8);
``key_id`` is the sha256 of the raw signing public key, so a wrong key is named as such.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.files import file_sha256, write_json

PASSPORT_FILE = "passport.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PASSPORT_FORMAT = "fedtune-passport/1"
PASSPORT_PUB = "passport-signing.pub"
"""The verification key's file name, in every kit (it also checks the coordinator's receipts: common/receipts.py)."""
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_SIGNATURE_HEX = re.compile(r"^[0-9a-f]{128}$")


class PassportError(ValueError):
    """A passport is missing, malformed, signed by another key, or does not match its adapter."""


# ----------------------------------------------------------------------------- keys

def signing_key_pem(key: Ed25519PrivateKey) -> bytes:
    """PKCS#8 PEM of a passport signing key (unencrypted: the file itself must be 0600)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM of a passport verification key."""
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The coordinator's Ed25519 passport signing key from a PKCS#8 PEM file."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise PassportError(f"passport signing key {path} is unreadable ({exc}); "
                            "use the server kit's passport-signing.key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise PassportError(f"passport signing key {path} is not an Ed25519 key; "
                            "use the server kit's passport-signing.key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A passport verification key from a PEM file (``passport-signing.pub`` in every kit)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise PassportError(f"passport public key {path} is unreadable ({exc}); "
                            "use passport-signing.pub from your startup kit") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise PassportError(f"passport public key {path} is not an Ed25519 key; "
                            "use passport-signing.pub from your startup kit")
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    """sha256 hex of the raw 32-byte public key: names the key that signed a passport."""
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()


# ----------------------------------------------------------------------------- passports

def canonical_json(passport: dict[str, Any]) -> bytes:
    """The exact bytes that are signed: sorted keys, compact separators, UTF-8, no NaN."""
    try:
        text = json.dumps(passport, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PassportError(f"passport is not plain JSON ({exc})") from exc
    return text.encode("utf-8")


def build_passport(adapter_dir: Path, *, base_model_sha256: str, server_round: int, contributors: int,
                   epsilon: dict[str, float | None], fedtune_version: str,
                   privacy_unit: str = "record", audit: dict[str, dict[str, Any]] | None = None,
                   selection: dict[str, Any] | None = None,
                   own_noise_epsilon: dict[str, float | None] | None = None) -> dict[str, Any]:
    """Describe the adapter in ``adapter_dir`` (PEFT files) for signing.

    Parameters
    ----------
    adapter_dir
        Directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.
    base_model_sha256
        Hash of the base weights (``common.model.base_model_sha256``).
    server_round
        Round that produced the adapter (0 = the initial adapter).
    contributors
        Number of sites whose updates were aggregated into it.
    epsilon
        Each site's reported ε spent so far; ``None`` for a site that trained without DP.
    fedtune_version
        ``fedtune.__version__`` of the coordinator.
    privacy_unit
        Whom each ε protects: "record", or the column naming a person ("patient_id").
    audit
        Each auditing site's privacy audit, as it reported it (``common.privacy_audit.AuditResult.report``: the
        audited lower bound on ε at 95 % and its canary counts); sites without one are absent.
    selection
        How this checkpoint was chosen as the run's final adapter (``server.selection.Selection.passport_entry``),
        when it was chosen on the federated evaluation rather than being the last round's.
    own_noise_epsilon
        Distributed DP: each site's ε of its own noise share alone (what is left if secure aggregation or its
        assumption of honest sites fails; ``epsilon`` is against the coordinator); absent in local DP.
    """
    adapter_dir = Path(adapter_dir)
    if not _SHA256_HEX.fullmatch(str(base_model_sha256)):
        raise PassportError(f"base_model_sha256 must be 64 lowercase hex digits, got {base_model_sha256!r}")
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
        raise PassportError(f"server_round must be an integer >= 0, got {server_round!r}")
    # Round 0 is the initial adapter (no site contributed); --select-round best publishes it when it scored best.
    least = 1 if server_round else 0
    if isinstance(contributors, bool) or not isinstance(contributors, int) or contributors < least:
        raise PassportError(f"contributors must be an integer >= {least} in round {server_round}, got {contributors!r}")
    return {
        **({"privacy_audit": _checked_audit(audit)} if audit else {}),
        **({"selection": dict(selection)} if selection else {}),
        **({"own_noise_epsilon": _checked_epsilon(own_noise_epsilon)} if own_noise_epsilon else {}),
        "format": PASSPORT_FORMAT,
        "base_model_sha256": base_model_sha256,
        "adapter_config": _read_adapter_config(adapter_dir),
        "adapter_sha256": _adapter_sha256(adapter_dir),
        "server_round": server_round,
        "contributors": contributors,
        "epsilon": _checked_epsilon(epsilon),
        "privacy_unit": str(privacy_unit),
        "fedtune_version": str(fedtune_version),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def sign_passport(adapter_dir: Path, passport: dict[str, Any], signing_key: Ed25519PrivateKey) -> Path:
    """Sign ``passport`` and write it to ``adapter_dir/passport.json`` (atomically); its path.

    Refuses a passport whose checksum is not the adapter file's: a passport is only ever signed
    for the weights that lie beside it.
    """
    adapter_dir = Path(adapter_dir)
    if passport.get("adapter_sha256") != _adapter_sha256(adapter_dir):
        raise PassportError(f"refusing to sign: the passport's adapter_sha256 is not that of "
                            f"{adapter_dir / ADAPTER_WEIGHTS}; build the passport from this adapter")
    document = {
        "passport": passport,
        "signature": signing_key.sign(canonical_json(passport)).hex(),
        "key_id": key_id(signing_key.public_key()),
    }
    path = adapter_dir / PASSPORT_FILE
    write_json(path, document, mode=0o644)
    return path


def verify_passport(adapter_dir: Path, public_key: Ed25519PublicKey) -> dict[str, Any]:
    """The adapter's passport, once its signature, key, checksum and config all check out.

    Raises
    ------
    PassportError
        Saying which check failed: missing file, wrong key (``key_id`` mismatch), bad signature
        (the passport was tampered with), adapter file changed, adapter config changed.
    """
    adapter_dir = Path(adapter_dir)
    if not isinstance(public_key, Ed25519PublicKey):
        raise PassportError("passport verification key must be an Ed25519 public key (passport-signing.pub)")
    passport, signature, signer = _read_passport_file(adapter_dir / PASSPORT_FILE)
    expected = key_id(public_key)
    if signer != expected:
        raise PassportError(f"wrong key: {adapter_dir / PASSPORT_FILE} was signed by key {signer[:16]}…, "
                            f"not by the given key {expected[:16]}…; use the federation's passport-signing.pub")
    try:
        public_key.verify(signature, canonical_json(passport))
    except InvalidSignature:
        raise PassportError(f"bad signature: {adapter_dir / PASSPORT_FILE} was altered after signing "
                            "(tampered passport); do not use this adapter") from None
    if passport.get("format") != PASSPORT_FORMAT:
        raise PassportError(f"{adapter_dir / PASSPORT_FILE} has format {passport.get('format')!r}; this fedtune "
                            f"reads {PASSPORT_FORMAT!r} (upgrade fedtune)")
    actual = _adapter_sha256(adapter_dir)
    if passport.get("adapter_sha256") != actual:
        raise PassportError(f"adapter file changed: {adapter_dir / ADAPTER_WEIGHTS} has sha256 {actual[:16]}…, "
                            f"the signed passport says {str(passport.get('adapter_sha256'))[:16]}…")
    if passport.get("adapter_config") != _read_adapter_config(adapter_dir):
        raise PassportError(f"adapter config changed: {adapter_dir / ADAPTER_CONFIG} differs from "
                            "the config in the signed passport")
    return passport


# ----------------------------------------------------------------------------- helpers

def _read_passport_file(path: Path) -> tuple[dict[str, Any], bytes, str]:
    if not path.is_file():
        raise PassportError(f"missing file: {path} does not exist; this adapter has no signed passport")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        passport, signature, signer = document["passport"], document["signature"], document["key_id"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PassportError(f"{path} is malformed ({exc!r}); tampered passport or a truncated copy") from exc
    if not isinstance(passport, dict) or not isinstance(signer, str) or not isinstance(signature, str) \
            or not _SIGNATURE_HEX.fullmatch(signature):
        raise PassportError(f"{path} is malformed (passport, signature or key_id has the wrong type); "
                            "tampered passport or a truncated copy")
    return passport, bytes.fromhex(signature), signer


def _read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise PassportError(f"missing file: {path} does not exist; is {adapter_dir} a PEFT adapter directory?")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PassportError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise PassportError(f"{path} does not hold a JSON object")
    return config


def _adapter_sha256(adapter_dir: Path) -> str:
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.is_file():
        raise PassportError(f"missing file: {path} does not exist; is {adapter_dir} a PEFT adapter directory?")
    return file_sha256(path)


def _checked_epsilon(epsilon: dict[str, float | None]) -> dict[str, float | None]:
    checked: dict[str, float | None] = {}
    for site, value in epsilon.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise PassportError(f"ε of site {site!r} must be a finite number >= 0 or None, got {value!r}")
        checked[str(site)] = None if value is None else float(value)
    return checked


def _checked_audit(audit: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    checked = {}
    for site, released in audit.items():
        epsilon = released.get("audited_epsilon")
        counts = [released.get(key) for key in ("audit_canaries", "audit_guesses", "audit_correct")]
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not math.isfinite(epsilon) \
                or epsilon < 0 or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise PassportError(f"the privacy audit of site {site!r} must be a finite ε >= 0 and three counts, "
                                f"got {released!r}")
        checked[str(site)] = {"audited_epsilon": float(epsilon), "audit_canaries": counts[0],
                              "audit_guesses": counts[1], "audit_correct": counts[2]}
    return checked
