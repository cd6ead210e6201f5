"""Integration: the real round loop (server.federation) and the real ClientApp handlers (client.app), with
real DP-SGD on MiniLM, real secure aggregation and the sites' real ledgers, joined by an in-process Grid
instead of Flower's engine (which tests/test_simulation_e2e.py and tests/test_deployment.py run).

3 sites of real drug reviews (16 tokens each), set up as ``fedtune simulate`` sets them up.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from client.policy import POLICY_FILE, SitePolicy, write_policy
from common.audit import verified_entries
from common.config import RunSettings
from common.records import FAILURE_MESSAGES, pack_stage, unpack_stage
from common.run_files import MetricsLine, read_metrics, read_privacy
from common.secagg import Deal
from common.secagg.dleq import prove_key
from common.secagg.group import exp_g
from fedtune.cli import default_run_config, simulated_passport_key, simulated_registry, simulated_site_policies
from server.federation import FederationFailed, run_federation
from tests.conftest import write_csv
from tests.grid import InstantGrid

pytestmark = pytest.mark.model
SITES, LABELS = 3, "negative,neutral,positive"
RUN_IDS = itertools.count(11)  # each run its own id, as Flower gives every submitted run


class InProcessGrid(InstantGrid):
    """Every message answered at once by a site's real ClientApp, in its own Flower Context."""

    def __init__(self, run_config: dict, run_id: int, sites: int = SITES, cheat: int | None = None) -> None:
        super().__init__([100 + i for i in range(sites)], run_id)
        self.contexts = {node: Context(run_id=run_id, node_id=node, state=RecordDict(), run_config=run_config,
                                       node_config={"partition-id": node - 100, "num-partitions": sites})
                         for node in self.nodes}
        self.out, self.cheat = Path(run_config["out-dir"]), cheat
        self.committed: tuple[int, bytes, int] | None = None

    def answer(self, message: Message) -> Message:
        reply = client_app(message=message, context=self.contexts[message.metadata.dst_node_id])
        if self.cheat is None or message.metadata.dst_node_id != 100 + self.cheat:
            return reply
        if message.metadata.message_type == "train":
            self.committed = deal_off_commitments(self.out / "sites" / f"site-{self.cheat}")
        elif message.metadata.message_type == "train.secagg_share" and self.committed is not None:
            # As a hostile site would, it still proves it knows the key it committed to (else it is
            # dropped when it deals, unproven, and never kept out).
            key, digest, site = self.committed
            round_id, blobs = unpack_stage(reply.content)
            deal = Deal.from_bytes(blobs["payload"])
            deal = dataclasses.replace(deal, key_proof=prove_key(key, exp_g(key), digest, site))
            reply = Message(pack_stage(round_id, {"payload": deal.to_bytes()}), reply_to=message)
        return reply


def deal_off_commitments(state_dir: Path) -> tuple[int, bytes, int] | None:
    """The site's round session, just advertised, deals signed shares of another mask key than the one
    its signed commitments fix (issue 19, finding 5: shares that do not open its key). Returns the
    committed key, the params digest and the site id, which its key proof needs."""
    committed = None
    for path in state_dir.rglob("secagg-sessions/*.json"):
        record = json.loads(path.read_text())
        session = json.loads(record["session"])
        if session["stage"] == 1:
            key = int(session["secrets"]["key"], 16)
            committed = key, bytes.fromhex(session["params_digest"]), session["site_id"]
            session["secrets"]["key"] = hex(key + 1)
            record["session"] = json.dumps(session)
            path.write_text(json.dumps(record))
    return committed


@pytest.fixture(scope="module")
def data(tmp_path_factory, drug_reviews) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inprocess")
    return {"train": write_csv(root / "train.csv", drug_reviews[:60]),
            "test": write_csv(root / "test.csv", drug_reviews[500:530])}


