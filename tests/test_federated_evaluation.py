"""Federated evaluation at the sites (client.site_eval) and at the coordinator (server.federation): the evaluation
split is drawn once and never trains, evaluations are charged to their own account, a site releases only noisy
counts, and the coordinator sees only masked vectors and their noisy sum, from which it draws a learning curve
without any test data of its own. (The arithmetic: tests/test_federated_eval.py.)"""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import numpy as np
import pytest

from client.policy import PolicyError, SitePolicy
from client.site_eval import SPLIT_FILE, split_for_evaluation, unit_key
from common.config import ConfigError, RunSettings
from common.data import DataError
from common.federated_eval import plan_evaluation
from fedtune.cli import default_run_config
from tests.conftest import write_csv

LABELS = ("negative", "neutral", "positive")


def settings(**overrides) -> RunSettings:
    return RunSettings.from_flat(default_run_config() | {"data.labels": ",".join(LABELS),
                                                         "federation.secure-aggregation": False} | overrides)


def records(n: int, start: int = 0, **columns) -> list[dict[str, str]]:
    return [{"text": f"review {i}", "label": LABELS[i % 3], **{k: v(i) for k, v in columns.items()}}
            for i in range(start, start + n)]


# ------------------------------------------------------------------ the split
def test_the_split_is_drawn_once_kept_across_restarts_and_never_trains(tmp_path: Path) -> None:
    policy, data = SitePolicy(labels=LABELS), records(300)
    train, held_out = split_for_evaluation(data, policy, settings(), tmp_path, "site")
    assert 20 < len(held_out) < 120 and len(train) + len(held_out) == len(data)  # about 0.2 of 300
    assert not {r["text"] for r in train} & {r["text"] for r in held_out}
    stored = tmp_path / SPLIT_FILE
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600 and "review" not in stored.read_text()  # digests only
    again = split_for_evaluation(data, policy, settings(), tmp_path, "site")  # a restart: the same split
    assert again == (train, held_out)
    # Units that appear later get their own draw; the old ones keep their side.
    grown_train, grown_held_out = split_for_evaluation(data + records(100, start=300), policy, settings(), tmp_path,
                                                       "site")
    assert held_out == [r for r in grown_held_out if int(r["text"].split()[1]) < 300]
    assert len(grown_train) + len(grown_held_out) == 400
    # And a site that does not evaluate holds nothing out.
    assert split_for_evaluation(data, SitePolicy(labels=LABELS, eval_fraction=0.0), settings(), tmp_path / "b",
                                "site") == (data, [])


def test_a_person_is_held_out_whole_and_evaluated_on_at_most_max_rows(tmp_path: Path) -> None:
    policy = SitePolicy(labels=LABELS, privacy_unit="column:patient", max_rows_per_unit=5, eval_fraction=0.5)
    data = records(12 * 40, patient=lambda i: f"p{i // 12}")
    train, held_out = split_for_evaluation(data, policy, settings(**{"privacy.unit": "column:patient"}), tmp_path, "s")
    trained, evaluated = {r["patient"] for r in train}, {r["patient"] for r in held_out}
    assert trained and evaluated and not trained & evaluated
    assert len(train) == 12 * len(trained)  # every row of a training person trains
    assert all(sum(r["patient"] == p for r in held_out) == 5 for p in evaluated)  # min(run's 8, site's 5) rows
    assert unit_key(held_out[0], "patient") in json.loads((tmp_path / SPLIT_FILE).read_text())["evaluation"]


def test_a_site_whose_split_drew_no_unit_says_it_cannot_score(tmp_path: Path, caplog) -> None:
    data = records(2)  # a tiny site whose draw (stored, so no chance here) put every unit in training
    (tmp_path / SPLIT_FILE).write_text(json.dumps({"version": 1, "fraction": 0.2, "evaluation": [],
                                                   "training": [unit_key(r, "") for r in data]}))
    with caplog.at_level(logging.WARNING, "fedtune.client"):
        assert split_for_evaluation(data, SitePolicy(labels=LABELS), settings(), tmp_path, "site s") == (data, [])
    assert "site s: the evaluation split drew none of its units (eval-fraction 0.2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, "fedtune.client"):  # a site that chose not to evaluate is not warned
        split_for_evaluation(data, SitePolicy(labels=LABELS, eval_fraction=0.0), settings(), tmp_path / "b", "site s")
    assert caplog.text == ""


