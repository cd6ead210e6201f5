"""A ledger rolled back consistently, tried from the site operator's side and from the coordinator's.

The ledger is bound to the site's audit log, so restoring the ledger alone was always refused; these
attacks restore (or wipe) the ledger AND its log together. What still shows the training: the site's
sealed releases and secure-aggregation sessions, and the coordinator's signed receipts kept outside
the state directory. The real ClientApp train handler on a deployed site's node config (as
tests/test_site_releases.py drives it), the real ledger, the real round loop and passports.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Message, RecordDict

from common.adapter import trainable_keys
from common.config import RunSettings
from common.passport import public_key_pem
from common.receipts import sign_receipt
from common.records import ChargeReceipt, pack_train_request, unpack_privacy, with_receipt
from common.run_files import read_metrics
from server.ledger_watch import LedgerWatch
from tests.conftest import write_csv
from tests.test_site_releases import call, initial_adapter, node_config, run_config

SITE = "site-a"


@pytest.fixture()
def data(tmp_path: Path, drug_reviews) -> Path:
    return write_csv(tmp_path / "a.csv", drug_reviews[:6])


@pytest.fixture()
def passport_key(tmp_path: Path) -> Ed25519PrivateKey:
    """The coordinator's passport key; its public half in the site's kit, as `fedtune provision` puts it."""
    key = Ed25519PrivateKey.generate()
    kit = tmp_path / SITE / "kit"
    kit.mkdir(parents=True)
    (kit / "passport-signing.pub").write_bytes(public_key_pem(key.public_key()))
    return key


def failure_kind(reply: RecordDict) -> str | None:
    return dict(reply.config_records["failure"])["kind"] if "failure" in reply.config_records else None


def state_of(tmp_path: Path) -> Path:
    return tmp_path / SITE


def ledger_and_log(tmp_path: Path) -> dict[str, bytes]:
    state = state_of(tmp_path)
    return {name: (state / name).read_bytes() for name in ("privacy-ledger.json", "audit.jsonl")}


def restore(tmp_path: Path, backup: dict[str, bytes]) -> None:
    for name, content in backup.items():
        (state_of(tmp_path) / name).write_bytes(content)


def refused_as_rolled_back(reply: RecordDict, caplog: pytest.LogCaptureFixture, *fragments: str) -> None:
    assert failure_kind(reply) == "ledger", dict(reply.config_records.get("privacy", {}))
    refusal = next(r.getMessage() for r in caplog.records if "site refuses train (ledger)" in r.getMessage())
    assert "does not account for training this site did" in refusal and "WHOLE state directory" in refusal
    for fragment in fragments:
        assert fragment in refusal, refusal


# ------------------------------------------------------------------ the site's own state


@pytest.mark.model
@pytest.mark.parametrize("left", ["released and sessions", "sessions only", "released only"])
def test_a_ledger_and_log_restored_together_are_refused_while_releases_or_sessions_remain(
        tmp_path: Path, data: Path, caplog, left: str):
    """Secure rounds 1 and 2 trained; ledger and audit log restored from the backup taken after round 1."""
    from common.federated_eval import plan_evaluation
    from common.registry import create_site_identities, load_registry, pin_members
    from common.secure_update import params_to_bytes, round_params

    names = [SITE, "site-b", "site-c"]
    kit = state_of(tmp_path) / "kit"
    create_site_identities(names, {n: tmp_path / n / "keys" for n in names}, kit / "registry.json")
    members = load_registry(kit / "registry.json").digest
    pin_members(kit / "registry.json", state_of(tmp_path), members.hex())  # the site's officer confirmed them
    config = run_config(tmp_path, **{"federation.secure-aggregation": True, "federation.rounds": 4,
                                     "secagg.registry": str(kit / "registry.json")})
    nodes = node_config(tmp_path, SITE, data, **{"require-secure-aggregation": True})
    settings = RunSettings.from_flat(config)
    state = initial_adapter(config)
    size = sum(state[k].size for k in trainable_keys(state, settings.lora.aggregation))

    def secure_request(server_round: int) -> RecordDict:
        evaluation = plan_evaluation(settings)  # the round's federated-evaluation count slots, as the server offers
        params = round_params(settings.secagg, run_id=7, server_round=server_round, site_ids=[0, 1, 2],
                              vector_length=size, members_digest=members,
                              count_slots=evaluation.slots_in(server_round) if evaluation else 0)
        return pack_train_request(state, server_round, params_to_bytes(params))

    assert failure_kind(call(_train(), secure_request(1), config, nodes)) is None
    backup = ledger_and_log(tmp_path)
    assert failure_kind(call(_train(), secure_request(2), config, nodes)) is None
    restore(tmp_path, backup)  # consistent in itself: the log's tail and the ledger, as they were after round 1
    if left == "sessions only":
        shutil.rmtree(state_of(tmp_path) / "released")
    if left == "released only":
        shutil.rmtree(state_of(tmp_path) / "secagg-sessions")
    caplog.set_level(logging.INFO)
    ledger_before = (state_of(tmp_path) / "privacy-ledger.json").read_bytes()
    reply = call(_train(), secure_request(3), config, nodes)
    refused_as_rolled_back(reply, caplog, "round 2, which the ledger never charged",
                           "secure-aggregation session" if left == "sessions only" else "sealed release")
    assert (state_of(tmp_path) / "privacy-ledger.json").read_bytes() == ledger_before  # nothing charged


def _train():
    from client.app import train

    return train


@pytest.mark.model
def test_a_wiped_ledger_and_log_are_refused_while_released_remains(tmp_path: Path, data: Path, caplog):
    config = run_config(tmp_path)
    nodes = node_config(tmp_path, SITE, data)
    state = initial_adapter(config)
    for server_round in (1, 2):
        assert failure_kind(call(_train(), pack_train_request(state, server_round), config, nodes)) is None
    for name in ("privacy-ledger.json", "audit.jsonl"):
        (state_of(tmp_path) / name).unlink()  # "a fresh start": the ledger would open at ε = 0
    caplog.set_level(logging.INFO)
    reply = call(_train(), pack_train_request(state, 3), config, nodes)
    refused_as_rolled_back(reply, caplog, "run 7, round 1, which the ledger never charged")
    assert not (state_of(tmp_path) / "privacy-ledger.json").exists()


@pytest.mark.model
def test_a_lowered_ledger_with_a_forged_audit_line_is_refused(tmp_path: Path, data: Path, caplog):
    """The ledger edited to say fewer steps were taken (lower ε), and a charge line forged onto the audit
    log with the edited ledger's sha256 (the chain links: anyone can compute it): the ledger opens, but the
    site's own release records still show the ε it spent."""
    from client.privacy import PrivacyLedger
    from common.audit import AuditLog
    from common.files import file_sha256

    config = run_config(tmp_path)
    nodes = node_config(tmp_path, SITE, data)
    state = initial_adapter(config)
    for server_round in (1, 2):
        assert failure_kind(call(_train(), pack_train_request(state, server_round), config, nodes)) is None
    ledger_path = state_of(tmp_path) / "privacy-ledger.json"
    saved = json.loads(ledger_path.read_text())
    saved["history"] = [[sigma, q, steps // 2] for sigma, q, steps in saved["history"]]
    ledger_path.write_text(json.dumps(saved))
    AuditLog(state_of(tmp_path) / "audit.jsonl").record("privacy-charged", ledger=ledger_path.name,
                                                         ledger_sha256=file_sha256(ledger_path))
    lowered = PrivacyLedger(ledger_path, RunSettings.from_flat(config).privacy)  # the forgery holds up
    caplog.set_level(logging.INFO)
    reply = call(_train(), pack_train_request(state, 3), config, nodes)
    refused_as_rolled_back(reply, caplog, f"the ledger only {lowered.report()['epsilon']:g}")


# ------------------------------------------------------------------ the coordinator's receipts


def _coordinator(tmp_path: Path, key: Ed25519PrivateKey) -> LedgerWatch:
    """The coordinator's side of the receipts, as the round loop keeps them."""
    (tmp_path / "coordinator").mkdir(exist_ok=True)
    return LedgerWatch(tmp_path / "coordinator", key, run_id=7)


def _round(watch: LedgerWatch, state, server_round: int, config: dict, nodes: dict) -> RecordDict:
    """One plain round as the coordinator plays it: the site's latest receipt goes with the request, the
    accepted report is signed into the next one."""
    request = with_receipt(pack_train_request(state, server_round), watch.receipt_for(SITE))
    reply = call(_train(), request, config, nodes)
    if failure_kind(reply) is None:
        report = unpack_privacy(reply)
        assert report is not None and watch.refusal(SITE, report) is None
        watch.record(server_round, {SITE: report})
    return reply


@pytest.mark.model
def test_a_whole_state_dir_restored_from_backup_is_refused_by_the_coordinators_receipt(
        tmp_path: Path, data: Path, passport_key, caplog):
    config = run_config(tmp_path, **{"federation.rounds": 4})
    nodes = node_config(tmp_path, SITE, data)
    watch, state = _coordinator(tmp_path, passport_key), initial_adapter(config)
    assert failure_kind(_round(watch, state, 1, config, nodes)) is None
    backup = tmp_path / "backup"
    shutil.copytree(state_of(tmp_path), backup)  # the WHOLE state dir: ledger, log, released/, all consistent
    for server_round in (2, 3):
        assert failure_kind(_round(watch, state, server_round, config, nodes)) is None
    receipts = tmp_path / f"{SITE}.receipts"  # beside the state dir, not in it
    assert sorted(p.name for p in receipts.iterdir()) == ["run-7-round-000001.json", "run-7-round-000002.json"]
    shutil.rmtree(state_of(tmp_path))
    shutil.copytree(backup, state_of(tmp_path))
    caplog.set_level(logging.INFO)
    reply = call(_train(), pack_train_request(state, 4), config, nodes)  # even with the receipt withheld
    refused_as_rolled_back(reply, caplog, "the coordinator's receipt", "run 7, round 2, which the ledger never "
                                                                       "charged")


@pytest.mark.model
def test_a_forged_or_misaddressed_receipt_is_ignored_and_a_malformed_one_refused(tmp_path: Path, data: Path,
                                                                                 passport_key, caplog):
    config = run_config(tmp_path)
    nodes = node_config(tmp_path, SITE, data)
    state = initial_adapter(config)
    caplog.set_level(logging.INFO)
    claim = ChargeReceipt(7, 1, SITE, 7.9, 1e-5)  # "you spent 7.9 in round 1": the site would refuse to train
    forged = [sign_receipt(Ed25519PrivateKey.generate(), claim),  # another key
              sign_receipt(passport_key, ChargeReceipt(7, 1, "site-b", 7.9, 1e-5))]  # another site's
    for server_round, receipt in enumerate(forged, start=1):
        request = with_receipt(pack_train_request(state, server_round), receipt)
        assert failure_kind(call(_train(), request, config, nodes)) is None  # trained: nothing was kept
    assert not (tmp_path / f"{SITE}.receipts").exists() or not any((tmp_path / f"{SITE}.receipts").iterdir())
    ignored = [r.getMessage() for r in caplog.records if "receipt for run 7, round 1 is ignored" in r.getMessage()]
    assert "not signed by the federation's passport key" in ignored[0] and "not 'site-a'" in ignored[1]
    request = pack_train_request(state, 3)
    request["receipt"] = ConfigRecord({"run-id": 7, "round": -1, "site": SITE, "epsilon": 1.0, "delta": 1e-5,
                                       "signature": b"\0" * 64})
    assert failure_kind(call(_train(), request, config, nodes)) == "protocol"


def test_kept_receipts_are_checked_again_and_without_the_kits_key_the_site_refuses(tmp_path: Path):
    from client.privacy import LedgerError
    from client.rollback import ReceiptStore
    from common.files import write_json
    from common.receipts import receipt_to_json

    key, pub = Ed25519PrivateKey.generate(), tmp_path / "passport-signing.pub"
    pub.write_bytes(public_key_pem(key.public_key()))
    store = ReceiptStore(tmp_path / "receipts", SITE, pub)
    store.keep(sign_receipt(key, ChargeReceipt(7, 1, SITE, 2.0, 1e-5)))
    planted = sign_receipt(Ed25519PrivateKey.generate(), ChargeReceipt(7, 9, SITE, 7.9, 1e-5))
    write_json(tmp_path / "receipts" / "run-7-round-000009.json", receipt_to_json(planted))
    assert [(s.run_id, s.round, s.epsilon) for s in store.spends()] == [(7, 1, 2.0)]  # the planted one is ignored
    pub.unlink()
    with pytest.raises(LedgerError, match="cannot be checked.*passport-signing.pub.*restore the kit"):
        store.spends()


# ------------------------------------------------------------------ the coordinator's view


class HostileSites:
    """Three plain-aggregation sites that answer train requests with a zero update, except ``site-2``, whose
    update is large, and whose reported ε is read from ``epsilon`` per round (its ledger rolled back)."""

    def __init__(self, size: int, epsilon: dict[int, tuple[float, bool]]) -> None:
        self.size, self.epsilon = size, epsilon
        self.requests: list[tuple[str, RecordDict]] = []

    def answer(self, message: Message) -> Message:
        from common.records import PrivacyReport, TrainReply, pack_train_reply, unpack_train_request

        site = f"site-{message.metadata.dst_node_id - 100}"
        self.requests.append((site, message.content))
        _, server_round, _ = unpack_train_request(message.content)
        epsilon, resent = (self.epsilon[server_round] if site == "site-2" else (1.0 * server_round, False))
        update = np.full(self.size, 0.5 if site == "site-2" else 0.0, np.float32)
        report = PrivacyReport(site, True, epsilon, 1e-5, 8.0, "prv", "record", resent)
        return Message(pack_train_reply(TrainReply(update, 10_000, report)), dst_node_id=0, message_type="train")


@pytest.mark.model
def test_the_coordinator_refuses_a_site_whose_epsilon_falls_or_stays_flat_after_training(tmp_path: Path,
                                                                                       drug_reviews):
    """Round 1: site-2 reports 7.995. Round 2: 5.220 (its ledger was restored from a backup). Round 3: 7.995
    again, a trained round that spent nothing. Round 4: 7.995 as the resend of a sealed update (allowed)."""
    from flwr.supercore.task_identity import TaskIdentity
    from safetensors.numpy import load_file

    from common.passport import load_public_key, verify_passport
    from common.receipts import verify_receipt
    from common.records import unpack_receipt
    from fedtune.cli import default_run_config, simulated_passport_key
    from server.federation import run_federation
    from tests.grid import InstantGrid

    out = tmp_path / "coordinator"
    config = default_run_config() | {
        "out-dir": str(out), "passport-key": str(simulated_passport_key(out)),
        "data.labels": "negative,neutral,positive", "data.max-length": 16,
        "data.test-source": str(write_csv(tmp_path / "test.csv", drug_reviews[500:504])),
        "federation.secure-aggregation": False, "federation.rounds": 4, "federation.sites": 3,
        "federation.min-sites": 2, "federation.eval-every": 0}  # these hand-made replies carry no evaluation
    settings = RunSettings.from_flat(config)
    state = initial_adapter(config)
    sites = HostileSites(sum(state[k].size for k in trainable_keys(state, settings.lora.aggregation)),
                         {1: (7.995, False), 2: (5.220, False), 3: (7.995, False), 4: (7.995, True)})

    class Grid(InstantGrid):
        def answer(self, message: Message) -> Message:
            return sites.answer(message)

    with pytest.MonkeyPatch.context() as patch:
        for name in ("_run_id", "_node_id", "_task_id"):
            patch.setattr(TaskIdentity, name, 1)
        run_federation(Grid([100, 101, 102], 7), settings)
    lines = read_metrics(out)
    for line in lines[2:4]:  # rounds 2 and 3: site-2 refused, its update not used
        assert [(f.site, f.kind) for f in line.failures] == [("site-2", "epsilon-rollback")], line
        assert line.contributors == 2 and line.epsilon["site-2"] == 7.995
    assert "fell from 7.995 to 5.22" in lines[2].failures[0].detail
    assert "stayed at 7.995 after a round it trained" in lines[3].failures[0].detail
    assert lines[4].failures == () and lines[4].contributors == 3  # a resend may keep ε flat
    adapters = [load_file(out / "checkpoints" / f"round-{r:04d}" / "adapter_model.safetensors") for r in (1, 2, 3)]
    for later in adapters[1:]:  # the others' updates are zero: site-2's was left out of rounds 2 and 3
        assert all(np.array_equal(adapters[0][k], later[k]) for k in later)
    key = load_public_key(out / "passport-signing.pub")
    for server_round in (2, 3, 4):
        signed = verify_passport(out / "checkpoints" / f"round-{server_round:04d}", key)
        assert signed["epsilon"]["site-2"] == 7.995  # never the fallen 5.22
    refused = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()
               if json.loads(line)["event"] == "privacy-report-refused"]
    assert [(entry["site"], entry["round"]) for entry in refused] == [("site-2", 2), ("site-2", 3)]
    # Each site got its latest receipt, signed with the passport key, with the next request.
    receipts = {(site, unpack_privacy_round(content)): unpack_receipt(content) for site, content in sites.requests}
    got = receipts[("site-0", 2)]
    assert got is not None and verify_receipt(key, got, "site-0") == ChargeReceipt(7, 1, "site-0", 1.0, 1e-5)
    assert receipts[("site-2", 4)].receipt.round == 1  # no receipt for a refused report
    assert receipts[("site-0", 1)] is None


def unpack_privacy_round(content: RecordDict) -> int:
    return int(content.config_records["round"]["server-round"])


def test_the_coordinators_watch_outlives_a_restart_and_a_damaged_one_is_refused(tmp_path: Path):
    from common.config import ConfigError
    from common.records import PrivacyReport

    key = Ed25519PrivateKey.generate()
    watch = LedgerWatch(tmp_path, key, run_id=3)
    watch.record(5, {SITE: PrivacyReport(SITE, True, 7.995, 1e-5)})
    resumed = LedgerWatch(tmp_path, key, run_id=4)  # the coordinator restarted (a resumed run)
    assert "fell from 7.995 to 5.22" in resumed.refusal(SITE, PrivacyReport(SITE, True, 5.22, 1e-5))
    assert resumed.refusal(SITE, PrivacyReport(SITE, True, 7.995, 1e-5, resent=True)) is None
    assert resumed.receipt_for(SITE).receipt == ChargeReceipt(3, 5, SITE, 7.995, 1e-5)
    (tmp_path / "receipts.json").write_text("{")
    with pytest.raises(ConfigError, match="receipts.json is unreadable.*restore it from backup"):
        LedgerWatch(tmp_path, key, run_id=5)
