"""Distributed DP end to end in the in-process tier (issue 21): the real round loop and the sites' real ClientApps,
one DP-SGD step of the pooled data per round, the sites' noise shares summed in secure aggregation's ring."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from flwr.app import Message

from common.records import FAILURE_MESSAGES
from common.run_files import read_metrics, read_privacy, read_run_info
from server.federation import FederationFailed
from tests.conftest import write_csv
from tests.test_federation_inprocess import InProcessGrid, federate

pytestmark = pytest.mark.model
DISTRIBUTED = {"privacy.dp-mode": "distributed", "federation.eval-every": 0}


@pytest.fixture(scope="module")
def data(tmp_path_factory, drug_reviews) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    return {"train": write_csv(root / "train.csv", drug_reviews[:90]),  # 3 sites × 30 records
            "test": write_csv(root / "test.csv", drug_reviews[500:530])}


class Recording(InProcessGrid):
    """Keeps every message the coordinator sent and every reply it received."""

    seen: ClassVar[list] = []

    def answer(self, message):
        reply = super().answer(message)
        Recording.seen.append((message, reply))
        return reply


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("run")
    Recording.seen = []
    federate(out, data, rounds=3, grid=Recording,
             **DISTRIBUTED | {"federation.checkpoint-every": 3, "federation.eval-every": 2})  # sites score 1, 3
    return out


def test_a_distributed_run_takes_one_pooled_step_per_round_and_learns(distributed_run: Path) -> None:
    lines = read_metrics(distributed_run)
    assert [line.round for line in lines] == [0, 1, 2, 3]
    for line in lines[1:]:
        assert line.model_updated and line.contributors == 3 and line.failures == ()
        assert line.secure_aggregation.survivors == ["site-0", "site-1", "site-2"]
        assert line.secure_aggregation.error_bound == 0.0
    assert lines[1].server == lines[2].server == {}  # checkpoint-every 3: the server scores (and checkpoints) 3 only
    lines = [line for line in lines if line.server]
    assert [line.round for line in lines] == [0, 3]
    losses = [line.server["loss"] for line in lines]
    details, values = lines[1].secure_aggregation, read_run_info(distributed_run).update_values
    print(f"server test loss by round: {losses}; ring of {details.modulus_bits} bits, upload "
          f"{details.upload_bytes:,} bytes = {details.upload_bytes / (4 * values):.3f}× the {values:,} fp32 values")
    assert len(set(losses)) == len(losses)  # every step moved the model


def test_the_sites_evaluate_in_the_ring_and_only_the_sum_of_their_noisy_counts_is_decoded(distributed_run: Path
                                                                                         ) -> None:
    """In an evaluation round each site's noisy counts follow its d' gradient coordinates in the ring, widened so
    that 3 sites' counts (each ≤ MAX_COUNT) sum exactly: the coordinator's estimate is the sum of the releases the
    sites kept on their disks, less the public offsets, to the unit. Each site charged the evaluations to its
    evaluation account, beside the steps. Each site added a third of the evaluation noise (h = 3, the round's
    threshold), as of the gradient's."""
    from common.config import RunSettings
    from common.federated_eval import plan_evaluation, zcdp_epsilon
    from common.secure_update import MAX_COUNT
    from fedtune.cli import default_run_config
    from tests.test_federation_inprocess import LABELS

    plan = plan_evaluation(RunSettings.from_flat(default_run_config() | {
        "federation.rounds": 3, "federation.eval-every": 2, "data.labels": LABELS, "secagg.registry": "r.json",
        "privacy.dp-mode": "distributed"}))
    assert plan is not None and plan.shared(3).sigma_sq < plan.sigma_sq / 2

    lines = read_metrics(distributed_run)[1:]
    assert [line.federated_evaluation is not None for line in lines] == [True, False, True]
    assert lines[0].secure_aggregation.modulus_bits == (3 * MAX_COUNT).bit_length() \
        > lines[1].secure_aggregation.modulus_bits  # 22 bits in the evaluation rounds, the plan's ring otherwise
    sites = [distributed_run / "sites" / f"site-{i}" for i in range(3)]
    releases = [json.loads((site / "eval-releases.json").read_text()) for site in sites]
    for line in (lines[0], lines[2]):
        scores = line.federated_evaluation
        assert scores.noise_sigma == plan.shared(3).sigma  # each site's share, √3 less than the whole noise
        summed = np.sum([next(counts for key, counts in kept.items() if key.startswith(f"{line.round}/"))
                         for kept in releases], axis=0)
        assert scores.sites == 3 and scores.model_round == line.round - 1
        assert scores.examples == max(0, int(summed[-1]) - 3 * plan.offset)
        assert set(scores.scores) == {"accuracy", "macro_f1"}
        # ε of one site's share alone: its E = 2 releases at ρ = (Δ²/2σ_s²) each; against the coordinator the run's
        assert scores.epsilon == plan.epsilon < scores.own_noise_epsilon == pytest.approx(
            zcdp_epsilon(2 * plan.layout.sensitivity_sq / (2 * float(plan.shared(3).sigma_sq)), plan.delta))
    for site in sites:
        ledger = json.loads((site / "privacy-ledger.json").read_text())
        assert [server_round for _, server_round in ledger["evaluation"]["rounds"]] == [1, 3]
        assert sum(entry["steps"] for entry in ledger["distributed"]) == 3


