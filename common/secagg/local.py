"""In-memory driver: the server and every client of one round in one process, for tests and demos.

Everything crosses a simulated wire as bytes, through the same codecs a deployment uses. Each
stage is a method so tests can drop sites or tamper with messages between stages; a client
that fails a stage (typed error) is treated as dropped, the way a real server would see it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy.typing as npt

from common.secagg.client import ClientSession
from common.secagg.errors import SecAggError
from common.secagg.identity import SiteIdentity, SiteRegistry
from common.secagg.messages import SurvivorSet, UnmaskRequest
from common.secagg.protocol import SecAggParams
from common.secagg.server import AggregateResult, ServerAggregator

__all__ = ["LocalFederation"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


@dataclass
class LocalFederation:
    """A server and its clients for one round, wired together in memory."""

    params: SecAggParams
    registry: SiteRegistry
    clients: dict[int, ClientSession]
    server: ServerAggregator

    @classmethod
    def create(
        cls, params: SecAggParams, identities: Mapping[int, SiteIdentity] | None = None
    ) -> LocalFederation:
        """Sessions for every invited site; fresh identities unless given."""
        ids = dict(identities or {s: SiteIdentity.generate() for s in params.site_ids})
        registry = SiteRegistry({s: ident.public_bytes() for s, ident in ids.items()})
        clients = {s: ClientSession(params, s, ids[s], registry) for s in params.site_ids}
        return cls(params, registry, clients, ServerAggregator(params, registry))

    def advertise(self, drop: Collection[int] = ()) -> dict[int, dict[int, bytes]]:
        """Stage 1 up and down: each live site's view of its neighbours' bundles, as bytes."""
        up = {s: c.advertise_keys().to_bytes() for s, c in self.clients.items() if s not in drop}
        routed = self.server.collect_bundles(up)
        return {s: {p: b.to_bytes() for p, b in view.items()} for s, view in routed.items()}

    def share_outgoing(
        self, routed: Mapping[int, Mapping[int, bytes]], drop: Collection[int] = ()
    ) -> dict[int, bytes]:
        """Stage 2, client side: each live site's deal (commitments and ciphertexts by receiver), as bytes."""
        out = {}
        for site, view in routed.items():
            if site not in drop and (deal := self._call(site, ClientSession.share_keys, dict(view))) is not None:
                out[site] = deal.to_bytes()
        return out

    def share(
        self, routed: Mapping[int, Mapping[int, bytes]], drop: Collection[int] = ()
    ) -> dict[int, dict[int, bytes]]:
        """Stage 2: clients share keys; the server routes ciphertexts into inboxes."""
        return self.server.route_shares(self.share_outgoing(routed, drop))

    def masked_uploads(
        self,
        inboxes: Mapping[int, Mapping[int, bytes]],
        updates: Mapping[int, npt.ArrayLike],
        counts: Mapping[int, Sequence[int]] | None = None,
        drop: Collection[int] = (),
    ) -> dict[int, bytes]:
        """Stage 3, client side: each live site's masked upload."""
        up = {}
        for site, inbox in inboxes.items():
            if site in drop:
                continue
            slots = (counts or {}).get(site, ())
            blob = self._call(site, ClientSession.masked_input, dict(inbox), updates[site], slots)
            if blob is not None:
                up[site] = blob
        return up

    def upload(
        self,
        inboxes: Mapping[int, Mapping[int, bytes]],
        updates: Mapping[int, npt.ArrayLike],
        counts: Mapping[int, Sequence[int]] | None = None,
        drop: Collection[int] = (),
    ) -> SurvivorSet:
        """Stage 3: clients mask their updates; the server sums them and fixes the survivor set."""
        return self.server.collect_masked(self.masked_uploads(inboxes, updates, counts, drop))

    def signatures(self, survivors: SurvivorSet | Mapping[int, bytes], drop: Collection[int] = ()) -> dict[int, bytes]:
        """Stage 4, client side: each live survivor's signature on the survivor set it is shown
        (one set for all, or a per-site map of serialised sets to play a split-view server)."""
        out = {}
        for site in sorted(self.clients):
            shown = survivors.get(site) if isinstance(survivors, Mapping) else survivors.to_bytes()
            if site in drop or shown is None:
                continue
            if isinstance(survivors, SurvivorSet) and site not in survivors.survivors:
                continue
            if (sig := self._call(site, ClientSession.confirm_survivors, shown)) is not None:
                out[site] = sig
        return out

    def confirm(self, survivors: SurvivorSet, drop: Collection[int] = ()) -> UnmaskRequest:
        """Stage 4: survivors sign the survivor set; the server builds the one unmask request."""
        return self.server.collect_confirmations(self.signatures(survivors, drop))

    def unmask_responses(self, request: UnmaskRequest | bytes, drop: Collection[int] = (),
                         to: Collection[int] | None = None) -> dict[int, bytes]:
        """Stage 5, client side: each live signer's answer to the (single) unmask request."""
        req = request if isinstance(request, UnmaskRequest) else UnmaskRequest.from_bytes(request)
        answers = {}
        for site in sorted(req.signatures if to is None else to):
            if site not in drop and (resp := self._call(site, ClientSession.unmask, req.to_bytes())) is not None:
                answers[site] = resp.to_bytes()
        return answers

    def unmask(self, request: UnmaskRequest | bytes, drop: Collection[int] = ()) -> AggregateResult:
        """Stage 5: signers answer the unmask request; the server finishes the round."""
        return self.server.finish(self.unmask_responses(request, drop))

    def run(
        self,
        updates: Mapping[int, npt.ArrayLike],
        counts: Mapping[int, Sequence[int]] | None = None,
        drop: Mapping[str, Collection[int]] | None = None,
    ) -> AggregateResult:
        """All stages; ``drop`` maps "advertise"/"share"/"upload"/"confirm"/"unmask" to silent sites."""
        drop = drop or {}
        routed = self.advertise(drop.get("advertise", ()))
        inboxes = self.share(routed, drop.get("share", ()))
        survivors = self.upload(inboxes, updates, counts, drop.get("upload", ()))
        request = self.confirm(survivors, drop.get("confirm", ()))
        return self.unmask(request, drop.get("unmask", ()))

    def _call(self, site: int, stage: Callable[..., _T], *args: Any) -> _T | None:
        """Run a client stage; a typed failure means the site drops out (logged)."""
        try:
            return stage(self.clients[site], *args)
        except SecAggError as exc:
            log.warning("site %d failed a stage and drops out: %s", site, exc)
            return None
