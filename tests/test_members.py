"""Membership the sites attest (issue 19, finding 1), tried as a malicious coordinator would.

The coordinator ships every site's kit, registry.json included. Before, a site checked its peers
against that registry, so the coordinator could (a) give a victim a registry whose other entries
are its own keys, run those "sites" itself and recover the victim's update from the sum, or (b)
enrol made-up sites and run {victim, fake, fake}, which meets min-sites = 3. Now each site's
officer pins the member list every officer confirmed (its digest) in the site's own state, the
site verifies peers only against it, and every round binds its digest. The victim here is the
real ClientApp (real DP training, real secure-aggregation stages); the coordinator runs the real
server (server.secure_agg) and its fake sites as real ClientSessions with keys of its own.
"""

from __future__ import annotations

import itertools
import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.config import parse_config_args
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from client.policy import SitePolicy
from client.secure import ParamsRefused, SessionStore, SiteKeys, accept_params
from common.adapter import AdapterState, get_adapter_state, trainable_keys
from common.config import RunSettings
from common.model import initial_model
from common.records import (
    KeyAdvertisement,
    PrivacyReport,
    pack_identity,
    pack_key_advertisement,
    pack_stage,
    unpack_stage,
    unpack_train_request,
)
from common.registry import (
    MEMBERS_FILE,
    FederationRegistry,
    RegistryError,
    load_identity,
    load_members,
    load_registry,
    pin_members,
    read_aloud,
    write_registry,
)
from common.secagg import ClientSession, ParameterError, SecAggParams, SiteIdentity, SiteRegistry
from common.secure_update import params_from_bytes, params_to_bytes, round_params
from fedtune.cli import main as run_cli
from fedtune.cli import simulated_registry
from fedtune.runtime.daemon import node_config
from fedtune.runtime.kits import ProvisionError, check_members, provision, site_keygen
from server.secure_agg import SecureAggregation
from server.strategy import RoundSpec
from tests.conftest import write_csv
from tests.grid import InstantGrid

LABELS = "negative,neutral,positive"
SITES = ["hospital-a", "hospital-b", "clinic-c"]  # hospital-a is the victim
VICTIM_NODE = 100
RUN_IDS = itertools.count(31)


@pytest.fixture(scope="module")
def world(tmp_path_factory, drug_reviews) -> dict:
    """Three real sites' keys and their provisioning; the victim's records; keys the coordinator made itself."""
    root = tmp_path_factory.mktemp("members")
    enrolments = [site_keygen(site, root / "keys" / site) for site in SITES]
    fed = provision(enrolments, ["127.0.0.1"], root / "fed")
    own = ("hospital-b", "clinic-c")  # names it will claim, with keys of its own
    for name in own:
        site_keygen(name, root / "coordinator-keys" / name)
    return {"root": root, "fed": fed, "enrolments": enrolments,
            "members": load_registry(fed / "server" / "registry.json"),
            "coordinator": {name: SiteIdentity.from_pem((root / "coordinator-keys" / name / "identity.pem")
                                                        .read_bytes()) for name in own},
            "data": write_csv(root / "victim.csv", drug_reviews[:12])}


@pytest.fixture(scope="module")
def adapter() -> AdapterState:
    """The round-0 adapter the coordinator sends (MiniLM, the run's LoRA settings)."""
    settings = RunSettings.from_flat(run_config(Path("unused")))
    return get_adapter_state(initial_model("", settings.data.labels, settings.lora, "classification"))


def run_config(registry: Path) -> dict:
    from fedtune.cli import default_run_config

    return default_run_config() | {
        "secagg.registry": str(registry), "data.labels": LABELS, "data.max-length": 16, "train.local-epochs": 1,
        "train.batch-size": 8, "federation.rounds": 1, "federation.sites": 3, "federation.min-sites": 3}


def entries(members: FederationRegistry) -> dict[str, tuple[int, bytes]]:
    """A member list as write_registry takes it: name → (id, raw identity key)."""
    return {name: (sid, members.keys[sid].public_bytes_raw()) for name, sid in members.ids.items()}


def officer_pins(world: dict, state: Path) -> None:
    """The victim's officer pins the members every officer confirmed (from the kit of the honest provisioning)."""
    pin_members(world["fed"] / "sites" / "hospital-a" / "registry.json", state, world["members"].digest.hex())


