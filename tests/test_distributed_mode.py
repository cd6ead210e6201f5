"""Distributed DP as a run mode (issue 21): the run setting, the site's opt-in and trust assumption, and what a
site refuses before anything is spent. The end-to-end rounds are in tests/test_federation_inprocess.py."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest

from client.policy import PolicyError, SitePolicy
from client.privacy import BudgetExhausted, PrivacyLedger
from common.config import ConfigError, PrivacySettings, RunSettings, ServerSettings

LABELS = ("a", "b")


def run(mode: str = "distributed", **flat) -> RunSettings:
    return RunSettings.from_flat({"privacy.dp-mode": mode, "secagg.registry": "r.json", "data.labels": "a,b"} | flat)


def test_the_dp_mode_is_a_typed_run_setting_local_by_default() -> None:
    assert run("local").privacy.dp_mode == "local" and SitePolicy().dp_modes == ("local",)
    assert run().privacy.dp_mode == "distributed"
    with pytest.raises(ConfigError, match="privacy.dp-mode must be 'local' or 'distributed'"):
        run("pooled")


def test_distributed_dp_needs_secure_aggregation_and_dp() -> None:
    """The run config itself refuses it, so the coordinator cannot start it and a site parsing it refuses too."""
    with pytest.raises(ConfigError, match="distributed needs DP and secure aggregation on.*--plain-aggregation"):
        run(**{"federation.secure-aggregation": False})
    with pytest.raises(ConfigError, match="distributed needs DP"):
        run(**{"privacy.enabled": False})


def test_in_distributed_dp_the_server_steps_with_the_sites_adam_and_refuses_a_server_optimizer() -> None:
    """The server's step IS DP-SGD's step: the sites' bias-corrected Adam at train.learning-rate. A server.* setting
    (local mode's step on the mean update) is refused by name rather than silently ignored."""
    assert run().step_optimizer() == ServerSettings(optimizer="adam", learning_rate=0.02)
    assert run(**{"train.learning-rate": 0.05}).step_optimizer().learning_rate == 0.05
    assert run("local", **{"server.optimizer": "fedadam"}).step_optimizer().optimizer == "fedadam"
    for flat in ({"server.optimizer": "fedadam"}, {"server.learning-rate": 0.5}):
        with pytest.raises(ConfigError, match="distributed DP the server takes DP-SGD's step itself.*--learning-rate"):
            run(**flat)


def test_a_site_trains_in_distributed_mode_only_if_it_opted_in() -> None:
    with pytest.raises(PolicyError, match="DP mode 'distributed'; this site trains only in local"):
        SitePolicy(labels=LABELS).check(run())
    SitePolicy(labels=LABELS, dp_modes=("local", "distributed")).check(run())
    with pytest.raises(PolicyError, match="trains only in distributed"):
        SitePolicy(labels=LABELS, dp_modes=("distributed",)).check(run("local"))


def test_the_policy_reads_its_modes_and_assumption_as_the_daemon_gets_them() -> None:
    policy = SitePolicy.from_mapping({"dp-modes": "local,distributed", "min-honest-sites": "4"}, "test")
    assert policy.dp_modes == ("local", "distributed") and policy.min_honest_sites == 4
    for bad, fragment in (({"dp-modes": "central"}, "dp-modes must name some of local, distributed"),
                          ({"min-honest-sites": "0"}, "min-honest-sites must be >= 1")):
        with pytest.raises(ConfigError, match=fragment):
            SitePolicy.from_mapping(bad, "test")


def test_a_site_refuses_a_round_with_fewer_sites_than_it_assumes_honest() -> None:
    """By default it assumes the round's secure-aggregation threshold honest; its policy may say otherwise."""
    policy = SitePolicy(labels=LABELS, dp_modes=("distributed",))
    assert policy.honest_sites(threshold=3) == 3
    policy.check_participants(3, threshold=3)
    with pytest.raises(PolicyError, match="the round has 2 site.*assumes 3 honest"):
        policy.check_participants(2, threshold=3)
    assumes_two = SitePolicy(labels=LABELS, dp_modes=("distributed",), min_honest_sites=2)
    assumes_two.check_participants(2, threshold=3)
    with pytest.raises(PolicyError, match="assumes 5 honest"):
        SitePolicy(labels=LABELS, min_honest_sites=5).check_participants(4, threshold=3)


@functools.cache
def _plan(steps: int = 3, honest: int = 3):
    from common.distributed_dp import DistributedDpSettings, plan_distributed_dp, site_share

    public = plan_distributed_dp(DistributedDpSettings(dimension=64, clip=1.0, sample_rate=0.1, steps=steps,
                                                       epsilon=2.0, delta=1e-5, sites=3, min_honest_sites=1,
                                                       expected_batch=10.0))
    return public, site_share(public, honest)


def test_a_site_shares_a_third_of_the_noise_in_the_public_ring_and_knows_the_epsilon_of_its_share() -> None:
    public, share = _plan()
    assert share.ring_bits == public.ring_bits and share.total_variance == public.total_variance
    assert share.site_variance == public.total_variance / 3 and share.epsilon == public.epsilon
    assert share.local_epsilon > public.epsilon == public.local_epsilon  # the public plan's h = 1: one full share


def test_the_ledger_charges_both_epsilons_write_ahead_and_the_budget_binds_the_coordinators(tmp_path: Path) -> None:
    """Each step is charged before it is computed, with the Skellam accountant: ε against the coordinator (μ) is what
    the budget binds, ε of the site's own share (μ/h) is reported beside it; T steps reach the plan's two ε."""
    _, share = _plan()
    ledger = PrivacyLedger(tmp_path / "state" / "privacy-ledger.json",
                           PrivacySettings(epsilon=2.0, delta=1e-5, accountant="rdp"))
    for server_round in (1, 2, 3):
        ledger.charge_distributed(run_id=1, server_round=server_round, plan=share)
    reopened = PrivacyLedger(ledger.path, ledger.settings)
    assert len(reopened.distributed) == 1 and reopened.distributed[0].steps == 3  # merged, as Opacus merges
    assert reopened.spent() == pytest.approx(share.epsilon, rel=1e-9) and share.epsilon <= 2.0
    assert reopened.spent_own_noise() == pytest.approx(share.local_epsilon, rel=1e-9)
    report = reopened.report()
    assert set(report) == {"epsilon", "own_noise_epsilon", "delta", "budget", "accountant"}  # nothing pins n
    assert report["epsilon"] >= reopened.spent() and report["own_noise_epsilon"] >= reopened.spent_own_noise()
    assert report["accountant"] == "skellam-rdp"  # what composed these steps, not the run's DP-SGD accountant
    with pytest.raises(BudgetExhausted):
        reopened.charge_distributed(run_id=1, server_round=4, plan=share)
    assert PrivacyLedger(ledger.path, ledger.settings).distributed[0].steps == 3  # the refused step is not charged


def test_ring_mode_sums_integer_vectors_mod_2_to_the_b_and_a_site_signs_no_smaller_survivor_set(
        tmp_path: Path) -> None:
    """Secure aggregation in ring mode, through the site's real stages: each site's vector is integers mod 2^b
    already (no fixed point, no clamping), the server's result is their exact sum mod 2^b; a site refuses to sign a
    survivor set with fewer sites than it assumes honest."""
    import numpy as np

    from client.secure import (
        ParamsRefused,
        SessionStore,
        SiteKeys,
        accept_params,
        stage_advertise_ring,
        stage_confirm,
        stage_mask,
        stage_share,
        stage_unmask,
    )
    from common.config import SecureAggSettings
    from common.registry import create_site_identities, load_identity, load_registry
    from common.secagg import ServerAggregator, SurvivorSet
    from common.secure_update import params_to_bytes, round_params

    names, length, bits = [f"site-{i}" for i in range(3)], 16, 12
    create_site_identities(names, {n: tmp_path / n for n in names}, tmp_path / "registry.json")
    registry = load_registry(tmp_path / "registry.json")
    params = round_params(SecureAggSettings(registry=str(tmp_path / "registry.json")), run_id=1, server_round=1,
                          site_ids=[0, 1, 2], vector_length=length, members_digest=registry.digest, ring_bits=bits)
    assert params.modulus_bits == bits and params.count_slots == 0
    rng = np.random.default_rng(0)
    vectors = {i: rng.integers(0, 1 << bits, length).astype(np.uint64) for i in range(3)}
    sites, bundles = {}, {}
    for i, name in enumerate(names):
        keys, store = SiteKeys(*load_identity(tmp_path / name, name, registry), registry), SessionStore(tmp_path / name)
        with pytest.raises(ParamsRefused, match="a ring of 12 bits, expected 0"):  # a site that expects fixed point
            accept_params(params_to_bytes(params), SitePolicy(), keys, store=store, run_id=1, server_round=1,
                          vector_length=length)
        accept_params(params_to_bytes(params), SitePolicy(), keys, store=store, run_id=1, server_round=1,
                      vector_length=length, ring_bits=bits)
        bundles[i] = stage_advertise_ring(store, params, keys, vectors[i], min_survivors=3)
        sites[i] = keys, store
    server = ServerAggregator(params, registry.keys)
    routed = server.collect_bundles(bundles)
    shares = {i: stage_share(store, params.round_id, keys, {str(p): b.to_bytes() for p, b in routed[i].items()})
              for i, (keys, store) in sites.items()}
    inbox = server.route_shares(shares)
    survivors = server.collect_masked({i: stage_mask(store, params.round_id, keys,
                                                     {str(s): ct for s, ct in inbox[i].items()})
                                       for i, (keys, store) in sites.items()})
    keys, store = sites[0]
    with pytest.raises(ParamsRefused, match="fewer sites than the 3 honest ones this site assumes"):
        stage_confirm(store, params.round_id, keys, SurvivorSet(params.round_id, frozenset({0, 1})).to_bytes())
    request = server.collect_confirmations({i: stage_confirm(store, params.round_id, keys, survivors.to_bytes())
                                            for i, (keys, store) in sites.items()})
    result = server.finish({i: stage_unmask(store, params.round_id, keys, request.to_bytes())
                            for i, (keys, store) in sites.items()})
    expected = (vectors[0] + vectors[1] + vectors[2]) & np.uint64((1 << bits) - 1)
    assert np.array_equal(result.sum_vector.astype(np.uint64), expected) and result.error_bound == 0.0


def test_the_ring_round_carries_the_evaluation_counts_after_the_gradient_in_a_widened_ring() -> None:
    """Coordinator and sites call one function for a round's layout: the counts ride only in evaluation rounds."""
    from common.distributed_round import ring_round, round_plan
    from common.federated_eval import plan_evaluation
    from common.secure_update import MAX_COUNT

    settings = run(**{"federation.eval-every": 2, "federation.rounds": 4})
    slots = plan_evaluation(settings).slots_in(1)  # type: ignore[union-attr]
    plain = round_plan(settings, dimension=1000, sites=4, public_total=400)
    evaluated, trained = (ring_round(settings, dimension=1000, sites=4, public_total=400, server_round=r)
                          for r in (1, 2))
    assert slots > 0 and evaluated.count_slots == slots and trained.count_slots == 0
    assert trained.plan == plain and trained.vector_length == plain.padded_dimension
    assert evaluated.vector_length == plain.padded_dimension + slots
    assert 4 * MAX_COUNT >= 1 << plain.ring_bits and 4 * MAX_COUNT < 1 << evaluated.plan.ring_bits
    assert dataclasses.replace(evaluated.plan, ring_bits=plain.ring_bits) == plain  # only the ring is wider


def test_the_round_takes_the_fewest_honest_sites_any_site_assumes_and_a_site_refuses_more() -> None:
    from common.distributed_round import round_honest_sites

    assert round_honest_sites([0, 0, 0], threshold=3) == 3  # every site's default: the threshold
    assert round_honest_sites([0, 2, 5], threshold=3) == 2  # one cautious site: everyone adds μ/2
    assert round_honest_sites([4, 5], threshold=3) == 4
    policy = SitePolicy(labels=LABELS, dp_modes=("distributed",), min_honest_sites=2)
    policy.check_noise_share(2, threshold=3)
    policy.check_noise_share(1, threshold=3)  # a larger share than it needs: more noise, never less privacy
    with pytest.raises(PolicyError, match="assume 3 honest sites; this site assumes 2"):
        policy.check_noise_share(3, threshold=3)
    with pytest.raises(PolicyError, match="assume 4 honest sites; this site assumes 3"):
        SitePolicy(labels=LABELS, dp_modes=("distributed",)).check_noise_share(4, threshold=3)


def test_the_noise_plan_digest_names_everything_a_site_counts_on() -> None:
    """Coordinator and sites hash the same plan alike; any public number the sites' shares depend on changes it."""
    from common.distributed_round import ring_round

    base = {"federation.rounds": 4, "federation.eval-every": 2}  # the sites evaluate in rounds 1 and 3
    settings = run(**base)

    def digest(settings: RunSettings = settings, total: int = 400, sites: int = 4, honest: int = 3,
               server_round: int = 2) -> bytes:
        return ring_round(settings, dimension=1000, sites=sites, public_total=total,
                          server_round=server_round).digest(honest)

    assert digest() == digest() and len(digest()) == 32
    others = [digest(total=401), digest(sites=5), digest(honest=2), digest(run(**base | {"federation.rounds": 5})),
              digest(run(**base | {"privacy.epsilon": 4.0})), digest(server_round=1),  # with count slots
              digest(run(**base | {"federation.eval-epsilon": 2.0}), server_round=1)]  # and another evaluation noise
    assert len({digest(), *others}) == 1 + len(others)


def test_the_wire_carries_each_sites_assumption_and_the_rounds_one_h() -> None:
    from flwr.app import ConfigRecord, RecordDict

    from common.records import (
        PublicSize,
        RoundNoise,
        WireError,
        pack_public_size,
        pack_train_request,
        unpack_public_size,
        unpack_round_noise,
    )

    assert unpack_public_size(pack_public_size(PublicSize(120, 0))) == PublicSize(120, 0)
    request = pack_train_request({"w": np.zeros(2, dtype=np.float32)}, 1, b"{}", RoundNoise(400, 2))
    assert unpack_round_noise(request) == RoundNoise(400, 2)
    for bad in ({"public-size": 400}, {"public-size": 400, "honest-sites": 0},
                {"public-size": 400, "honest-sites": True}, {"public-size": 0, "honest-sites": 2}):
        with pytest.raises(WireError):
            unpack_round_noise(RecordDict({"distributed": ConfigRecord(bad)}))
    with pytest.raises(WireError, match="assumed honest sites -1"):
        unpack_public_size(RecordDict({"distributed": ConfigRecord({"public-size": 5, "honest-sites": -1})}))


def test_a_site_accepts_only_the_round_id_that_names_the_noise_plan_it_computed(tmp_path: Path) -> None:
    from client.secure import ParamsRefused, SessionStore, SiteKeys, accept_params
    from common.config import SecureAggSettings
    from common.registry import create_site_identities, load_identity, load_registry
    from common.secure_update import params_to_bytes, round_params, secure_round_id

    names = [f"site-{i}" for i in range(3)]
    create_site_identities(names, {n: tmp_path / n for n in names}, tmp_path / "registry.json")
    registry = load_registry(tmp_path / "registry.json")
    ours, theirs = bytes(range(32)), bytes(range(1, 33))
    params = round_params(SecureAggSettings(registry=str(tmp_path / "registry.json")), run_id=1, server_round=1,
                          site_ids=[0, 1, 2], vector_length=16, members_digest=registry.digest, ring_bits=12)
    offered = params_to_bytes(dataclasses.replace(params, round_id=secure_round_id(1, 1, theirs)))  # as the server
    keys = SiteKeys(*load_identity(tmp_path / "site-0", "site-0", registry), registry)
    for plan in (ours, b""):  # another plan, or none (a site that would not have planned distributed noise)
        with pytest.raises(ParamsRefused, match="is not run 1, round 1"):
            accept_params(offered, SitePolicy(), keys, store=SessionStore(tmp_path / "a"), run_id=1, server_round=1,
                          vector_length=16, ring_bits=12, noise_plan=plan)
    accepted = accept_params(offered, SitePolicy(), keys, store=SessionStore(tmp_path / "b"), run_id=1,
                             server_round=1, vector_length=16, ring_bits=12, noise_plan=theirs)
    assert accepted.round_id == b"fedtune/run-1/round-1/noise-" + theirs.hex().encode()


def test_the_longest_round_id_still_names_its_session_files(tmp_path: Path) -> None:
    """A site keeps each round's session under the hex of its round id: with the noise plan's digest in the id, the
    largest Flower run id and a millionth round still make file names the file system takes (255 bytes)."""
    from client.secure import SessionStore
    from common.secure_update import secure_round_id

    longest = secure_round_id((1 << 64) - 1, 10**6, bytes(32))
    with SessionStore(tmp_path).locked(longest):
        assert [len(path.name) for path in tmp_path.rglob("*.lock")] == [len(longest.hex()) + 6]
