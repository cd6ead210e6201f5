"""The site's ClientApp: wiring only. Logic lives in site.py, train.py, privacy.py, secure.py.

Message types:
    query.identify      → the site's name (the server maps Flower node ids to registry sites)
    train               → evaluate the received global adapter, train locally (DP), then either reply
                          with the update (plain aggregation) or sign round keys (secure stage 1)
    train.secagg_share  → stage 2: Shamir shares for the neighbours, encrypted to each of them
    train.secagg_mask   → stage 3: the masked contribution
    train.secagg_unmask → stage 4: the shares the server may have for survivors XOR dropped sites

Every handler replies with a typed failure (common.records.SiteFailure) instead of crashing,
so the server can log and count a site that cannot take part.
"""

from __future__ import annotations

import functools
import logging
import zlib
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.privacy import BudgetExhausted, LedgerError, PrivacyLedger
from client.secure import (
    SessionStore, SiteKeys, accept_params, stage_advertise, stage_mask, stage_share, stage_unmask,
)
from client.site import PolicyError, Site, resolve_site
from client.train import TrainingError, train_locally
from common.adapter import delta, set_adapter_state, trainable_keys
from common.audit import AuditLog
from common.config import ConfigError, RunSettings
from common.data import DataError
from common.evaluation import evaluate
from common.model import ModelError, build_model
from common.records import (
    SiteFailure, TrainReply, WireError, pack_failure, pack_privacy, pack_stage, pack_train_reply,
    unpack_stage, unpack_train_request,
)
from common.registry import RegistryError, load_identity, load_registry
from common.secagg import SecAggError
from common.secure_update import Contribution

log = logging.getLogger("fedtune.client")
app = ClientApp()

_FAILURE_KINDS: tuple[tuple[type[Exception], str], ...] = (
    (BudgetExhausted, "budget-exhausted"), (LedgerError, "ledger"), (PolicyError, "site-policy"), (DataError, "bad-data"),
    (ConfigError, "bad-config"), (ModelError, "bad-config"), (RegistryError, "registry"),
    (WireError, "protocol"), (SecAggError, "protocol"), (TrainingError, "training-failed"),
)
_HANDLED = tuple(kind for kind, _ in _FAILURE_KINDS)


def _replying_failures(handler: Callable[[Message, Context], RecordDict]) -> Callable[[Message, Context], Message]:
    @functools.wraps(handler)
    def wrapped(msg: Message, context: Context) -> Message:
        try:
            return Message(handler(msg, context), reply_to=msg)
        except _HANDLED as exc:
            kind = next(name for cls, name in _FAILURE_KINDS if isinstance(exc, cls))
            log.error("site refuses %s: %s", msg.metadata.message_type, exc)
            return Message(pack_failure(SiteFailure(kind, str(exc))), reply_to=msg)
    return wrapped


@functools.lru_cache(maxsize=4)
def _site(settings: RunSettings, node_config: tuple) -> Site:
    return resolve_site(dict(node_config), settings)


def _settings_and_site(context: Context) -> tuple[RunSettings, Site]:
    settings = RunSettings.from_flat(context.run_config)
    return settings, _site(settings, tuple(sorted(context.node_config.items())))


def _keys(settings: RunSettings, site: Site) -> SiteKeys:
    registry = load_registry(site.registry_path or settings.secagg.registry)
    site_id, identity = load_identity(site.keys_dir, site.name, registry)
    return SiteKeys(site_id, identity, registry)


@app.query("identify")
@_replying_failures
def identify(msg: Message, context: Context) -> RecordDict:
    _, site = _settings_and_site(context)
    return RecordDict({"site": ConfigRecord({"name": site.name})})


@app.train()
@_replying_failures
def train(msg: Message, context: Context) -> RecordDict:
    settings, site = _settings_and_site(context)
    site.policy.check(settings)
    global_state, server_round, secagg_params = unpack_train_request(msg.content)
    secure = settings.federation.secure_aggregation
    if secure and secagg_params is None:
        raise WireError("this federation requires secure aggregation, but the server asked for a plain update")
    keys = _keys(settings, site) if secure else None
    model = build_model(settings.model_path, len(site.labels), settings.lora)
    set_adapter_state(model, global_state)
    evaluation = evaluate(model, site.holdout, len(site.labels))  # federated evaluation of what we received
    keys_order = trainable_keys(global_state, settings.lora.aggregation)
    params = None
    if keys is not None:  # check the round's parameters BEFORE spending any privacy budget on it
        params = accept_params(secagg_params, settings, keys, run_id=msg.metadata.run_id, server_round=server_round,
                               vector_length=sum(global_state[k].size for k in keys_order),
                               num_labels=len(site.labels))
    ledger = PrivacyLedger(site.ledger_path, settings.privacy) if settings.privacy.enabled else None
    if ledger is None:
        log.warning("DIFFERENTIAL PRIVACY IS OFF at %s (privacy.enabled=false): the update is not DP", site.name)
    result = train_locally(
        model, site.train, settings.train, ledger=ledger, planned_rounds=settings.federation.rounds,
        server_round=server_round, run_id=msg.metadata.run_id,
        seed=zlib.crc32(f"{settings.data.seed}/{site.name}/{server_round}".encode()),
    )
    AuditLog(site.state_dir / "audit.jsonl").record(
        "trained", run_id=msg.metadata.run_id, round=server_round, examples=len(site.train), steps=result.steps,
        epsilon=result.epsilon, secure_aggregation=keys is not None)
    update = delta(result.adapter, global_state, keys_order)
    privacy = {"site": site.name} | (ledger.report() if ledger else {"dp": "off"})
    if keys is None:
        log.warning("PLAIN AGGREGATION: %s sends its update in the clear to the server", site.name)
        return pack_train_reply(TrainReply(update, len(site.train), result.mean_loss, result.steps, evaluation, privacy))
    contribution = Contribution(update, len(site.train), result.mean_loss, evaluation)
    bundle = stage_advertise(SessionStore(site.state_dir), params, keys, contribution, settings)
    reply = pack_stage(params.round_id, {"bundle": bundle})
    reply["privacy"] = pack_privacy(privacy)
    return reply


def _secure_stage(stage: Callable, msg: Message, context: Context) -> RecordDict:
    settings, site = _settings_and_site(context)
    round_id, blobs = unpack_stage(msg.content)
    answer = stage(SessionStore(site.state_dir), round_id, _keys(settings, site), blobs)
    return pack_stage(round_id, answer if isinstance(answer, dict) else {"payload": answer})


@app.train("secagg_share")
@_replying_failures
def share(msg: Message, context: Context) -> RecordDict:
    return _secure_stage(stage_share, msg, context)


@app.train("secagg_mask")
@_replying_failures
def mask(msg: Message, context: Context) -> RecordDict:
    return _secure_stage(stage_mask, msg, context)


@app.train("secagg_unmask")
@_replying_failures
def unmask(msg: Message, context: Context) -> RecordDict:
    return _secure_stage(lambda store, rid, keys, blobs: stage_unmask(store, rid, keys, blobs["payload"]), msg, context)