def federate(out: Path, data: dict[str, Path], *, rounds: int, secure: bool = True,
             sites: int = SITES, cheat: int | None = None, resume_from: str = "", grid: type | None = None,
             audit_canaries: int = 0, policy: dict | None = None, **overrides) -> Path:
    """One run into ``out``, set up as ``fedtune simulate`` does (keys, site policies, passport key).
    ``cheat``: that site deals key shares off its commitments in every round it is in. ``grid``: an
    InProcessGrid subclass (one that records what the coordinator receives); ``policy``: site-policy settings
    every site's policy file then gets; ``overrides``: run-config keys."""
    simulated_site_policies(out, sites, task="classification", labels=LABELS, model="", dp=True, secure=secure,
                            epsilon=8.0, unit="record", audit_canaries=audit_canaries,
                            eval_epsilon=overrides.get("federation.eval-epsilon", 1.0),
                            dp_mode=overrides.get("privacy.dp-mode", "local"))
    for site in range(sites) if policy else ():
        path = out / "sites" / f"site-{site}" / POLICY_FILE
        write_policy(path.parent, SitePolicy.from_mapping(json.loads(path.read_text()) | policy, str(path)))
    run_config = default_run_config() | {
        "out-dir": str(out), "passport-key": str(simulated_passport_key(out)), "resume-from": resume_from,
        "secagg.registry": str(simulated_registry(out, sites)) if secure else "",
        "federation.secure-aggregation": secure, "federation.rounds": rounds, "federation.sites": sites,
        "data.source": str(data["train"]), "data.test-source": str(data["test"]), "data.labels": LABELS,
        "data.partition": "iid", "data.max-length": 16, "train.local-epochs": 1, "train.batch-size": 8,
        "task": "classification", "model-path": "", "privacy.accountant": "rdp",  # plans σ fast (PRV: own tests)
    } | overrides
    run_id = next(RUN_IDS)
    with pytest.MonkeyPatch.context() as patch:  # what a Flower task process knows of itself (messages are made in one)
        patch.setattr(TaskIdentity, "_run_id", run_id)
        patch.setattr(TaskIdentity, "_node_id", 1)
        patch.setattr(TaskIdentity, "_task_id", 1)
        return run_federation((grid or InProcessGrid)(run_config, run_id, sites, cheat),
                              RunSettings.from_flat(run_config))


def metrics(out: Path) -> list[MetricsLine]:
    return read_metrics(out)


def epsilons(out: Path) -> dict[str, float]:
    return {site: report.epsilon for site, report in read_privacy(out).sites.items()}


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("secure")
    federate(out, data, rounds=2, audit_canaries=50)  # every site audits its privacy too
    return out


def test_a_secure_dp_round_loop_runs_through_the_real_client_app(secure_run: Path) -> None:
    lines = metrics(secure_run)
    assert [line.round for line in lines] == [0, 1, 2]
    for line in lines[1:]:
        assert line.contributors == 3 and line.model_updated and line.failures == ()
        assert line.secure_aggregation.survivors == ["site-0", "site-1", "site-2"]
        assert set(line.secure_aggregation.exchange_seconds) >= {"train", "share", "mask", "confirm", "unmask"}
    assert all(0 < eps <= 8.0 for eps in epsilons(secure_run).values())
    assert (secure_run / "final" / "adapter" / "passport.json").is_file()
    # Round 2's request carried each site's signed receipt of its round-1 charge, kept beside its state dir.
    for site in ("site-0", "site-1", "site-2"):
        kept = [json.loads(p.read_text()) for p in (secure_run / "sites" / f"{site}.receipts").iterdir()]
        assert [(r["receipt"]["site"], r["receipt"]["round"]) for r in kept] == [(site, 1)]


def test_each_site_audits_its_privacy_from_the_global_adapters_and_reports_it(secure_run: Path) -> None:
    """Sites with --audit-canaries: each keeps its canaries to itself, audits the adapters it received and sends the
    bound (synthetic counts only) with its ε; `fedtune audit` prints it from the site's state dir."""
    from common.privacy_audit import read_audit_result
    from fedtune.cli import main

    out = secure_run
    passport = json.loads((out / "final" / "adapter" / "passport.json").read_text())["passport"]
    assert sorted(passport["privacy_audit"]) == [f"site-{i}" for i in range(SITES)]
    for site, report in read_privacy(out).sites.items():
        state = out / "sites" / site
        result = read_audit_result(state)
        assert (report.audit_canaries, report.audit_guesses, report.audit_correct) == (
            50, result.guesses, result.correct)
        assert report.audited_epsilon == result.epsilon <= report.epsilon  # DP on: the audit stays below
        assert result.rounds == 1 and result.epsilon_accounted is not None  # round 2's adapter against round 1's
        assert passport["privacy_audit"][site] == report.released_audit()
        canaries = json.loads(next((state / "privacy-audit").glob("run-*.json")).read_text())
        assert len(canaries["canaries"]) == 50 and sorted(canaries["observed"]) == ["1", "2"]
        assert main(["audit", str(state)]) == 0