class CoordinatorsSite:
    """A site the coordinator runs itself with a key of its own: a real ClientSession, an update of zeros."""

    def __init__(self, name: str, site_id: int, identity: SiteIdentity, registry: FederationRegistry) -> None:
        self.name, self.site_id, self.identity, self.registry = name, site_id, identity, registry
        self.session: ClientSession | None = None

    def handle(self, msg: Message) -> RecordDict:
        kind = msg.metadata.message_type
        if kind == "query.identify":
            return pack_identity(self.name)
        if kind == "train":
            params = params_from_bytes(unpack_train_request(msg.content)[2])
            self.session = ClientSession(params, self.site_id, self.identity, self.registry.keys)
            return pack_key_advertisement(KeyAdvertisement(params.round_id, self.session.advertise_keys().to_bytes(),
                                                           10_000, PrivacyReport(self.name, True, 1.0, 1e-5)))
        assert self.session is not None
        round_id, blobs = unpack_stage(msg.content)
        by_site = {int(k): v for k, v in blobs.items() if k != "payload"}
        if kind == "train.secagg_share":
            answer = {"payload": self.session.share_keys(by_site).to_bytes()}
        elif kind == "train.secagg_mask":
            answer = {"payload": self.session.masked_input(by_site, np.zeros(self.session.params.vector_length), [])}
        elif kind == "train.secagg_confirm":
            answer = {"payload": self.session.confirm_survivors(blobs["payload"])}
        else:
            answer = {"payload": self.session.unmask(blobs["payload"]).to_bytes()}
        return pack_stage(round_id, answer)


class AttackGrid(InstantGrid):
    """The victim's real ClientApp on node 100; the coordinator's own sites on the other nodes."""

    def __init__(self, victim: Context, fakes: list[CoordinatorsSite], run_id: int) -> None:
        super().__init__([VICTIM_NODE, *range(101, 101 + len(fakes))], run_id)
        self.victim, self.fakes = victim, dict(zip(self.nodes[1:], fakes, strict=True))

    def answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        if node == VICTIM_NODE:
            return client_app(message=message, context=self.victim)
        return Message(self.fakes[node].handle(message), dst_node_id=0, message_type=message.metadata.message_type)


def attack(world: dict, adapter: AdapterState, tmp_path: Path, *, kit_registry: dict[str, tuple[int, bytes]],
           server_registry: FederationRegistry, fakes: list[CoordinatorsSite], pinned: bool = True):
    """One secure round run by the coordinator: the victim's kit holds ``kit_registry``; returns (outcome, state)."""
    kit, state = Path(shutil.copytree(world["fed"] / "sites" / "hospital-a", tmp_path / "kit")), tmp_path / "state"
    write_registry(kit / "registry.json", kit_registry)
    if pinned:
        officer_pins(world, state)
    write_registry(tmp_path / "server-registry.json", kit_registry)
    config = run_config(tmp_path / "server-registry.json") | {"out-dir": str(tmp_path / "server")}
    settings = RunSettings.from_flat(config)
    run_id = next(RUN_IDS)
    policy = SitePolicy(labels=tuple(LABELS.split(",")), max_epsilon=8.0)
    site_config = parse_config_args([node_config(kit, world["root"] / "keys" / "hospital-a", world["data"], state,
                                                 policy)])
    victim = Context(run_id=run_id, node_id=VICTIM_NODE, state=RecordDict(), run_config=config,
                     node_config=site_config)
    size = sum(adapter[k].size for k in trainable_keys(adapter, settings.lora.aggregation))
    spec = RoundSpec(size, settings.secagg.max_examples, 3, 60.0, 60.0)
    with pytest.MonkeyPatch.context() as patch:  # what a Flower task process knows of itself
        patch.setattr(TaskIdentity, "_run_id", run_id)
        patch.setattr(TaskIdentity, "_node_id", 1)
        patch.setattr(TaskIdentity, "_task_id", 1)
        outcome = SecureAggregation(spec, settings.secagg, server_registry).run_round(
            AttackGrid(victim, fakes, run_id), [VICTIM_NODE, *range(101, 101 + len(fakes))], adapter, 1)
    return outcome, state


def recovered(outcome, state: Path, sites: int) -> str:
    """What the coordinator holds when the round gave it a sum: the victim's update, the others being its zeros."""
    sealed = np.load(next((state / "released").glob("*.npy")))
    error = float(np.abs(sites * outcome.mean_delta - sealed).max())
    return (f"the coordinator recovered the victim's update from the sum: max |{sites}·mean − update| = {error:.2e} "
            f"(quantisation bound {sites * outcome.details.error_bound:.2e}), ‖update‖ = {np.linalg.norm(sealed):.3g}")