def test_a_split_is_fixed_once_drawn(tmp_path: Path) -> None:
    split_for_evaluation(records(20), SitePolicy(labels=LABELS), settings(), tmp_path, "site")
    with pytest.raises(ConfigError, match=r"drawn with eval-fraction=0.2; the policy now says 0.5.*restore"):
        split_for_evaluation(records(20), SitePolicy(labels=LABELS, eval_fraction=0.5), settings(), tmp_path, "site")
    (tmp_path / SPLIT_FILE).write_text("{not json")
    with pytest.raises(ConfigError, match="evaluation split .* is unreadable"):
        split_for_evaluation(records(20), SitePolicy(labels=LABELS), settings(), tmp_path, "site")


def test_eval_data_is_the_sites_own_file_and_shares_no_unit_with_training(tmp_path: Path) -> None:
    own = write_csv(tmp_path / "eval.csv", records(10, start=100))
    policy = SitePolicy(labels=LABELS, eval_data=str(own))
    train, held_out = split_for_evaluation(records(50), policy, settings(), tmp_path, "site")
    assert len(train) == 50 and len(held_out) == 10 and not (tmp_path / SPLIT_FILE).exists()
    with pytest.raises(DataError, match="shares units with the training data"):
        split_for_evaluation(records(120), policy, settings(), tmp_path, "site")
    with pytest.raises(DataError, match="does not exist"):
        split_for_evaluation(records(5), SitePolicy(labels=LABELS, eval_data=str(tmp_path / "absent.csv")),
                             settings(), tmp_path, "site")
    bad = tmp_path / "bad.csv"
    bad.write_text("words,verdict\nfine,good\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['text', 'label'\]"):
        split_for_evaluation(records(5), SitePolicy(labels=LABELS, eval_data=str(bad)), settings(), tmp_path, "s")