def test_with_checkpoint_every_k_the_lineage_links_the_checkpoints_it_kept(distributed_run: Path) -> None:
    from common.run_files import read_round_info

    kept = sorted(path.name for path in (distributed_run / "checkpoints").iterdir())
    assert kept == ["round-0000", "round-0003"]
    infos = [read_round_info(distributed_run / "checkpoints" / name) for name in kept]
    assert [info.parent_sha256 for info in infos] == [None, infos[0].adapter_sha256]
    assert all((distributed_run / "checkpoints" / name / "server_optimizer.safetensors").is_file() for name in kept[1:])


def test_both_epsilons_are_in_privacy_json_and_the_passport(distributed_run: Path) -> None:
    sites = read_privacy(distributed_run).sites
    assert sorted(sites) == ["site-0", "site-1", "site-2"]
    for report in sites.values():
        assert 0 < report.epsilon <= 8.0 < report.own_noise_epsilon  # 3 honest sites assumed: a third of the noise
    passport = json.loads((distributed_run / "final" / "adapter" / "passport.json").read_text())["passport"]
    assert passport["epsilon"] == {site: report.epsilon for site, report in sites.items()}
    assert passport["own_noise_epsilon"] == {site: report.own_noise_epsilon for site, report in sites.items()}


def test_the_report_shows_both_epsilons(distributed_run: Path) -> None:
    from simulations.report import write_report

    page = write_report(distributed_run).read_text()
    for site, report in read_privacy(distributed_run).sites.items():
        assert f"{site}: ε = {report.epsilon:g} against the coordinator, ε = {report.own_noise_epsilon:g} from its " \
               "own noise alone" in page
    rounds = page.split('<table id="rounds">')[1].split("</table>")[0]  # the rounds the server or the sites scored
    assert [row.split("</td>")[0] for row in rounds.split("<tr><td>")[1:]] == ["1", "3"]
    evaluated = read_metrics(distributed_run)[-1].federated_evaluation
    assert f"ε = {evaluated.own_noise_epsilon:.3g} from one site's own noise alone" in page
    assert '<p id="rounds-not-shown">Not shown: 1 round(s) that moved the model without a score' in page