def test_secure_aggregation_costs_the_model_nothing_measurable(secure_run: Path) -> None:
    """Each run draws its own DP noise; what secure aggregation adds is quantisation, whose proven per-element
    bound must be negligible next to how far training moves the adapter. (That the secure sum equals the
    plain mean exactly is pinned in tests/test_secagg_flower.py.)"""
    from safetensors.numpy import load_file

    final = load_file(secure_run / "final" / "adapter" / "adapter_model.safetensors")
    initial = load_file(secure_run / "checkpoints" / "round-0000" / "adapter_model.safetensors")
    moved = max(float(np.abs(final[k] - initial[k]).max()) for k in final)
    bound = sum(line.secure_aggregation.error_bound for line in metrics(secure_run)[1:])
    assert 0 < bound < 0.01 * moved, (bound, moved)


def test_an_update_already_in_a_secure_sum_is_not_resent_and_spent_ledgers_refuse(secure_run: Path, data) -> None:
    """Under secure aggregation the sites' round-1 uploads already entered a sum, so resending them into a
    new one would let the server subtract sums: the sites train afresh instead, which their spent
    ledgers refuse, every one of them, with a kind and a fixed message."""
    ledgers = {path: path.read_bytes() for path in (secure_run / "sites").glob("site-*/privacy-ledger.json")}
    with pytest.raises(FederationFailed, match=r"budget-exhausted.*never reset.*a new --out"):
        federate(secure_run, data, rounds=1)
    line = metrics(secure_run)[-1]
    assert line.model_updated is False and line.contributors == 0
    refusals = [failure for failure in line.failures if failure.kind == "budget-exhausted"]
    assert sorted(failure.site for failure in refusals) == ["site-0", "site-1", "site-2"], line.failures
    assert all(failure.detail == FAILURE_MESSAGES["budget-exhausted"] for failure in refusals)
    assert len(ledgers) == 3 and all(path.read_bytes() == saved for path, saved in ledgers.items())


def test_a_repeated_round_is_resent_for_no_new_epsilon(tmp_path: Path, data) -> None:
    """Re-running round 1 (as after a coordinator crash) sends the sites an adapter they already answered.
    Plain aggregation: they resend their sealed updates and nobody's ε moves."""
    federate(tmp_path, data, rounds=1, secure=False)
    spent = epsilons(tmp_path)
    federate(tmp_path, data, rounds=1, secure=False)
    line = metrics(tmp_path)[-1]
    assert line.round == 1 and line.model_updated is True and line.contributors == 3
    assert epsilons(tmp_path) == spent and all(0 < eps <= 8.0 for eps in spent.values())


def test_a_cheating_site_is_dropped_named_in_the_audit_log_and_kept_out_across_a_resume(tmp_path: Path, data) -> None:
    """Issue 19, finding 5: site-3 deals mask-key shares that do not open its key. Before: every round it
    was in ended at unmask (RoundAborted), round after round. Now its round goes on without it, it is
    named with its proof in the coordinator's audit log, and no later round invites it, after a resume too."""
    federate(tmp_path, data, rounds=2, sites=4, cheat=3)
    lines = metrics(tmp_path)
    for line in lines[1:]:
        assert line.model_updated and line.contributors == 3
        assert line.secure_aggregation.survivors == ["site-0", "site-1", "site-2"]
    assert {"cheated", "protocol"} <= {f.kind for f in lines[1].failures if f.site == "site-3"}
    assert [f.kind for f in lines[2].failures if f.site == "site-3"] == ["kept-out"]
    events = verified_entries(tmp_path / "audit.jsonl")
    (named,) = [e for e in events if e["event"] == "site-kept-out"]
    assert named["site"] == "site-3" and named["round"] == 1 and named["proof"]["kind"] == "key"
    # A resumed run remembers it (the honest sites spent their budget in rounds 1-2 and refuse round 3;
    # site-3 is not even asked).
    federate(tmp_path, data, rounds=3, sites=4, resume_from=str(tmp_path / "checkpoints" / "round-0002"))
    line = metrics(tmp_path)[-1]
    assert line.round == 3 and {f.site: f.kind for f in line.failures} == {
        "site-0": "budget-exhausted", "site-1": "budget-exhausted", "site-2": "budget-exhausted",
        "site-3": "kept-out", "*": "round-aborted"}, line.failures