def victim_failure(outcome) -> str:
    return next((f.kind for f in outcome.failures if f.site == "hospital-a"), "none")


# ----------------------------------------------------------------------------- the attacks

@pytest.mark.model  # the victim is the real ClientApp (MiniLM, DP-SGD)
def test_a_registry_whose_other_entries_are_the_coordinators_keys_recovers_nothing(world, adapter, tmp_path):
    """(a) The victim's kit lists its real peers' names and ids with the coordinator's keys, and the
    coordinator claims the digest of the real member list. The victim trains (it cannot know its
    peers before their signed bundles arrive) but verifies them against its pinned keys only: it
    refuses the share stage, never uploads, and the round yields no sum."""
    members, own = world["members"], world["coordinator"]
    kit_registry = {"hospital-a": (0, members.keys[0].public_bytes_raw()),
                    **{name: (members.ids[name], own[name].public_bytes()) for name in ("hospital-b", "clinic-c")}}
    server = FederationRegistry({name: sid for name, (sid, _) in kit_registry.items()},
                                SiteRegistry(dict(kit_registry.values())))
    server.__dict__["digest"] = members.digest  # the coordinator lies: "this is the list you confirmed"
    fakes = [CoordinatorsSite(name, sid, own[name], server) for name, sid in (("hospital-b", 1), ("clinic-c", 2))]
    outcome, state = attack(world, adapter, tmp_path, kit_registry=kit_registry, server_registry=server, fakes=fakes)
    assert outcome.mean_delta is None, recovered(outcome, state, 3)
    assert victim_failure(outcome) == "protocol"
    assert not list((state / "released").glob("*.uploaded"))  # no masked upload of the victim ever left


@pytest.mark.model  # the victim is the real ClientApp (MiniLM, DP-SGD)
@pytest.mark.parametrize("claimed", ["its own registry's", "the pinned list's"])
def test_sybils_are_refused_before_any_budget_is_spent(world, adapter, tmp_path, claimed):
    """(b) The coordinator enrols two made-up sites (`fedtune site keygen` on its own machine),
    provisions them beside the real three, and invites {victim, fake-1, fake-2}: three sites, as
    min-sites = 3 asks. The victim counts only the members it pinned: refused before training."""
    fakes_enrolled = [site_keygen(name, tmp_path / "fake-keys" / name) for name in ("fake-1", "fake-2")]
    sybil = load_registry(provision([*world["enrolments"], *fakes_enrolled], ["127.0.0.1"], tmp_path / "sybil")
                          / "server" / "registry.json")
    kit_registry = entries(sybil)
    if claimed == "the pinned list's":
        sybil.__dict__["digest"] = world["members"].digest
    fakes = [CoordinatorsSite(name, sybil.ids[name], SiteIdentity.from_pem(
        (tmp_path / "fake-keys" / name / "identity.pem").read_bytes()), sybil) for name in ("fake-1", "fake-2")]
    outcome, state = attack(world, adapter, tmp_path, kit_registry=kit_registry, server_registry=sybil, fakes=fakes)
    assert not (state / "privacy-ledger.json").exists() and not (state / "released").exists(), \
        recovered(outcome, state, 3) if outcome.mean_delta is not None else "the victim trained for a Sybil round"
    assert victim_failure(outcome) == "protocol" and outcome.mean_delta is None


def test_a_round_bound_to_another_member_list_is_refused(world, tmp_path):
    """(c) Every invited site is pinned, but the round binds another list's digest: refused. Two sites
    pinned to different lists therefore never take part in one round together."""
    members, own = world["members"], world["coordinator"]
    identity = SiteIdentity.from_pem((world["root"] / "keys" / "hospital-a" / "identity.pem").read_bytes())
    keys = SiteKeys(0, identity, members)
    other = FederationRegistry(members.ids, SiteRegistry({**members.keys.to_raw(),
                                                           1: own["hospital-b"].public_bytes()}))
    for digest, refused in ((other.digest, True), (bytes(32), True), (members.digest, False)):
        offer = params_to_bytes(round_params(RunSettings.from_flat(run_config(Path("r.json"))).secagg, run_id=5,
                                             server_round=1, site_ids=[0, 1, 2], vector_length=8,
                                             members_digest=digest))
        store = SessionStore(tmp_path / digest.hex()[:8])
        if refused:
            with pytest.raises(ParamsRefused, match="binds member list .*not the one this site pinned"):
                accept_params(offer, SitePolicy(), keys, store=store, run_id=5, server_round=1, vector_length=8)
        else:
            assert accept_params(offer, SitePolicy(), keys, store=store, run_id=5, server_round=1,
                                 vector_length=8).members_digest == members.digest


