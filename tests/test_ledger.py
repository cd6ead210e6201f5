"""The ε ledger against the people who would like it lower: deleted, edited, rolled back, raced, crashed."""

import json
import multiprocessing
import os
import stat
import time
from pathlib import Path

import pytest

import client.privacy as privacy
from client.privacy import LedgerError, PrivacyLedger
from common.config import PrivacySettings

BUDGET = PrivacySettings(epsilon=2.0, delta=1e-5, max_grad_norm=0.5)


def _charge(ledger: PrivacyLedger, server_round: int):
    return ledger.charge_round(run_id=7, server_round=server_round, sample_rate=0.25, steps=8, planned_rounds=4)


@pytest.fixture()
def spent(tmp_path: Path) -> Path:
    """A site's ledger after two charged rounds."""
    path = tmp_path / "state" / "privacy-ledger.json"
    _charge(PrivacyLedger(path, BUDGET), 1)
    _charge(PrivacyLedger(path, BUDGET), 2)
    return path


def test_a_deleted_ledger_is_refused_not_restarted_at_zero(spent: Path):
    spent.unlink()
    with pytest.raises(LedgerError, match="was deleted.*2 charge.*will not start again at zero"):
        PrivacyLedger(spent, BUDGET)


def test_an_edited_ledger_is_refused(spent: Path):
    saved = json.loads(spent.read_text())
    saved["history"] = [[sigma, q, 8] for sigma, q, _ in saved["history"]]  # "only one round was spent"
    saved["rounds"] = saved["rounds"][:1]
    spent.write_text(json.dumps(saved))
    with pytest.raises(LedgerError, match="was edited"):
        PrivacyLedger(spent, BUDGET)


def test_a_rolled_back_ledger_is_refused(spent: Path):
    older = spent.read_bytes()
    _charge(PrivacyLedger(spent, BUDGET), 3)
    spent.write_bytes(older)  # a backup from before round 3, byte for byte
    with pytest.raises(LedgerError, match="was edited"):
        PrivacyLedger(spent, BUDGET)


def test_a_ledger_without_its_audit_log_or_with_a_broken_chain_is_refused(spent: Path):
    audit = spent.parent / "audit.jsonl"
    lines = audit.read_bytes().splitlines(keepends=True)
    audit.write_bytes(lines[0])  # the last charge's line removed
    with pytest.raises(LedgerError, match="was edited"):
        PrivacyLedger(spent, BUDGET)
    audit.write_bytes(lines[1])  # the first line removed: the chain breaks
    with pytest.raises(LedgerError, match="audit chain is broken"):
        PrivacyLedger(spent, BUDGET)
    audit.unlink()
    with pytest.raises(LedgerError, match="log is missing"):
        PrivacyLedger(spent, BUDGET)


def test_other_writers_to_the_audit_log_keep_the_chain(spent: Path):
    from common.audit import AuditLog, verify_chain

    stale = AuditLog(spent.parent / "audit.jsonl")  # opened before the next charge, written after it
    _charge(PrivacyLedger(spent, BUDGET), 3)
    stale.record("trained", round=3)
    assert verify_chain(spent.parent / "audit.jsonl") == 4
    assert [entry.round for entry in PrivacyLedger(spent, BUDGET).rounds] == [1, 2, 3]


def _charge_slowly(path: str, server_round: int, barrier) -> None:
    """In a spawned process: open the ledger, wait for the other process, then charge with a slow
    budget check (the window where, without a lock, both would charge on top of the same history)."""
    real = privacy.PrivacyLedger._epsilon
    privacy.PrivacyLedger._epsilon = lambda self, history: (time.sleep(0.3), real(self, history))[1]
    ledger = PrivacyLedger(Path(path), BUDGET)
    barrier.wait()
    _charge(ledger, server_round)


