"""A ledger that cannot be rolled back unnoticed: before every train, the site checks that its ledger
accounts for all the training its state and the coordinator's receipts show.

The ledger is bound to the site's audit log (client/privacy.py), so restoring the ledger alone is
refused; restoring both from an older backup, or wiping both, is consistent in itself. What remains
then is evidence elsewhere:

- in the state directory: the records of sealed releases (``released/``), the secure-aggregation
  sessions (``secagg-sessions/``, each naming the release it masks) and the audit log's ``released``
  events, each naming a (run, round) and the ε after its charge;
- outside it: the coordinator's signed receipts of each charge (common/receipts.py), kept by the site
  in its receipts directory (``<state>/../<state-name>.receipts`` unless the daemon's ``--receipts``
  says otherwise). A receipt is kept only once its signature checks against the kit's
  ``passport-signing.pub``; a forged one is ignored and logged.

A (run, round) the ledger never charged, or more ε than it shows, means the ledger was rolled back:
the site refuses to train (LedgerError) until the newest backup of the whole state directory is back.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from client.privacy import EPSILON_SLACK, LedgerError, PrivacyLedger
from client.release import ReleasedUpdates
from client.secure import SESSIONS_DIR
from common.audit import verified_entries
from common.files import private_dir, write_json
from common.passport import PassportError, load_public_key
from common.receipts import ReceiptError, receipt_from_json, receipt_to_json, verify_receipt
from common.records import SignedReceipt

log = logging.getLogger("fedtune.client")
RELEASED_EVENT = "released"
_RELEASE_ROUND = re.compile(r"round-([0-9]{6})-")


@dataclass(frozen=True)
class Spend:
    """Evidence that the site trained: where it was found, the round (and run, when known) it was charged for,
    and the ε after that charge (when known)."""

    source: str
    round: int
    run_id: int | None = None
    epsilon: float | None = None


class ReceiptStore:
    """The coordinator's receipts of this site's charges, one file per (run, round), owner-only."""

    def __init__(self, directory: Path, site: str, passport_key: Path | None) -> None:
        self.directory, self.site, self.passport_key = directory, site, passport_key

    def _key(self):
        if self.passport_key is None or not self.passport_key.is_file():
            return None
        try:
            return load_public_key(self.passport_key)
        except PassportError as exc:
            log.warning("the coordinator's receipts cannot be checked: %s", exc)
            return None

    def keep(self, signed: SignedReceipt | None) -> None:
        """Store a receipt whose signature checks; ignore (and log) any other: the coordinator can only
        withhold receipts."""
        if signed is None:
            return
        key = self._key()
        try:
            if key is None:
                raise ReceiptError(f"no passport-signing.pub to check it against ({self.passport_key})")
            receipt = verify_receipt(key, signed, self.site)
        except ReceiptError as exc:
            log.warning("%s: the coordinator's receipt for run %d, round %d is ignored: %s", self.site,
                        signed.receipt.run_id, signed.receipt.round, exc)
            return
        write_json(private_dir(self.directory) / f"run-{receipt.run_id}-round-{receipt.round:06d}.json",
                   receipt_to_json(signed))

    def spends(self) -> list[Spend]:
        """Every kept receipt whose signature still checks (another file is ignored, and logged)."""
        files = sorted(self.directory.glob("run-*-round-*.json")) if self.directory.is_dir() else []
        if not files:
            return []
        private_dir(self.directory)
        key = self._key()
        if key is None:
            raise LedgerError(f"the coordinator's receipts in {self.directory} cannot be checked: the kit's "
                              f"passport-signing.pub ({self.passport_key}) is missing or unreadable; restore the kit")
        found = []
        for path in files:
            try:
                receipt = verify_receipt(key, receipt_from_json(json.loads(path.read_text())), self.site)
            except (OSError, ValueError) as exc:  # ReceiptError is a ValueError
                log.warning("receipt %s is ignored: %s", path, exc)
                continue
            found.append(Spend(f"the coordinator's receipt {path}", receipt.round, receipt.run_id, receipt.epsilon))
        return found


def state_spends(state_dir: Path) -> list[Spend]:
    """The training the site's state directory shows, besides its ledger."""
    released = ReleasedUpdates(state_dir)
    records = released.records()
    found = [Spend(f"sealed release {released.directory / r.name}.json", r.round, r.run_id, r.epsilon)
             for r in records if r.epsilon is not None]  # a release without DP charged nothing
    recorded = {r.name for r in records}
    for path in sorted((state_dir / SESSIONS_DIR).glob("*.json")):
        try:
            release = json.loads(path.read_text()).get("release")
        except (OSError, ValueError, AttributeError):
            continue
        match = _RELEASE_ROUND.match(release) if isinstance(release, str) else None
        if match and release not in recorded:  # its release's record is gone: the session still shows the round
            found.append(Spend(f"secure-aggregation session {path}", int(match.group(1))))
    audit = state_dir / "audit.jsonl"
    if audit.exists():
        for entry in verified_entries(audit):  # PrivacyLedger has verified the chain
            if entry.get("event") == RELEASED_EVENT and entry.get("epsilon") is not None:
                found.append(Spend(f"the audit log's released event of {entry.get('time')}", int(entry["round"]),
                                   int(entry["run_id"]), float(entry["epsilon"])))
    return found


def check_not_rolled_back(ledger: PrivacyLedger, state_dir: Path, receipts: ReceiptStore) -> None:
    """LedgerError naming what the ledger does not account for, and how to repair it."""
    charged = {(entry.run_id, entry.round) for entry in ledger.rounds}
    rounds = {entry.round for entry in ledger.rounds}
    reported = ledger.report()["epsilon"]
    problems = []
    for spend in [*state_spends(state_dir), *receipts.spends()]:
        if (spend.run_id, spend.round) not in charged if spend.run_id is not None else spend.round not in rounds:
            run = f"run {spend.run_id}, " if spend.run_id is not None else ""
            problems.append(f"{spend.source} shows {run}round {spend.round}, which the ledger never charged")
        elif spend.epsilon is not None and spend.epsilon > reported + EPSILON_SLACK:
            problems.append(f"{spend.source} shows ε = {spend.epsilon:g} spent, the ledger only {reported:g}")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise LedgerError(
            f"privacy ledger {ledger.path} does not account for training this site did: {'; '.join(problems[:3])}"
            f"{more}. The ledger and its audit log were rolled back (restored from an older backup, or deleted); "
            f"the site will not train on them. Restore the newest backup of the WHOLE state directory {state_dir} "
            "(ledger, audit.jsonl, released/ and secagg-sessions/ together), one taken after the last round "
            "the coordinator's receipts name; never the ledger alone")
