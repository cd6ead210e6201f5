"""The site's ClientApp: wiring only. Logic lives in site.py, train.py, privacy.py, release.py, secure.py.

Message types:
    query.identify       → the site's name (the server maps Flower node ids to registry sites)
    query.public_size    → distributed DP: the site's public size (declared, or its DP estimate, charged once)
    train                → check the run against the site's policy, train locally with DP (or resend
                           the update already released for this round), then either reply with the
                           update (plain aggregation) or sign round keys (secure stage 1)
    train.secagg_share   → stage 2: commitments, and Shamir shares for the mask partners, encrypted to each
    train.secagg_mask    → stage 3: the masked contribution, masked only with dealers whose shares check
    train.secagg_confirm → stage 4: sign the survivor list (consistency check)
    train.secagg_unmask  → stage 5: shares for survivors XOR dropped sites, after t signatures on one list

What leaves the site: the DP update (masked, under secure aggregation; in distributed DP mode its noisy integer
gradient sum mod 2^b, client.distributed_step, and its public size), in an evaluation round its noisy
evaluation counts (in the same secure sum: client.site_eval), a public weight, and in the clear its ε and δ.
Every handler replies with a typed failure (a kind and a fixed message,
common.records.SiteFailure) instead of crashing; the details stay in the site's own log.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.canaries import audit_round
from client.distributed_step import distributed_contribution
from client.policy import PolicyError
from client.privacy import BudgetExhausted, LedgerError, PrivacyLedger
from client.release import ReleasedUpdates, adapter_digest
from client.rollback import ReceiptStore, check_not_rolled_back
from client.secure import (
    SessionStore,
    SiteKeys,
    accept_params,
    stage_advertise,
    stage_advertise_ring,
    stage_confirm,
    stage_mask,
    stage_share,
    stage_unmask,
)
from client.site import Site, resolve_site
from client.site_eval import evaluation_release
from client.train import TrainingError, public_size, train_locally
from common.adapter import AdapterState, delta, set_adapter_state, trainable_keys
from common.audit import AuditLog
from common.config import ConfigError, RunSettings, unit_name
from common.data import DataError
from common.distributed_dp import DistributedDpError, rotation_seed, site_share
from common.distributed_round import ring_round
from common.federated_eval import plan_evaluation
from common.files import default_receipts_dir
from common.library_noise import start_process_log
from common.model import ModelError, Placement, build_model, resolve_device
from common.privacy_audit import AuditError, run_audit
from common.records import (
    KeyAdvertisement,
    PrivacyReport,
    PublicSize,
    SiteFailure,
    TrainReply,
    WireError,
    pack_failure,
    pack_identity,
    pack_key_advertisement,
    pack_public_size,
    pack_stage,
    pack_train_reply,
    unpack_receipt,
    unpack_round_noise,
    unpack_size_query,
    unpack_stage,
    unpack_train_request,
)
from common.registry import RegistryError, load_identity, load_members
from common.secagg import SecAggError
from common.secure_update import params_from_bytes, site_weight

log = logging.getLogger("fedtune.client")
app = ClientApp()


@app.lifespan()
def lifespan(context: Context) -> Iterator[None]:
    start_process_log()  # the site's log: where Flower sends this process's stderr
    yield

# The kinds a reply can carry. None depends on any single unit (so none is a channel past ε): each is a
# function of the site's policy, the run config, the ledger (what was charged, from the plan), the protocol
# messages, or the whole data file's validity (checked when the site starts and before anything is spent). Under
# DP, training cannot fail on one unit: a unit whose gradient is not finite contributes zero, a pass that raises
# is retried unit by unit (a unit that raises alone contributes zero), passes are bounded by a token budget and
# the site's max-rows-per-unit, and a pass on public rows first makes a model that cannot train fail as a whole.
# What remains of "training-failed" — no data, no parameter changed, non-finite weights after the round — is a
# function of the data's size and of the noised steps alone (post-processing of the DP release, covered by ε);
# "internal" is what fails outside any unit's pass (code, device, files).
_FAILURE_KINDS: tuple[tuple[type[Exception], str], ...] = (
    (BudgetExhausted, "budget-exhausted"), (LedgerError, "ledger"), (PolicyError, "site-policy"),
    (DataError, "bad-data"), (ConfigError, "bad-config"), (ModelError, "bad-config"), (RegistryError, "registry"),
    (WireError, "protocol"), (SecAggError, "protocol"), (TrainingError, "training-failed"), (AuditError, "bad-config"),
    (DistributedDpError, "bad-config"),
)


def _replying_failures(handler: Callable[[Message, Context], RecordDict]) -> Callable[[Message, Context], Message]:
    """Any exception becomes a typed failure reply with a fixed message; the details go to the site's log only
    (an exception's text may name a record)."""
    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return Message(handler(msg, context), reply_to=msg)
        except Exception as exc:  # nothing but the kind may leave the site
            kind = next((name for cls, name in _FAILURE_KINDS if isinstance(exc, cls)), "internal")
            log.error("site refuses %s (%s): %s", msg.metadata.message_type, kind, exc,
                      exc_info=kind == "internal")
            return Message(pack_failure(SiteFailure(kind)), reply_to=msg)
    return wrapped


@functools.lru_cache(maxsize=4)
def _site(settings: RunSettings, node_config: tuple) -> Site:
    return resolve_site(dict(node_config), settings)


def _settings_and_site(context: Context) -> tuple[RunSettings, Site]:
    settings = RunSettings.from_flat(context.run_config)
    return settings, _site(settings, tuple(sorted(context.node_config.items())))


def _keys(site: Site) -> SiteKeys:
    """The site's identity and the member list it pinned itself: peers are verified only against that list,
    never against a registry the coordinator ships."""
    members = load_members(site.state_dir)
    site_id, identity = load_identity(site.keys_dir, site.name, members)
    return SiteKeys(site_id, identity, members)


@app.query("identify")
@_replying_failures
def identify(msg: Message, context: Context) -> RecordDict:
    _, site = _settings_and_site(context)
    return pack_identity(site.name)


def _opened_ledger(site: Site, settings: RunSettings, msg: Message) -> PrivacyLedger | None:
    """The site's ledger (None without DP), once it accounts for everything the site's state and the
    coordinator's receipts (this request's included) show it spent; LedgerError otherwise."""
    receipts = ReceiptStore(site.receipts_dir or default_receipts_dir(site.state_dir), site.name, site.passport_key)
    receipts.keep(unpack_receipt(msg.content))
    if not settings.privacy.enabled:
        return None
    ledger = PrivacyLedger(site.ledger_path, settings.privacy)
    check_not_rolled_back(ledger, site.state_dir, receipts)
    return ledger


def _received_model(site: Site, settings: RunSettings, received: AdapterState) -> torch.nn.Module:
    """The site's base model with the adapter it received: what it evaluates, then trains, in one round."""
    model = build_model(site.policy.model_path, len(site.labels), settings.lora, site.policy.task,
                        Placement(resolve_device(site.policy.device), nf4=site.policy.quantize == "nf4"))
    set_adapter_state(model, received)
    return model


def _released_update(site: Site, settings: RunSettings, ledger: PrivacyLedger | None, received: AdapterState,
                     server_round: int, run_id: int, public_units: int,
                     received_model: Callable[[], torch.nn.Module]) -> tuple[np.ndarray, str, bool]:
    """(the round's DP update, its release name, whether it is resent): the update already released for this
    (round, adapter) if it never entered a secure sum, else a freshly trained one, planned from the site's
    public size.

    With DP the round is charged to the ledger before training starts (write-ahead, in train_locally).
    """
    keys_order = trainable_keys(received, settings.lora.aggregation)
    digest = adapter_digest(received)
    released = ReleasedUpdates(site.state_dir)
    update = released.find(server_round, digest)
    if update is not None:
        log.info("%s: round %d was already released for this adapter; resending it (no new ε)", site.name,
                 server_round)
        return update, released.name(server_round, digest), True
    if ledger is None:
        log.warning("DIFFERENTIAL PRIVACY IS OFF at %s (privacy.enabled=false): the update is not DP", site.name)
        if site.policy.audit_canaries:
            log.warning("%s: no privacy audit in a run without DP (its canaries go in the DP-SGD step)", site.name)
    started = time.monotonic()
    model = received_model()
    canaries = (audit_round(site.state_dir, run_id=run_id, server_round=server_round, model=model,
                            count=site.policy.audit_canaries, delta=settings.privacy.delta,
                            epsilon_accounted=ledger.spent())
                if site.policy.audit_canaries and ledger is not None else ())
    result = train_locally(model, site.train, site.policy.train_settings(settings), ledger=ledger,
                           privacy=settings.privacy, planned_rounds=settings.federation.rounds,
                           server_round=server_round, run_id=run_id, public_units=public_units, canaries=canaries)
    update = delta(result.adapter, received, keys_order)
    name = released.seal(server_round, digest, update, run_id=run_id, epsilon=result.epsilon)
    log.info("%s: trained round %d in %.2fs", site.name, server_round, time.monotonic() - started)
    AuditLog(site.state_dir / "audit.jsonl").record(
        "released", run_id=run_id, round=server_round, received_sha256=digest, examples=len(site.train),
        steps=result.steps, epsilon=result.epsilon, secure_aggregation=settings.federation.secure_aggregation)
    return update, name, False


@app.query("public_size")
@_replying_failures
def public_size_query(msg: Message, context: Context) -> RecordDict:
    """Distributed DP: the site's public size, from which the round's public plan is computed (the run's policy is
    checked first, and the sites asked against its min-honest-sites; a site that declares no size draws its DP
    estimate here, once, charged before it leaves), and the honest sites it assumes (the round's h is the fewest)."""
    settings, site = _settings_and_site(context)
    site.policy.check(settings)
    if settings.privacy.dp_mode != "distributed":
        raise WireError("a public-size query in a run that is not in distributed DP mode")
    server_round, sites = unpack_size_query(msg.content)
    site.policy.check_participants(sites, threshold=1)  # the round's threshold (≤ sites) is checked at train
    ledger = _opened_ledger(site, settings, msg)
    units = public_size(site.train.unit_count, site.policy.declared_examples, ledger, run_id=msg.metadata.run_id,
                        server_round=server_round)
    return pack_public_size(PublicSize(units, site.policy.min_honest_sites or 0))


@app.train()
@_replying_failures
def train(msg: Message, context: Context) -> RecordDict:
    settings, site = _settings_and_site(context)
    site.policy.check(settings)  # everything the site's size does not decide: before anything is spent
    received, server_round, secagg_params = unpack_train_request(msg.content)
    run_id = msg.metadata.run_id
    secure = settings.federation.secure_aggregation
    if secure != (secagg_params is not None):
        raise WireError("the train request does not match the run's aggregation mode")
    ledger = _opened_ledger(site, settings, msg)  # a rolled-back ledger is refused before anything is spent
    if settings.privacy.dp_mode == "distributed":
        assert ledger is not None  # the run config refuses distributed DP without DP
        return _distributed_step(msg, site, settings, ledger, received, server_round, secagg_params)
    params, keys, store = None, None, SessionStore(site.state_dir)
    evaluation_plan = plan_evaluation(settings)
    if secure:  # the round's parameters (members, graph, threshold) meet the site's policy BEFORE any budget is spent
        keys = _keys(site)
        size = sum(received[k].size for k in trainable_keys(received, settings.lora.aggregation))
        params = accept_params(secagg_params, site.policy, keys, store=store, run_id=run_id,
                               server_round=server_round, vector_length=size,
                               count_slots=evaluation_plan.slots_in(server_round) if evaluation_plan else 0)
    else:
        store.claim_round(run_id, server_round)  # rounds strictly increase per run, plain or secure
    units = public_size(site.train.unit_count, site.policy.declared_examples, ledger, run_id=run_id,
                        server_round=server_round)  # declared, or the DP estimate (drawn once, charged)
    site.policy.check_plan(settings, units)  # δ's default ceiling and the steps, from the public size only
    received_model = functools.cache(functools.partial(_received_model, site, settings, received))  # built once
    counts = (evaluation_release(site, settings, evaluation_plan, ledger, received, received_model, run_id=run_id,
                                 server_round=server_round)  # the model it received, before it trains
              if evaluation_plan and evaluation_plan.evaluates(server_round) else [])
    update, release, resent = _released_update(site, settings, ledger, received, server_round, run_id, units,
                                               received_model)
    weight = site_weight(site.policy.declared_examples, settings.secagg)
    audit = run_audit(site.state_dir, run_id)  # the site's privacy audit of the adapters received so far
    privacy = (PrivacyReport(site.name, True, **ledger.report(), unit=unit_name(site.policy.privacy_unit),
                             resent=resent, **(audit.report() if audit else {})) if ledger
               else PrivacyReport(site.name, False, resent=resent))
    if keys is None or params is None:
        log.warning("PLAIN AGGREGATION: %s sends its update in the clear to the server", site.name)
        return pack_train_reply(TrainReply(update, weight, privacy, tuple(counts)))
    bundle = stage_advertise(store, params, keys, update, weight, settings.secagg, release=release, counts=counts)
    return pack_key_advertisement(KeyAdvertisement(params.round_id, bundle, weight, privacy))


def _distributed_step(msg: Message, site: Site, settings: RunSettings, ledger: PrivacyLedger, received: AdapterState,
                      server_round: int, secagg_params: object) -> RecordDict:
    """One step of distributed DP-SGD (common/distributed_round.py): the round's public plan from the run config,
    the round's sites and their public total; this site's share μ/h of the noise for h its own assumption of honest
    sites (refusing a round of fewer sites); the step charged write-ahead; its noisy integer sum uploaded in ring
    mode. Nothing is resent: a repeated round is refused by the session store (rounds strictly increase)."""
    run_id = msg.metadata.run_id
    keys_order = trainable_keys(received, settings.lora.aggregation)
    offered = params_from_bytes(secagg_params) if isinstance(secagg_params, bytes) else None
    if offered is None:
        raise WireError("a distributed-DP round without secure-aggregation parameters")
    units = public_size(site.train.unit_count, site.policy.declared_examples, ledger, run_id=run_id,
                        server_round=server_round)  # drawn (and charged) at the size query: the same ñ
    noise = unpack_round_noise(msg.content)
    if noise.public_total < units:
        raise WireError(f"the sites' public total {noise.public_total} is below this site's own public size")
    site.policy.check_participants(offered.n_sites, offered.threshold)  # before anything is spent
    site.policy.check_noise_share(noise.honest_sites, offered.threshold)
    ring = ring_round(settings, dimension=sum(received[k].size for k in keys_order), sites=offered.n_sites,
                      public_total=noise.public_total, server_round=server_round)
    keys, store = _keys(site), SessionStore(site.state_dir)
    params = accept_params(secagg_params, site.policy, keys, store=store, run_id=run_id, server_round=server_round,
                           vector_length=ring.vector_length, ring_bits=ring.plan.ring_bits,
                           noise_plan=ring.digest(noise.honest_sites))  # every site of the round adds the same share
    plan = site_share(ring.plan, noise.honest_sites)
    if site.policy.audit_canaries:
        log.warning("%s: no privacy audit in distributed DP mode (its canaries go in the local DP-SGD step)", site.name)
    received_model = functools.cache(functools.partial(_received_model, site, settings, received))  # built once
    counts = (evaluation_release(site, settings, ring.evaluation.shared(noise.honest_sites), ledger, received,
                                 received_model, run_id=run_id, server_round=server_round)  # charged, then scored
              if ring.evaluation else [])  # its share of the evaluation noise, as of the gradient's
    entry = ledger.charge_distributed(run_id=run_id, server_round=server_round, plan=plan)  # write-ahead
    started = time.monotonic()
    step = distributed_contribution(received_model(), site.train, plan, keys=keys_order,
                                    seed=rotation_seed(run_id, server_round),
                                    settings=site.policy.train_settings(settings))
    upload = np.concatenate([step, np.asarray(counts, dtype=np.uint64)])  # the counts after the d' coordinates
    assumed = site.policy.honest_sites(params.threshold)
    log.info("%s: distributed step of round %d in %.2fs (its noise share: 1/%d of the target's; it assumes %d honest "
             "sites)", site.name, server_round, time.monotonic() - started, noise.honest_sites, assumed)
    AuditLog(site.state_dir / "audit.jsonl").record(
        "released", run_id=run_id, round=server_round, received_sha256=adapter_digest(received), examples=units,
        steps=1, epsilon=entry.epsilon, secure_aggregation=True, dp_mode="distributed", honest_sites=assumed,
        noise_share_sites=noise.honest_sites)
    privacy = PrivacyReport(site.name, True, **ledger.report(), unit=unit_name(site.policy.privacy_unit))
    bundle = stage_advertise_ring(store, params, keys, upload, min_survivors=assumed)  # never unmasked in fewer
    return pack_key_advertisement(KeyAdvertisement(params.round_id, bundle,
                                                   site_weight(site.policy.declared_examples, settings.secagg),
                                                   privacy))


def _secure_stage(stage: Callable, msg: Message, context: Context) -> RecordDict:
    _, site = _settings_and_site(context)
    round_id, blobs = unpack_stage(msg.content)
    answer = stage(SessionStore(site.state_dir), round_id, _keys(site), blobs)
    return pack_stage(round_id, answer if isinstance(answer, dict) else {"payload": answer})


@app.train("secagg_share")
@_replying_failures
def share(msg: Message, context: Context) -> RecordDict:
    return _secure_stage(stage_share, msg, context)


@app.train("secagg_mask")
@_replying_failures
def mask(msg: Message, context: Context) -> RecordDict:
    return _secure_stage(stage_mask, msg, context)


@app.train("secagg_confirm")
@_replying_failures
def confirm(msg: Message, context: Context) -> RecordDict:
    return _secure_stage(stage_confirm, msg, context)


@app.train("secagg_unmask")
@_replying_failures
def unmask(msg: Message, context: Context) -> RecordDict:
    return _secure_stage(stage_unmask, msg, context)