@pytest.mark.parametrize(("values", "match"), [
    ({"eval-fraction": 1}, r"eval-fraction must be in \[0, 1\)"),
    ({"eval-fraction": -0.1}, r"eval-fraction must be in \[0, 1\)"),
    ({"max-eval-epsilon": 0}, "max-eval-epsilon must be a positive number"),
])
def test_bad_evaluation_options_of_a_site_say_what_is_wrong(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SitePolicy.from_mapping(values, "node config")


@pytest.mark.parametrize(("overrides", "match"), [
    ({"federation.eval-every": -1}, "federation.eval-every must be >= 0"),
    ({"federation.eval-epsilon": 0.0}, "federation.eval-epsilon must be a positive number"),
    ({"federation.eval-epsilon": 1e-9, "federation.rounds": 100}, "too much to sum"),
])
def test_bad_evaluation_settings_of_a_run_say_what_is_wrong(overrides: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        plan_evaluation(settings(**overrides))


def test_a_run_asking_more_evaluation_epsilon_than_the_site_allows_is_refused() -> None:
    policy = SitePolicy(labels=LABELS, require_secure_aggregation=False, max_eval_epsilon=1.0)
    policy.check(settings(**{"federation.eval-epsilon": 1.0}))
    policy.check(settings(**{"federation.eval-epsilon": 5.0, "federation.eval-every": 0}))  # no evaluation asked
    with pytest.raises(PolicyError, match="ask for ε=2; this site allows at most ε=1"):
        policy.check(settings(**{"federation.eval-epsilon": 2.0}))


# ------------------------------------------------------------------ the ledger
def test_evaluations_are_charged_before_they_are_scored_apart_from_training_and_refused_when_spent(
        tmp_path: Path) -> None:
    from client.privacy import BudgetExhausted, LedgerError, PrivacyLedger

    run = settings(**{"federation.rounds": 3})
    plan = plan_evaluation(run)
    assert plan is not None and plan.evaluations == 3
    ledger = PrivacyLedger(tmp_path / "privacy-ledger.json", run.privacy)
    spent = [ledger.charge_evaluation(run_id=1, server_round=r, rho=plan.rho, budget=plan.epsilon,
                                      delta=plan.delta) for r in (1, 2, 3)]
    assert spent[0] < spent[1] < spent[2] <= plan.epsilon
    with pytest.raises(BudgetExhausted):
        ledger.charge_evaluation(run_id=1, server_round=4, rho=plan.rho, budget=plan.epsilon, delta=plan.delta)
    reopened = PrivacyLedger(tmp_path / "privacy-ledger.json", run.privacy)  # durable, bound to the audit log
    assert reopened.evaluation is not None and reopened.evaluation.rounds == ((1, 1), (1, 2), (1, 3))
    assert reopened.spent() == 0.0  # training's account is untouched: the units are disjoint
    with pytest.raises(LedgerError, match="cannot change silently"):
        reopened.charge_evaluation(run_id=2, server_round=1, rho=plan.rho, budget=2.0, delta=plan.delta)


def test_the_wire_takes_evaluation_counts_only_of_the_rounds_shape() -> None:
    from common.records import PrivacyReport, TrainReply, WireError, pack_train_reply, unpack_train_reply

    def reply(counts: tuple[int, ...]):
        return pack_train_reply(TrainReply(np.zeros(4, np.float32), 10, PrivacyReport("s", True), counts))

    assert unpack_train_reply(reply((1, 2, 3)), 4, 10, 3, 100).evaluation == (1, 2, 3)
    assert unpack_train_reply(reply(()), 4, 10).evaluation == ()
    for counts, slots, match in [((1, 2), 3, "expected 3 integers"), ((1, 2, 101), 3, r"in \[0, 100\]"),
                                 ((), 3, "lacks its evaluation counts"), ((1, 2, 3), 0, "round without evaluation")]:
        with pytest.raises(WireError, match=match):
            unpack_train_reply(reply(counts), 4, 10, slots, 100)


# ------------------------------------------------------------------ a site's real handler
@pytest.mark.model
def test_a_site_releases_noisy_counts_of_the_model_it_received_and_keeps_its_own_scores(tmp_path: Path,
                                                                                       drug_reviews) -> None:
    """Plain aggregation, so every field of the reply is visible: the counts are the DP release (counts + noise +
    offset), never the site's own counts; the site keeps its un-noised scores on its own disk; the same round and
    adapter asked again (a resumed run) resends the same release for no new charge."""
    from client.app import train
    from client.privacy import PrivacyLedger
    from client.site import resolve_site
    from common.adapter import set_adapter_state
    from common.evaluation import evaluate, metrics
    from common.federated_eval import classification_counts
    from common.model import build_model
    from common.records import pack_train_request
    from tests.test_site_releases import call, clear_values, initial_adapter, node_config, run_config

    config = run_config(tmp_path, **{"federation.eval-epsilon": 1.0})
    nodes = node_config(tmp_path, "site-a", write_csv(tmp_path / "a.csv", drug_reviews[:80]))
    state = initial_adapter(config)
    reply = call(train, pack_train_request(state, 1), config, nodes, run_id=7)
    released = reply.array_records["evaluation"]["counts"].numpy()

    run = RunSettings.from_flat(config)
    plan = plan_evaluation(run)
    site = resolve_site(nodes, run)
    assert site.evaluation is not None and len(site.evaluation) + len(site.train) == 80
    model = build_model("", 3, run.lora)
    set_adapter_state(model, state)
    own = evaluate(model, site.evaluation, 3)
    true_counts = np.array(classification_counts(own.confusion))
    noise = released - true_counts - plan.offset
    assert not np.array_equal(released, true_counts) and not np.array_equal(noise, np.zeros_like(noise))
    assert np.all(np.abs(noise) < 8 * plan.sigma)
    # Nothing else in the reply depends on the evaluation (the update, a public weight, the ε report).
    assert set(reply.array_records) == {"update", "evaluation"}
    assert not {int(c) for c in true_counts if c > 3} & {v for v in clear_values(reply) if isinstance(v, int)}
    # The site's own, un-noised scores: on its disk only.
    lines = [json.loads(line) for line in (tmp_path / "site-a" / "site-eval.jsonl").read_text().splitlines()]
    assert [(line["round"], line["model_round"]) for line in lines] == [(1, 0)]
    assert lines[0]["accuracy"] == pytest.approx(metrics(own)["accuracy"])
    assert stat.S_IMODE((tmp_path / "site-a" / "site-eval.jsonl").stat().st_mode) == 0o600
    report = (tmp_path / "site-a" / "site-report.html")  # the site's own view of the same numbers
    assert stat.S_IMODE(report.stat().st_mode) == 0o600 and "never leave this site" in report.read_text()
    ledger = PrivacyLedger(tmp_path / "site-a" / "privacy-ledger.json", run.privacy)
    assert ledger.evaluation is not None and ledger.evaluation.rounds == ((7, 1),)
    again = call(train, pack_train_request(state, 1), config, nodes, run_id=8)  # a resumed run asks again
    assert np.array_equal(again.array_records["evaluation"]["counts"].numpy(), released)
    assert PrivacyLedger(tmp_path / "site-a" / "privacy-ledger.json", run.privacy).evaluation == ledger.evaluation


@pytest.mark.model
def test_a_site_without_an_evaluation_split_releases_noise_of_the_same_shape(tmp_path: Path, drug_reviews) -> None:
    from client.app import train
    from client.privacy import PrivacyLedger
    from common.records import pack_train_request
    from tests.test_site_releases import call, initial_adapter, node_config, run_config

    config = run_config(tmp_path)
    nodes = node_config(tmp_path, "site-a", write_csv(tmp_path / "a.csv", drug_reviews[:20]), **{"eval-fraction": 0})
    reply = call(train, pack_train_request(initial_adapter(config), 1), config, nodes)
    plan = plan_evaluation(RunSettings.from_flat(config))
    noise = reply.array_records["evaluation"]["counts"].numpy() - plan.offset
    assert noise.shape == (plan.layout.slots,) and np.all(np.abs(noise) < 8 * plan.sigma)
    assert not (tmp_path / "site-a" / "site-eval.jsonl").exists()
    ledger = PrivacyLedger(tmp_path / "site-a" / "privacy-ledger.json", RunSettings.from_flat(config).privacy)
    assert ledger.evaluation is None  # noise on nothing costs nothing


# ------------------------------------------------------------------ the coordinator's view of a real secure run
@pytest.mark.model
def test_a_run_without_test_data_draws_a_federated_curve_from_masked_vectors_and_their_noisy_sum(
        tmp_path: Path, drug_reviews) -> None:
    """The real round loop and the sites' real ClientApps, secure aggregation, no coordinator test set. Everything
    the coordinator receives is enumerated: no reply carries evaluation counts in the clear, each site's masked
    upload does not hold its release in its count slots, and the federated scores in metrics.jsonl are exactly
    the decoding of the sum of the sites' releases (which stay on their disks). The estimate is compared with the
    un-noised accuracy on the union of the sites' evaluation splits (their own site-eval.jsonl)."""
    from client.release import adapter_digest
    from client.site_eval import RELEASES_FILE, SITE_SCORES_FILE
    from common.federated_eval import decode
    from common.records import unpack_stage, unpack_train_request
    from common.run_files import read_metrics, read_run_info
    from common.secagg import MaskedUpload
    from common.secagg.fixedpoint import unpack_bits
    from common.secure_update import params_from_bytes
    from tests.test_federation_inprocess import InProcessGrid, federate

    seen: list = []

    class Recording(InProcessGrid):
        def answer(self, message):
            reply = super().answer(message)
            seen.append((message, reply))
            return reply

    rounds, eval_epsilon = 3, 20.0
    data = {"train": write_csv(tmp_path / "train.csv", drug_reviews[:150])}
    out = tmp_path / "run"
    federate(out, data | {"test": Path("none")}, rounds=rounds, grid=Recording,
             **{"data.test-source": "none", "federation.eval-epsilon": eval_epsilon, "federation.select-round": "best"})
    lines = read_metrics(out)
    assert read_run_info(out).majority_baseline == {} and lines[0].server == {}
    plan = plan_evaluation(RunSettings.from_flat(default_run_config() | {
        "data.labels": ",".join(LABELS), "federation.rounds": rounds, "federation.eval-epsilon": eval_epsilon,
        "federation.secure-aggregation": False}))
    assert plan is not None

    params = {}
    released: dict[tuple[int, int], list[int]] = {}  # (round, node) -> the site's release, from its own disk
    for message, reply in seen:
        node, kind = message.metadata.dst_node_id, message.metadata.message_type
        assert "evaluation" not in reply.content.array_records  # never in the clear under secure aggregation
        if kind == "train":
            state, server_round, raw = unpack_train_request(message.content)
            params[server_round] = params_from_bytes(raw)
            kept = json.loads((out / "sites" / f"site-{node - 100}" / RELEASES_FILE).read_text())
            released[(server_round, node)] = kept[f"{server_round}/{adapter_digest(state)}"]
        elif kind == "train.secagg_mask":  # the stage-3 upload of the round whose train exchange came last
            current = params[max(params)]
            _, blobs = unpack_stage(reply.content)
            upload = MaskedUpload.from_bytes(blobs["payload"], current)
            masked = unpack_bits(upload.body, current.total_length, current.modulus_bits)
            counts = [int(c) for c in masked[current.vector_length:]]
            assert len(counts) == plan.layout.slots and counts != released[(max(params), node)]
    gaps = []
    for line in lines[1:]:
        federated = line.federated_evaluation
        assert federated is not None and federated.model_round == line.round - 1 and federated.sites == 3
        total = [sum(column) for column in zip(*(released[(line.round, node)] for node in (100, 101, 102)),
                                               strict=True)]
        assert federated == decode(total, 3, plan, model_round=line.round - 1)  # the noisy sum, nothing else
        own = [json.loads(text) for site in range(3)
               for text in (out / "sites" / f"site-{site}" / SITE_SCORES_FILE).read_text().splitlines()]
        own = [entry for entry in own if entry["round"] == line.round]
        truth = sum(e["accuracy"] * e["examples"] for e in own) / sum(e["examples"] for e in own)
        low, high = federated.intervals["accuracy"]
        gaps.append((line.round, truth, federated.scores["accuracy"], low, high))
    print("federated vs true accuracy (round, true, federated, interval):", gaps)
    assert all(abs(true - estimate) < 0.25 for _, true, estimate, _, _ in gaps)

    # --select-round best: the best-scored checkpoint is the final adapter, named in run.json and in a passport
    # re-signed with the whole run's ε (the choice came after every round), and in the coordinator's audit log.
    from common.passport import load_public_key, verify_passport
    from common.run_files import read_privacy, read_round_info
    from server.selection import best_round

    selection = best_round(lines, "classification")
    best = max(gaps, key=lambda gap: (gap[2], -gap[0]))
    assert selection is not None and selection.round == best[0] - 1 and selection.evaluations == rounds
    assert read_run_info(out).selected_round == selection.round
    chosen = read_round_info(out / "checkpoints" / f"round-{selection.round:04d}")
    passport = verify_passport(out / "final" / "adapter", load_public_key(out / "passport-signing.pub"))
    assert passport["adapter_sha256"] == chosen.adapter_sha256 and passport["server_round"] == selection.round
    assert passport["selection"] == selection.passport_entry()
    assert passport["epsilon"] == {site: report.epsilon for site, report in read_privacy(out).sites.items()}
    events = [json.loads(text) for text in (out / "audit.jsonl").read_text().splitlines()]
    assert [e["round"] for e in events if e["event"] == "round-selected"] == [selection.round]
    assert not (out / "final" / "selected").exists()


def test_the_terminal_and_summary_show_the_federated_curve_of_a_run_without_test_data(tmp_path: Path) -> None:
    from common.run_files import FederatedScores, MetricsLine, RunInfo, append_metrics, write_run_info
    from simulations.report import load_summary, round_line, summary_text

    write_run_info(tmp_path, RunInfo(majority_baseline={}, aggregation="secure", dp=True, labels=LABELS))
    federated = FederatedScores(model_round=0, sites=3, examples=31.0, scores={"accuracy": 0.4, "macro_f1": 0.35},
                                intervals={"accuracy": [0.3, 0.5], "macro_f1": [0.25, 0.45]}, noise_sigma=1.0,
                                epsilon=1.0)
    append_metrics(tmp_path, MetricsLine(round=0, server={}))
    append_metrics(tmp_path, line := MetricsLine(round=1, server={}, contributors=3, model_updated=True,
                                                 federated_evaluation=federated))
    shown = round_line(line, 4)
    assert "accuracy -  macro-F1 -" in shown
    assert "federated accuracy 0.400 [0.30, 0.50]  macro-F1 0.350 [0.25, 0.45] (round 0's model)" in shown
    text = summary_text(load_summary(tmp_path))
    assert "no coordinator test set" in text and "majority-class" not in text and "macro-F1 0.350" in text


def test_the_summary_reports_the_chosen_round_and_that_rounds_scores(tmp_path: Path) -> None:
    from common.run_files import MetricsLine, RunInfo, append_metrics, write_run_info
    from simulations.report import load_summary, summary_text

    write_run_info(tmp_path, RunInfo(majority_baseline={}, aggregation="secure", dp=True, labels=LABELS,
                                     select_round="best", selected_round=1,
                                     selected_because="round 1's model, best federated accuracy 0.700"))
    for server_round, accuracy in [(0, 0.3), (1, 0.7), (2, 0.6)]:
        append_metrics(tmp_path, MetricsLine(round=server_round, server={"accuracy": accuracy, "macro_f1": accuracy,
                                                                          "examples": 30}))
    summary = load_summary(tmp_path)
    assert summary.final["accuracy"] == 0.7  # the published adapter's scores, not the last round's
    assert "final adapter chosen on the federated evaluation: round 1's model" in summary_text(summary)


def test_a_site_that_trained_before_it_had_a_split_never_evaluates_the_units_it_held(tmp_path: Path) -> None:
    (tmp_path / "privacy-ledger.json").write_text("{}")  # charged before evaluation existed (only its presence counts)
    policy = SitePolicy(labels=LABELS)
    train, held_out = split_for_evaluation(records(100), policy, settings(), tmp_path, "site")
    assert len(train) == 100 and held_out == []
    _, grown = split_for_evaluation(records(300), policy, settings(), tmp_path, "site")  # only new units are drawn
    assert grown and all(int(r["text"].split()[1]) >= 100 for r in grown)


def test_the_sites_own_report_shows_its_exact_scores_by_round_and_stays_private(tmp_path: Path) -> None:
    from client.site_report import write_site_report

    scores = tmp_path / "site-eval.jsonl"
    scores.write_text("\n".join([
        json.dumps({"run_id": 7, "round": 1, "model_round": 0, "examples": 40, "accuracy": 0.425, "macro_f1": 0.31}),
        "{damaged",
        json.dumps({"run_id": 7, "round": 2, "model_round": 1, "examples": 40, "accuracy": 0.675, "macro_f1": 0.52}),
    ]) + "\n")
    page = write_site_report(tmp_path, "hospital-a", "classification", scores)
    text = page.read_text()
    assert stat.S_IMODE(page.stat().st_mode) == 0o600 and page.name == "site-report.html"
    assert "hospital-a" in text and "0.425" in text and "0.675" in text and "0.520" in text
    assert text.count("<tr><td>7</td>") == 2  # the damaged line is skipped, the rest shown
    assert '<svg id="curve"' in text and "accuracy: 0.425 to 0.675" in text
