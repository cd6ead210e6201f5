"""The coordinator's signed receipts of the sites' charges: each site's ε anchored outside its own state.

After each round the coordinator signs, with its passport key, what a site that trained reported
(run, round, site, ε, δ) and sends the site that receipt with its next train request. The site checks
the signature against its kit's ``passport-signing.pub``, keeps the receipt outside its state directory
and compares its ledger with every receipt it holds before it trains (client/rollback.py): a ledger
showing less ε than a receipt, or lacking the round one names, was rolled back. The coordinator can
only withhold receipts, which takes from the site nothing it had.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.passport import canonical_json
from common.records import ChargeReceipt, SignedReceipt

RECEIPT_FORMAT = "fedtune-receipt/1"


class ReceiptError(ValueError):
    """A receipt is malformed, for another site, or not signed by the federation's passport key."""


def receipt_bytes(receipt: ChargeReceipt) -> bytes:
    """The exact bytes that are signed: the receipt's canonical JSON, tagged with its format."""
    return canonical_json({"format": RECEIPT_FORMAT, **dataclasses.asdict(receipt)})


def sign_receipt(key: Ed25519PrivateKey, receipt: ChargeReceipt) -> SignedReceipt:
    return SignedReceipt(receipt, key.sign(receipt_bytes(receipt)))


def verify_receipt(public_key: Ed25519PublicKey, signed: SignedReceipt, site: str) -> ChargeReceipt:
    """The receipt, once it names ``site`` and its signature checks against the passport key; ReceiptError else."""
    if signed.receipt.site != site:
        raise ReceiptError(f"the receipt is for site {signed.receipt.site[:100]!r}, not {site!r}")
    try:
        public_key.verify(signed.signature, receipt_bytes(signed.receipt))
    except InvalidSignature:
        raise ReceiptError("the receipt is not signed by the federation's passport key (passport-signing.pub)") \
            from None
    return signed.receipt


def receipt_to_json(signed: SignedReceipt) -> dict[str, Any]:
    return {"receipt": dataclasses.asdict(signed.receipt), "signature": signed.signature.hex()}


def receipt_from_json(document: Any) -> SignedReceipt:
    """A stored receipt; ReceiptError if it is not one (its signature is checked by :func:`verify_receipt`)."""
    try:
        fields = document["receipt"]
        receipt = ChargeReceipt(int(fields["run_id"]), int(fields["round"]), str(fields["site"]),
                                float(fields["epsilon"]), float(fields["delta"]))
        return SignedReceipt(receipt, bytes.fromhex(document["signature"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ReceiptError(f"not a stored receipt ({exc!r})") from exc
