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
from common.secagg.messages import UnmaskRequest
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
    ) -> dict[int, dict[int, bytes]]:
        """Stage 2, client side: each live site's ciphertexts by receiver."""
        out = {}
        for site, view in routed.items():
            if site not in drop and (cts := self._call(site, ClientSession.share_keys, dict(view))) is not None:
                out[site] = cts
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
    ) -> dict[int, bytes]:
        """Stage 3: clients mask their updates; the server sums them; returns requests as bytes."""
        uploads = self.masked_uploads(inboxes, updates, counts, drop)
        return {s: r.to_bytes() for s, r in self.server.collect_masked(uploads).items()}

    def unmask_responses(
        self, requests: Mapping[int, bytes | UnmaskRequest], drop: Collection[int] = ()
    ) -> dict[int, bytes]:
        """Stage 4, client side: each live survivor's answer."""
        answers = {}
        for site, req in requests.items():
            if site not in drop and (resp := self._call(site, ClientSession.unmask, req)) is not None:
                answers[site] = resp.to_bytes()
        return answers

    def unmask(self, requests: Mapping[int, bytes | UnmaskRequest], drop: Collection[int] = ()) -> AggregateResult:
        """Stage 4: survivors answer their unmask requests; the server finishes the round."""
        return self.server.finish(self.unmask_responses(requests, drop))

    def run(
        self,
        updates: Mapping[int, npt.ArrayLike],
        counts: Mapping[int, Sequence[int]] | None = None,
        drop: Mapping[str, Collection[int]] | None = None,
    ) -> AggregateResult:
        """All four stages; ``drop`` maps "advertise"/"share"/"upload"/"unmask" to silent sites."""
        drop = drop or {}
        routed = self.advertise(drop.get("advertise", ()))
        inboxes = self.share(routed, drop.get("share", ()))
        requests = self.upload(inboxes, updates, counts, drop.get("upload", ()))
        return self.unmask(requests, drop.get("unmask", ()))

    def _call(self, site: int, stage: Callable[..., _T], *args: Any) -> _T | None:
        """Run a client stage; a typed failure means the site drops out (logged)."""
        try:
            return stage(self.clients[site], *args)
        except SecAggError as exc:
            log.warning("site %d failed a stage and drops out: %s", site, exc)
            return None
