"""What the coordinator keeps of each site's ε: the latest it accepted, and its signed receipt of the charge.

A site's reported ε only grows: after a round it trained (every reply that is not a resend of a
sealed update) it must be higher than the last one accepted, and a resend may keep it flat, never
lower it. A report that falls, or stays flat after training, shows a ledger that was rolled back: the
site's update is not used that round (plain: dropped before averaging; secure: its advertisement is
rejected at stage 1), the site is named in the coordinator's audit log, and the report never enters
``privacy.json``, the metrics or a passport. Accepted reports of trained rounds are signed into
receipts (common/receipts.py), each site's latest sent with its next train request.

Kept in ``receipts.json`` beside the run's audit log, across resumed and repeated runs into the same
directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.config import ConfigError
from common.files import write_json
from common.receipts import ReceiptError, receipt_from_json, receipt_to_json, sign_receipt
from common.records import ChargeReceipt, PrivacyReport, SignedReceipt

log = logging.getLogger("fedtune.server")
RECEIPTS_FILE = "receipts.json"
EPSILON_REFUSED = "epsilon-rollback"
"""The failure kind of a site whose reported ε fell, or stayed flat after a round it trained."""


class LedgerWatch:
    def __init__(self, out_dir: Path, signing_key: Ed25519PrivateKey | None, run_id: int) -> None:
        self.path = out_dir / RECEIPTS_FILE
        self.signing_key, self.run_id = signing_key, run_id
        self.epsilon: dict[str, float] = {}
        """The latest ε accepted from each site."""
        self.receipts: dict[str, SignedReceipt] = {}
        if self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
                self.epsilon = {str(site): float(eps) for site, eps in saved["epsilon"].items()}
                documents = dict(saved["receipts"])
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(f"{self.path} is unreadable ({exc!r}): restore it from backup (each site also "
                                  "keeps its own receipts; deleting it forgets the ε the sites reported)") from exc
            for site, document in documents.items():
                try:
                    self.receipts[site] = receipt_from_json(document)
                except ReceiptError as exc:
                    log.warning("%s: the receipt kept for %s is unreadable (%s); none is sent", self.path, site, exc)

    def refusal(self, site: str, report: PrivacyReport) -> str | None:
        """Why ``site``'s report cannot be accepted (its ε fell, or stayed flat after training), or None."""
        previous = self.epsilon.get(site)
        if not report.dp or report.epsilon is None or previous is None:
            return None
        if report.epsilon < previous:
            return (f"reported ε fell from {previous:g} to {report.epsilon:g}: its privacy ledger was rolled back; "
                    "its update is not used")
        if report.epsilon == previous and not report.resent:
            return (f"reported ε stayed at {previous:g} after a round it trained: its privacy ledger was rolled "
                    "back; its update is not used")
        return None

    def receipt_for(self, site: str | None) -> SignedReceipt | None:
        return self.receipts.get(site) if site is not None else None

    def record(self, server_round: int, reports: dict[str, PrivacyReport]) -> None:
        """Keep the round's accepted reports; sign a receipt for each site that trained (not for a resend, which
        spent nothing this round)."""
        for site, report in reports.items():
            if not report.dp or report.epsilon is None or report.delta is None:
                continue
            self.epsilon[site] = max(report.epsilon, self.epsilon.get(site, 0.0))
            if self.signing_key is not None and not report.resent:
                self.receipts[site] = sign_receipt(self.signing_key, ChargeReceipt(
                    self.run_id, server_round, site, report.epsilon, report.delta))
        saved: dict[str, Any] = {"epsilon": self.epsilon,
                                 "receipts": {site: receipt_to_json(r) for site, r in self.receipts.items()}}
        write_json(self.path, saved)