def test_the_members_digest_is_in_the_signed_parameters_and_on_the_wire():
    base = SecAggParams(round_id=b"r", site_ids=(0, 1, 2), vector_length=4, members_digest=b"\x01" * 32)
    other = SecAggParams(round_id=b"r", site_ids=(0, 1, 2), vector_length=4, members_digest=b"\x02" * 32)
    assert base.digest != other.digest  # every bundle, share and survivor signature binds it
    assert params_from_bytes(params_to_bytes(base)) == base
    for bad in (b"\x01" * 31, "0" * 64):
        with pytest.raises(ParameterError, match="members_digest"):
            SecAggParams(round_id=b"r", site_ids=(0, 1, 2), vector_length=4, members_digest=bad)  # type: ignore[arg-type]
    wire = json.loads(params_to_bytes(base))
    for bad in ("zz" * 32, "01" * 31, 5):
        with pytest.raises(ParameterError, match="malformed|members_digest"):
            params_from_bytes(json.dumps(wire | {"members_digest": bad}).encode())


def test_the_digest_covers_every_name_id_and_key(world):
    members, own = world["members"], world["coordinator"]
    raw = members.keys.to_raw()
    changed = [
        FederationRegistry({("hospital-z" if name == "clinic-c" else name): sid for name, sid in members.ids.items()},
                           members.keys),
        FederationRegistry({"hospital-a": 0, "hospital-b": 2, "clinic-c": 1}, members.keys),
        FederationRegistry(members.ids, SiteRegistry({**raw, 2: own["clinic-c"].public_bytes()})),
    ]
    assert len({members.digest, *(registry.digest for registry in changed)}) == 4


# ----------------------------------------------------------------------------- pinning, and refusing without it

def test_members_lists_the_fingerprints_and_the_digest_provisioning_printed(world, tmp_path, capsys):
    provisioned = tmp_path / "fed"
    keys = [site_keygen(site, tmp_path / "keys" / site) for site in SITES]
    assert run_cli(["provision", "--enrol", ",".join(str(tmp_path / "keys" / s / f"{s}.enrol.json") for s in SITES),
                    "--server-host", "127.0.0.1", "--out", str(provisioned)]) == 0
    printed = capsys.readouterr().out
    digest = read_aloud(load_registry(provisioned / "server" / "registry.json").digest)
    assert f"members digest: {digest}" in printed
    assert run_cli(["site", "members", str(provisioned / "sites" / "clinic-c" / "registry.json")]) == 0
    listed = capsys.readouterr().out
    assert f"members digest: {digest}" in listed
    for enrolment in keys:  # each officer finds the fingerprint its own keygen printed
        assert f"'{enrolment.site}'" in listed and enrolment.identity_fingerprint in listed


def test_pin_members_refuses_a_digest_nobody_confirmed_and_pins_the_confirmed_one(world, tmp_path, capsys):
    """(d) The officer pins with the digest every officer confirmed; any other is refused, nothing written."""
    registry = world["fed"] / "sites" / "hospital-a" / "registry.json"
    state = tmp_path / "state"
    for wrong, says in ((world["members"].digest[::-1].hex(), "nothing pinned"), ("1234", "not a members digest")):
        assert run_cli(["site", "pin-members", "--registry", str(registry), "--state", str(state),
                        "--digest", wrong]) == 2
        assert says in capsys.readouterr().err
        assert not (state / MEMBERS_FILE).exists()
    spoken = read_aloud(world["members"].digest)  # as read over the phone: groups of four, spaces allowed
    assert run_cli(["site", "pin-members", "--registry", str(registry), "--state", str(state), "--digest", spoken]) == 0
    assert "pinned 3 members" in capsys.readouterr().out
    assert stat.S_IMODE((state / MEMBERS_FILE).stat().st_mode) == 0o600 and stat.S_IMODE(state.stat().st_mode) == 0o700
    assert load_members(state).digest == world["members"].digest


