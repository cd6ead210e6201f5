"""Public parameters of a secure-aggregation round, its neighbour graph, and its stages.

The server offers a :class:`SecAggParams`; each site checks it against its OWN policy
(client/secure.accept_params) and every signature of the round binds :attr:`SecAggParams.digest`,
so two honest sites never act on different parameters.

The neighbour graph: complete (every pair masks) unless ``degree < n - 1``. A sparse graph is
placed on a ring by :func:`graph_seed`, a hash of EVERY invited site's signed stage-1 key bundle
(fresh per-site keys, signed before any site sees the graph), never by the server-chosen round id.
Residual limit: a colluding site that answers stage 1 last can grind its own bundle against the
others' (the server relays bundles, so colluders see them first); only a commit-reveal exchange
would stop that. A server alone can only abort the whole round (a sparse round needs every
invited site's bundle) and start a new, strictly later one, which costs every site a round.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from common.secagg.errors import ParameterError
from common.secagg.fixedpoint import (
    MAX_MODULUS_BITS,
    MAX_VALUE_BITS,
    Rounding,
    choose_modulus_bits,
    packed_size,
    quantization_step,
)
from common.secagg.prg import encode_context

__all__ = [
    "MAX_SITE_ID",
    "SecAggParams",
    "Stage",
    "default_degree",
    "default_threshold",
    "graph_seed",
    "neighbour_graph",
]

MAX_SITE_ID = (1 << 32) - 2
"""Site ids are in ``[0, MAX_SITE_ID]``; a site's Shamir x-coordinate is ``site_id + 1``."""


class Stage(enum.IntEnum):
    """Client stages, in order. A session only moves forward, or to ``ABORTED``.

    ``DONE``: unmask answered, every secret of the round wiped (so are they at ``ABORTED``).
    """

    NEW = 0
    ADVERTISED = 1
    SHARED = 2
    MASKED = 3
    CONFIRMED = 4
    DONE = 5
    ABORTED = 6


def default_degree(n_sites: int) -> int:
    """``min(n - 1, 2 * ceil(log2 n))``: O(log n) neighbours (Bell et al. 2020), always even
    when the graph is not complete."""
    return min(n_sites - 1, 2 * math.ceil(math.log2(n_sites)))


def default_threshold(holders: int) -> int:
    """``floor(2h / 3) + 1`` for ``h`` share holders (a site's ``k`` neighbours and itself).

    Privacy: an honest holder reveals only one of a site's two secrets (self-mask secret or mask
    key), so a server needs ``t`` holders for each; with ``c`` colluding holders that needs
    ``2t - c <= h``, impossible while ``c < h / 3`` because ``t > 2h / 3``. Liveness: the round
    survives up to ``h - t`` (about ``h / 3``) dropped holders per neighbourhood.
    """
    return (2 * holders) // 3 + 1


def graph_seed(params_digest: bytes, bundles: Sequence[bytes]) -> bytes:
    """Seed of a sparse graph: SHA-256 over the params digest and every invited site's signed
    bundle (wire bytes, in site-id order). Each site computes it itself from verified bundles."""
    return hashlib.sha256(encode_context("graph-seed", params_digest, *bundles)).digest()