@pytest.mark.process
def test_concurrent_charges_from_two_processes_are_both_kept(tmp_path: Path):
    path = tmp_path / "privacy-ledger.json"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [context.Process(target=_charge_slowly, args=(str(path), r, barrier)) for r in (1, 2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [worker.exitcode for worker in workers] == [0, 0]
    ledger = PrivacyLedger(path, BUDGET)
    assert sorted(entry.round for entry in ledger.rounds) == [1, 2]
    assert ledger.history == [(ledger.plan.noise_multiplier, 0.25, 16)]


def test_a_crash_mid_charge_is_completed_or_never_happened(spent: Path, monkeypatch):
    before = PrivacyLedger(spent, BUDGET).spent()
    # Crash after the new ledger is written, before the audit log records it: no charge (nothing trained).
    monkeypatch.setattr(privacy.AuditLog, "record", lambda *a, **k: (_ for _ in ()).throw(OSError("power cut")))
    with pytest.raises(OSError):
        _charge(PrivacyLedger(spent, BUDGET), 3)
    monkeypatch.undo()
    assert PrivacyLedger(spent, BUDGET).spent() == before
    # Crash after the audit log recorded the charge, before the rename: the charge is completed on reopening.
    monkeypatch.setattr(privacy, "replace_durably", lambda *a: (_ for _ in ()).throw(OSError("power cut")))
    with pytest.raises(OSError):
        _charge(PrivacyLedger(spent, BUDGET), 3)
    monkeypatch.undo()
    reopened = PrivacyLedger(spent, BUDGET)
    assert [entry.round for entry in reopened.rounds] == [1, 2, 3] and reopened.spent() > before
    assert not list(spent.parent.glob("*.pending"))


def test_state_dir_is_0700_and_ledger_audit_lock_0600(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    old = os.umask(0o022)
    try:
        _charge(PrivacyLedger(state / "privacy-ledger.json", BUDGET), 1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    files = sorted(p.name for p in state.iterdir())
    assert files == ["audit.jsonl", "privacy-ledger.json", "privacy-ledger.json.lock"]
    assert all(stat.S_IMODE((state / name).stat().st_mode) == 0o600 for name in files)


def test_report_releases_only_epsilon_delta_budget_accountant(spent: Path):
    ledger = PrivacyLedger(spent, BUDGET)
    report = ledger.report()
    assert set(report) == {"epsilon", "delta", "budget", "accountant"}  # no σ, q, steps, rounds: they pin n
    assert ledger.spent() <= report["epsilon"] <= ledger.spent() + 1e-4
    assert report["epsilon"] == round(report["epsilon"], 4)
    text = json.dumps(report)
    assert str(ledger.plan.noise_multiplier)[:6] not in text and "0.25" not in text


def test_write_json_makes_the_rename_durable(tmp_path: Path, monkeypatch):
    import common.files as files

    synced = []
    monkeypatch.setattr(files, "fsync_dir", synced.append)
    files.write_json(tmp_path / "x.json", {"a": 1})
    assert synced == [tmp_path]


def test_the_size_estimate_is_drawn_once_charged_and_never_redrawn(tmp_path: Path):
    """ñ is a DP release of n: each fresh draw would leak ε_n more (and the mean of many pins n), so it is drawn
    once, logged as a charge, and every later open, round or run (whatever n is then) gets the same ñ."""
    path = tmp_path / "state" / "privacy-ledger.json"
    first = PrivacyLedger(path, BUDGET)
    estimate = first.estimated_units(1_000, run_id=7, server_round=1)
    assert first.spent() == pytest.approx(BUDGET.epsilon / 50)  # ε_n, before any round
    for units in (1_000, 1_001, 5, 10**6):
        assert PrivacyLedger(path, BUDGET).estimated_units(units, run_id=8, server_round=2) == estimate
    audit = [json.loads(line) for line in (path.parent / "audit.jsonl").read_text().splitlines()]
    assert [(entry["event"], entry["round"]) for entry in audit] == [("privacy-charged", 1)]
    assert abs(estimate - 1_000) < 50 * 50  # scale 1/ε_n = 25 units: 100 scales out has probability e^-100
    # The estimate alone binds no budget (the run that drew it may still be refused on its δ or steps) ...
    other = PrivacySettings(epsilon=3.0, delta=1e-6, max_grad_norm=0.5)
    assert PrivacyLedger(path, other).estimated_units(3, run_id=9, server_round=1) == estimate
    # ... the first round does, and ε after it includes ε_n: ε = ε_n + ε_DP-SGD by basic composition.
    ledger = PrivacyLedger(path, BUDGET)
    entry = _charge(ledger, 1)
    dp_sgd = privacy.epsilon_of(BUDGET.accountant, tuple(ledger.history), BUDGET.delta)
    assert entry.epsilon == ledger.spent() == ledger.estimate.epsilon + dp_sgd
    with pytest.raises(LedgerError, match="A budget cannot change silently"):
        PrivacyLedger(path, other)


def test_no_estimate_is_drawn_past_the_budget(spent: Path):
    from client.privacy import BudgetExhausted

    ledger = PrivacyLedger(spent, PrivacySettings(epsilon=2.0, delta=1e-5, max_grad_norm=0.5))
    for server_round in (3, 4):  # spend the rest of the budget planned for 4 rounds
        _charge(ledger, server_round)
    with pytest.raises(BudgetExhausted):
        ledger.estimated_units(100, run_id=7, server_round=5)
    assert PrivacyLedger(spent, BUDGET).estimate is None