def test_the_coordinator_sees_public_sizes_and_masked_ring_vectors_only(distributed_run: Path) -> None:
    """Everything the coordinator received, enumerated: public sizes, signed keys with a privacy report and a public
    weight, and stage-3 uploads that are uniform in the ring (masked): no site's upload is its noisy gradient sum,
    which would sit near 0 (its coordinates within the plan's bound, most of them far inside), without the others'
    masks. Only the unmasked SUM is decoded (the rounds' metrics)."""
    from common.distributed_dp import centred
    from common.records import (
        RoundNoise,
        unpack_public_size,
        unpack_round_noise,
        unpack_stage,
        unpack_train_request,
    )
    from common.secagg import MaskedUpload
    from common.secagg.fixedpoint import unpack_bits
    from common.secure_update import params_from_bytes

    params, kinds, totals = {}, set(), Counter()
    for message, reply in Recording.seen:
        kind = message.metadata.message_type
        kinds.add(kind)
        assert not reply.content.array_records  # nothing but config records and stage blobs comes back
        if kind == "query.public_size":  # each site's public size and assumption (its policy's default: 0)
            size = unpack_public_size(reply.content)
            assert size.units >= 1 and size.honest_sites == 0
            totals[message.content.config_records["round"]["server-round"]] += size.units
        elif kind == "train":
            _, server_round, raw = unpack_train_request(message.content)
            params[server_round] = current = params_from_bytes(raw)
            assert current.ring_bits == current.modulus_bits > 0
            # one share for all: h is the round's threshold, which every site assumes by default; the noise plan
            # is in the round id
            assert unpack_round_noise(message.content) == RoundNoise(totals[server_round], current.threshold)
            run = message.metadata.run_id
            assert current.round_id.startswith(f"fedtune/run-{run}/round-{server_round}/noise-".encode())
        elif kind == "train.secagg_mask":
            current = params[max(params)]
            _, blobs = unpack_stage(reply.content)
            upload = MaskedUpload.from_bytes(blobs["payload"], current)
            masked = centred(unpack_bits(upload.body, current.total_length, current.modulus_bits), current.ring_bits)
            # Uniform in the ring: a quarter of the coordinates within ±2^(b−3), where a site's own noisy sum would
            # put nearly all of them (its coordinates are within the plan's bound < 2^(b−1), Gaussian-like).
            inner = float(np.mean(np.abs(masked) < 1 << (current.ring_bits - 3)))
            assert abs(inner - 0.25) < 0.02, inner
    assert kinds == {"query.identify", "query.public_size", "train", "train.secagg_share", "train.secagg_mask",
                     "train.secagg_confirm", "train.secagg_unmask"}
    assert sorted(params) == [1, 2, 3]


def test_a_site_that_did_not_opt_in_refuses_before_anything_is_spent(tmp_path: Path, data) -> None:
    with pytest.raises(FederationFailed, match="site-policy"):
        federate(tmp_path, data, rounds=1, policy={"dp-modes": "local"}, **DISTRIBUTED)
    line = read_metrics(tmp_path)[-1]
    refusals = {(f.site, f.kind, f.stage) for f in line.failures if f.site != "*"}
    assert refusals == {(f"site-{i}", "site-policy", "query.public_size") for i in range(3)}
    assert all(f.detail == FAILURE_MESSAGES["site-policy"] for f in line.failures if f.site != "*")
    assert not list((tmp_path / "sites").glob("site-*/privacy-ledger.json"))  # no size estimate, no step charged


def test_a_site_refuses_a_round_with_fewer_sites_than_it_assumes_honest(tmp_path: Path, data) -> None:
    with pytest.raises(FederationFailed, match="site-policy"):
        federate(tmp_path, data, rounds=1, policy={"min-honest-sites": 4}, **DISTRIBUTED)
    line = read_metrics(tmp_path)[-1]
    assert {(f.site, f.kind) for f in line.failures if f.site != "*"} == {
        (f"site-{i}", "site-policy") for i in range(3)}
    assert not list((tmp_path / "sites").glob("site-*/privacy-ledger.json"))


def test_plain_aggregation_in_distributed_mode_is_refused_by_the_coordinator_and_by_a_site(tmp_path: Path,
                                                                                            data) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from common.config import ConfigError
    from common.records import pack_train_request, unpack_failure
    from fedtune.cli import default_run_config

    with pytest.raises(ConfigError, match="distributed needs DP and secure aggregation"):
        federate(tmp_path, data, rounds=1, secure=False, **DISTRIBUTED)
    # A site asked anyway (a coordinator that skipped its own check) parses the same run config first.
    config = default_run_config() | {"out-dir": str(tmp_path), "federation.secure-aggregation": False,
                                     "privacy.dp-mode": "distributed"}
    grid = InProcessGrid(config, run_id=99)
    with pytest.MonkeyPatch.context() as patch:  # what a Flower task process knows of itself
        for name, value in (("_run_id", 99), ("_node_id", 1), ("_task_id", 1)):
            patch.setattr(TaskIdentity, name, value)
        request = Message(pack_train_request({"w": np.zeros(2, dtype=np.float32)}, 1), dst_node_id=100,
                          message_type="train")
        failure = unpack_failure(grid.answer(request).content)
    assert failure is not None and failure.kind == "bad-config"


