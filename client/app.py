"""The site's ClientApp: wiring only. Logic lives in site.py, train.py, privacy.py.

Handlers reply with a typed failure (common.records.SiteFailure) instead of crashing, so the
server can log and count a site that cannot take part and the round goes on without it.
"""

from __future__ import annotations

import functools
import logging
import zlib

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.privacy import BudgetExhausted, LedgerError, PrivacyLedger
from client.site import Site, resolve_site
from client.train import TrainingError, train_locally
from common.adapter import delta, set_adapter_state, trainable_keys
from common.config import ConfigError, RunSettings
from common.data import DataError
from common.evaluation import evaluate
from common.model import ModelError, build_model
from common.records import (
    SiteFailure, TrainReply, WireError, pack_eval_reply, pack_failure, pack_train_reply, unpack_train_request,
)

log = logging.getLogger("fedtune.client")
app = ClientApp()

_FAILURE_KINDS: tuple[tuple[type[Exception], str], ...] = (
    (BudgetExhausted, "budget-exhausted"), (LedgerError, "ledger"), (DataError, "bad-data"),
    (ConfigError, "bad-config"), (ModelError, "bad-config"), (WireError, "protocol"), (TrainingError, "training-failed"),
)


@functools.lru_cache(maxsize=4)
def _site(settings: RunSettings, node_config: tuple) -> Site:
    return resolve_site(dict(node_config), settings)


def _failure_reply(msg: Message, exc: Exception) -> Message:
    kind = next(name for kind, name in _FAILURE_KINDS if isinstance(exc, kind))
    log.error("site refuses %s: %s", msg.metadata.message_type, exc)
    return Message(pack_failure(SiteFailure(kind, str(exc))), reply_to=msg)


def _prepare(msg: Message, context: Context):
    settings = RunSettings.from_flat(context.run_config)
    site = _site(settings, tuple(sorted(context.node_config.items())))
    global_state, server_round = unpack_train_request(msg.content)
    model = build_model(settings.model_path, len(site.labels), settings.lora)
    set_adapter_state(model, global_state)
    return settings, site, model, global_state, server_round


@app.train()
def train(msg: Message, context: Context) -> Message:
    try:
        settings, site, model, global_state, server_round = _prepare(msg, context)
        ledger = None
        if settings.privacy.enabled:
            ledger = PrivacyLedger(site.ledger_path, settings.privacy)
        else:
            log.warning("DIFFERENTIAL PRIVACY IS OFF at %s (privacy.enabled=false): the update is not DP", site.name)
        result = train_locally(
            model, site.train, settings.train, ledger=ledger, planned_rounds=settings.federation.rounds,
            server_round=server_round, run_id=msg.metadata.run_id,
            seed=zlib.crc32(f"{settings.data.seed}/{site.name}/{server_round}".encode()),
        )
        keys = trainable_keys(global_state, settings.lora.aggregation)
        privacy = {"site": site.name} | (ledger.report() if ledger else {"dp": "off"})
        reply = TrainReply(delta(result.adapter, global_state, keys), len(site.train), result.mean_loss,
                           result.steps, privacy)
        return Message(pack_train_reply(reply), reply_to=msg)
    except tuple(kind for kind, _ in _FAILURE_KINDS) as exc:
        return _failure_reply(msg, exc)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Federated evaluation: the global adapter on the site's own held-out examples, as counts."""
    try:
        _, site, model, _, _ = _prepare(msg, context)
        return Message(pack_eval_reply(evaluate(model, site.holdout, len(site.labels))), reply_to=msg)
    except tuple(kind for kind, _ in _FAILURE_KINDS) as exc:
        return _failure_reply(msg, exc)
