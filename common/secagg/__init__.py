"""Secure aggregation (SecAgg+-style: Bonawitz et al. 2017, Bell et al. 2020), Flower-free.

Sites mask quantised updates so the server learns only their sum. Pairwise masks come from
authenticated Diffie-Hellman agreement in a prime-order group over a sparse neighbour graph; self
masks and mask keys are Shamir-shared with Feldman commitments (verifiable before anyone masks with
the dealer), so dropouts at any stage are survivable while ``threshold`` sites remain and a dealer
of bad shares is simply dropped, with its own signed share as the proof.

Typical use: the server offers a :class:`SecAggParams` that each site checks against its own
policy; each site runs a :class:`ClientSession` (five stages: advertise, share, mask, confirm the
survivor set, unmask), the server a :class:`ServerAggregator`;
:class:`LocalFederation` wires them in one process for tests.

Each name loads on first use (PEP 562), so the key and registry commands, which read identities only,
do not load numpy and the protocol.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from common.secagg.client import ClientSession
    from common.secagg.errors import (
        DecryptionError,
        ModulusError,
        ParameterError,
        PayloadError,
        ProtocolError,
        RoundAborted,
        SecAggError,
        ShamirError,
        SignatureError,
    )
    from common.secagg.fixedpoint import (
        MAX_MODULUS_BITS,
        choose_modulus_bits,
        clip_l2,
        decode_sum,
        error_bound,
        pack_bits,
        packed_size,
        quantization_step,
        quantize,
        unpack_bits,
    )
    from common.secagg.identity import SignedKeyBundle, SiteIdentity, SiteRegistry
    from common.secagg.local import LocalFederation
    from common.secagg.messages import (
        Deal,
        MaskedUpload,
        SurvivorSet,
        UnmaskRequest,
        UnmaskResponse,
    )
    from common.secagg.proof import CheatProof, check_proof
    from common.secagg.protocol import (
        SecAggParams,
        Stage,
        default_degree,
        default_threshold,
        graph_seed,
        neighbour_graph,
    )
    from common.secagg.server import AggregateResult, ServerAggregator

__all__ = [
    "MAX_MODULUS_BITS",
    "AggregateResult",
    "CheatProof",
    "ClientSession",
    "Deal",
    "DecryptionError",
    "LocalFederation",
    "MaskedUpload",
    "ModulusError",
    "ParameterError",
    "PayloadError",
    "ProtocolError",
    "RoundAborted",
    "SecAggError",
    "SecAggParams",
    "ServerAggregator",
    "ShamirError",
    "SignatureError",
    "SignedKeyBundle",
    "SiteIdentity",
    "SiteRegistry",
    "Stage",
    "SurvivorSet",
    "UnmaskRequest",
    "UnmaskResponse",
    "check_proof",
    "choose_modulus_bits",
    "clip_l2",
    "decode_sum",
    "default_degree",
    "default_threshold",
    "error_bound",
    "graph_seed",
    "neighbour_graph",
    "pack_bits",
    "packed_size",
    "quantization_step",
    "quantize",
    "unpack_bits",
]

_MODULES = ("errors", "identity", "protocol", "fixedpoint", "proof", "messages", "client", "server", "local")
"""The submodules that define the names above, lightest first: a name loads only the modules up to its own."""


def __getattr__(name: str) -> Any:
    if name in __all__:
        for module in _MODULES:
            value = getattr(import_module(f"{__name__}.{module}"), name, None)
            if value is not None:
                globals()[name] = value
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