def test_a_distributed_run_resumes_from_a_checkpoint_with_the_same_plan(tmp_path: Path, data) -> None:
    """Round 3 fails before any site trains (every site fails the size query); resuming from round 2's checkpoint
    plays it with the same public plan (it is a function of the run config and the round's sites), so the sites'
    ledgers end at the plan's ε after 3 steps, within their budget."""
    from common.records import SiteFailure, pack_failure

    class FailsRoundThree(InProcessGrid):
        def answer(self, message):
            if message.metadata.message_type == "query.public_size" and \
                    message.content.config_records["round"]["server-round"] == 3:
                return Message(pack_failure(SiteFailure("internal")), reply_to=message)
            return super().answer(message)

    federate(tmp_path, data, rounds=3, grid=FailsRoundThree, **DISTRIBUTED)
    assert [line.model_updated for line in read_metrics(tmp_path)[1:]] == [True, True, False]
    federate(tmp_path, data, rounds=3, resume_from=str(tmp_path / "checkpoints" / "round-0002"), **DISTRIBUTED)
    line = read_metrics(tmp_path)[-1]
    assert line.round == 3 and line.model_updated and line.contributors == 3
    for site in range(3):
        ledger = json.loads((tmp_path / "sites" / f"site-{site}" / "privacy-ledger.json").read_text())
        assert sum(entry["steps"] for entry in ledger["distributed"]) == 3
        assert ledger["epsilon_spent"] <= 8.0


class TellsSiteZeroAnotherTotal(InProcessGrid):
    """A coordinator that tells one site a larger public total than the others: that site would plan another
    sampling rate and noise, and the others' shares would no longer add up to what it counts on."""

    def answer(self, message):
        if message.metadata.message_type == "train" and message.metadata.dst_node_id == 100:
            noise = message.content.config_records["distributed"]
            noise["public-size"] = int(noise["public-size"]) + 40
        return super().answer(message)


class AssumesMoreHonestSites(InProcessGrid):
    """A coordinator that sets the round's h above what the sites assume: each would add too small a share."""

    def answer(self, message):
        if message.metadata.message_type == "train":
            message.content.config_records["distributed"]["honest-sites"] = 3
        return super().answer(message)


def _released(out: Path, sites: range = range(3)) -> list[dict]:
    """The "released" events of the sites' own audit logs."""
    return [event for site in sites for event in map(json.loads, (out / "sites" / f"site-{site}" / "audit.jsonl")
                                                     .read_text().splitlines()) if event["event"] == "released"]


def _charged_steps(out: Path, site: int) -> int:
    path = out / "sites" / f"site-{site}" / "privacy-ledger.json"
    return sum(entry["steps"] for entry in json.loads(path.read_text())["distributed"]) if path.exists() else 0


def test_a_site_told_another_public_total_than_the_others_never_shares_their_round(tmp_path: Path, data) -> None:
    """The round id carries the noise plan each site computed: site 0 refuses the offered round (its plan is not
    the one the round id names) before it charges a step, and no sum mixing two plans is ever decoded."""
    with pytest.raises(FederationFailed):
        federate(tmp_path, data, rounds=1, grid=TellsSiteZeroAnotherTotal, **DISTRIBUTED)
    line = read_metrics(tmp_path)[-1]
    assert not line.model_updated
    assert ("site-0", "protocol", "train") in {(f.site, f.kind, f.stage) for f in line.failures}
    assert _charged_steps(tmp_path, 0) == 0 and _released(tmp_path, range(1)) == []


def test_the_round_adds_the_share_of_the_fewest_honest_sites_assumed_and_a_larger_h_is_refused(
        tmp_path: Path, data) -> None:
    """Sites that assume 2 honest sites (below the round's threshold, 3) each add half the noise: the coordinator
    takes the fewest any site assumes. A coordinator that says 3 is refused by every site before anything is spent."""
    honest = tmp_path / "honest"
    federate(honest, data, rounds=1, policy={"min-honest-sites": 2}, **DISTRIBUTED)
    assert {(e["honest_sites"], e["noise_share_sites"]) for e in _released(honest)} == {(2, 2)}
    assert read_metrics(honest)[-1].model_updated

    attacked = tmp_path / "attacked"
    with pytest.raises(FederationFailed, match="site-policy"):
        federate(attacked, data, rounds=1, policy={"min-honest-sites": 2}, grid=AssumesMoreHonestSites,
                 **DISTRIBUTED)
    line = read_metrics(attacked)[-1]
    assert {(f.site, f.kind, f.stage) for f in line.failures if f.site != "*"} == {
        (f"site-{i}", "site-policy", "train") for i in range(3)}
    assert all(_charged_steps(attacked, site) == 0 for site in range(3))