def tampered(world: dict, state: Path) -> None:
    """Someone swaps clinic-c's pinned key for the coordinator's, keeping the pinned digest."""
    officer_pins(world, state)
    pinned = json.loads((state / MEMBERS_FILE).read_text())
    pinned["sites"]["clinic-c"]["identity"] = world["coordinator"]["clinic-c"].public_bytes().hex()
    (state / MEMBERS_FILE).write_text(json.dumps(pinned))


def test_a_tampered_or_missing_pin_and_a_kit_with_other_members_are_refused(world, tmp_path):
    kit, keys = world["fed"] / "sites" / "hospital-a", world["root"] / "keys" / "hospital-a"
    with pytest.raises(ProvisionError, match="pinned no member list.*fedtune site pin-members"):
        check_members(kit, keys, tmp_path / "none")
    tampered(world, tmp_path / "tampered")
    with pytest.raises(RegistryError, match="was altered"):
        load_members(tmp_path / "tampered")
    officer_pins(world, tmp_path / "open")
    (tmp_path / "open" / MEMBERS_FILE).chmod(0o666)
    with pytest.raises(ProvisionError, match="writable by group or others"):
        check_members(kit, keys, tmp_path / "open")
    other_kit = Path(shutil.copytree(kit, tmp_path / "kit"))
    write_registry(other_kit / "registry.json", entries(world["members"]) | {
        "fake-1": (3, SiteIdentity.generate().public_bytes())})
    officer_pins(world, tmp_path / "pinned")
    with pytest.raises(ProvisionError, match="lists other members .*do not start"):
        check_members(other_kit, keys, tmp_path / "pinned")
    assert check_members(kit, keys, tmp_path / "pinned").digest == world["members"].digest
    without_me = {name: entry for name, entry in entries(world["members"]).items() if name != "hospital-a"}
    write_registry(tmp_path / "without.json", without_me)
    pin_members(tmp_path / "without.json", tmp_path / "without", load_registry(tmp_path / "without.json").digest.hex())
    with pytest.raises(ProvisionError, match="not among the federation's members"):
        check_members(kit, keys, tmp_path / "without")


@pytest.mark.process
@pytest.mark.parametrize("problem, says", [
    ("not-pinned", "fedtune site pin-members --registry KIT/registry.json --state"),
    ("tampered", "was altered"),
])
def test_client_start_refuses_without_intact_pinned_members(world, tmp_path, problem, says):
    """(e) The daemon does not start without the members its officer pinned, and names the command."""
    state = tmp_path / "state"
    if problem == "tampered":
        tampered(world, state)
    kit, keys = world["fed"] / "sites" / "hospital-a", world["root"] / "keys" / "hospital-a"
    done = subprocess.run([sys.executable, "-m", "fedtune.cli", "client", "start", "--kit", str(kit), "--keys",
                           str(keys), "--data", str(world["data"]), "--state", str(state), "--superlink",
                           "127.0.0.1:1", "--labels", LABELS, "--connect-timeout", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and says in done.stderr, done.stderr


@pytest.mark.model  # the victim is the real ClientApp (MiniLM, DP-SGD)
def test_the_clientapp_refuses_a_round_without_pinned_members(world, adapter, tmp_path):
    """A site whose pin is gone (a daemon started on an old version, a state dir restored without it)
    answers `registry` and spends nothing; it never falls back to the kit's registry."""
    members = world["members"]
    fakes = [CoordinatorsSite(name, members.ids[name], SiteIdentity.generate(), members) for name in SITES[1:]]
    outcome, state = attack(world, adapter, tmp_path, kit_registry=entries(members), server_registry=members,
                            fakes=fakes, pinned=False)
    assert victim_failure(outcome) == "registry" and not (state / "privacy-ledger.json").exists()


def test_the_simulation_pins_each_sites_members(tmp_path):
    """`fedtune simulate` plays every site's officer: each simulated site pins the registry it made."""
    registry = load_registry(simulated_registry(tmp_path, 3))
    for i in range(3):
        pinned = load_members(tmp_path / "sites" / f"site-{i}")
        assert pinned.digest == registry.digest
        assert load_identity(tmp_path / "sites" / f"site-{i}", f"site-{i}", pinned)[0] == i
    assert load_registry(simulated_registry(tmp_path, 3)).digest == registry.digest  # kept across re-runs