def neighbour_graph(site_ids: tuple[int, ...], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Deterministic symmetric ``degree``-regular graph (a Harary circulant) over the sites.

    Sites are placed on a ring in the order of ``SHA-256(seed, site id)`` and each is joined
    to the ``degree / 2`` nearest sites on either side. ``degree >= n - 1`` gives all pairs.
    """
    n = len(site_ids)
    if degree >= n - 1:
        return {s: frozenset(site_ids) - {s} for s in site_ids}
    if degree < 2 or degree % 2:
        raise ParameterError(f"a sparse graph needs an even degree >= 2, got {degree}")
    ring = sorted(site_ids, key=lambda s: hashlib.sha256(encode_context("graph", seed, s)).digest())
    half = degree // 2
    graph: dict[int, frozenset[int]] = {}
    for pos, site in enumerate(ring):
        graph[site] = frozenset(ring[(pos + d) % n] for d in range(-half, half + 1) if d)
    return graph


@dataclass(frozen=True)
class SecAggParams:
    """Public, validated parameters of one round (identical at every party)."""

    round_id: bytes
    """Unique per round and run (e.g. ``b"run-7/round-3"``); a ``str`` is UTF-8 encoded at runtime."""
    site_ids: tuple[int, ...]
    """Sites invited to the round, each in ``[0, MAX_SITE_ID]``; stored sorted."""
    vector_length: int
    """L: number of float values per contribution (the adapter delta)."""
    clip: float = 1.0
    """L2 clip of a contribution; every value lies in ``[-clip, clip]``."""
    value_bits: int = 20
    """Quantisation levels per value: ``2**value_bits``."""
    count_slots: int = 0
    """C: integer slots summed exactly after the values (example count, metric sums)."""
    max_count: int = (1 << 20) - 1
    """Largest value of one count slot at one site."""
    degree: int = 0
    """k: neighbours per site; 0 = :func:`default_degree`. Even unless the graph is complete."""
    threshold: int = 0
    """t: shares needed to recover a secret; 0 = :func:`default_threshold`."""
    all_pairs: bool = False
    """Mask every pair of sites (original SecAgg, O(n^2)); set whenever ``degree == n - 1``."""
    rounding: Rounding = "stochastic"
    """Quantiser rounding; "stochastic" is unbiased, "nearest" halves the worst-case error."""
    modulus_bits: int = 0
    """m: masks live in Z_{2^m}; 0 = the smallest width that cannot wrap for these sites."""
    members_digest: bytes = bytes(32)
    """SHA-256 of the member list the sites pinned (common.registry); all zero = none bound (library use)."""
    ring_bits: int = 0
    """b > 0: ring mode. Each site's vector is already ``vector_length`` integers mod 2^b (distributed DP's noisy
    integer sums, common/distributed_dp.py: it sizes b so that the sum wraps with negligible probability), so there
    is no fixed-point quantisation, no count slot and no clamping; masks live in Z_{2^b} (``modulus_bits = b``) and
    the result is the sum mod 2^b. 0 = the fixed-point mode above."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if isinstance(self.round_id, str):
            set_(self, "round_id", self.round_id.encode("utf-8"))
        if not self.round_id or len(self.round_id) > 0xFFFF:
            raise ParameterError("round_id must be 1 to 65535 bytes")
        ids = tuple(sorted(int(s) for s in self.site_ids))
        if len(set(ids)) != len(ids):
            raise ParameterError("site_ids contain duplicates")
        if len(ids) < 2:
            raise ParameterError(f"secure aggregation needs at least 2 sites, got {len(ids)}")
        if ids[0] < 0 or ids[-1] > MAX_SITE_ID:
            raise ParameterError(f"site ids must be in [0, {MAX_SITE_ID}]")
        set_(self, "site_ids", ids)
        n = len(ids)
        if self.vector_length < 1:
            raise ParameterError(f"vector_length must be >= 1, got {self.vector_length}")
        quantization_step(1, self.clip)  # validates clip
        set_(self, "clip", float(self.clip))
        if not 1 <= self.value_bits <= MAX_VALUE_BITS:
            raise ParameterError(f"value_bits must be in [1, {MAX_VALUE_BITS}], got {self.value_bits}")
        if self.count_slots < 0 or self.max_count < 0:
            raise ParameterError("count_slots and max_count must be >= 0")
        if self.rounding not in ("stochastic", "nearest"):
            raise ParameterError(f"rounding must be 'stochastic' or 'nearest', got {self.rounding!r}")
        k = n - 1 if self.all_pairs else (self.degree or default_degree(n))
        if k < 1:
            raise ParameterError(f"degree must be >= 1, got {self.degree}")
        k = min(k, n - 1)
        set_(self, "all_pairs", k == n - 1)
        if k < n - 1 and k % 2:
            raise ParameterError(f"a sparse neighbour graph needs an even degree, got {k}")
        set_(self, "degree", k)
        holders = k + 1
        t = self.threshold or default_threshold(holders)
        if not holders / 2 < t <= holders:
            raise ParameterError(
                f"threshold must be in ({holders / 2}, {holders}] for {holders} share holders, got {t}: "
                "at or below half, a server could collect both secrets of a site"
            )
        set_(self, "threshold", t)
        if self.ring_bits:
            if not 1 <= self.ring_bits <= MAX_MODULUS_BITS or self.count_slots:
                raise ParameterError(f"ring mode needs ring_bits in [1, {MAX_MODULUS_BITS}] and no count slots, got "
                                     f"{self.ring_bits} bits and {self.count_slots} slots")
            if self.modulus_bits not in (0, self.ring_bits):
                raise ParameterError(f"in ring mode the modulus is the ring: modulus_bits {self.modulus_bits} is not "
                                     f"ring_bits {self.ring_bits}")
        needed = self.ring_bits or choose_modulus_bits(n, self.value_bits, self.max_count if self.count_slots else 0)
        m = self.modulus_bits or needed
        if not needed <= m <= MAX_MODULUS_BITS:
            raise ParameterError(f"modulus_bits must be in [{needed}, 35] for {n} sites, got {m}")
        set_(self, "modulus_bits", m)
        if not isinstance(self.members_digest, bytes) or len(self.members_digest) != 32:
            raise ParameterError("members_digest must be the 32-byte SHA-256 of the pinned member list")

    @cached_property
    def site_set(self) -> frozenset[int]:
        """The invited sites, as a set."""
        return frozenset(self.site_ids)

    @property
    def n_sites(self) -> int:
        """Number of invited sites."""
        return len(self.site_ids)

    @property
    def total_length(self) -> int:
        """Elements per contribution: values then count slots."""
        return self.vector_length + self.count_slots

    @property
    def packed_bytes(self) -> int:
        """Bytes of one packed masked vector."""
        return packed_size(self.total_length, self.modulus_bits)

    @property
    def modulus_mask(self) -> int:
        """``2**modulus_bits - 1``, to reduce uint64 arithmetic modulo ``2**modulus_bits``."""
        return (1 << self.modulus_bits) - 1

    @cached_property
    def round_tag(self) -> bytes:
        """16-byte tag of the round's parameters carried by uploads, to reject cross-round replays."""
        return hashlib.sha256(encode_context("round-tag", self.digest)).digest()[:16]

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of every parameter: bound into each signed bundle, share and survivor list."""
        return hashlib.sha256(encode_context(
            "params", self.round_id, len(self.site_ids), *self.site_ids, self.vector_length, self.clip.hex(),
            self.value_bits, self.count_slots, self.max_count, self.degree, self.threshold,
            int(self.all_pairs), self.rounding, self.modulus_bits, self.members_digest, self.ring_bits,
        )).digest()

    def graph(self, seed: bytes = b"") -> dict[int, frozenset[int]]:
        """The neighbour graph; a sparse one needs :func:`graph_seed` (the complete one ignores it)."""
        if not self.all_pairs and len(seed) != 32:
            raise ParameterError("a sparse neighbour graph needs the 32-byte seed from every site's bundle")
        return neighbour_graph(self.site_ids, self.degree, seed)
