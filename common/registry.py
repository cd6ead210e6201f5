"""The federation's site registry: each site's name, secure-aggregation id and identity key.

Written at provisioning (or by the simulator), read by the server and by every site: sites
verify each other's round keys against it, so a server cannot substitute its own keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from common.files import write_private
from common.secagg import SiteIdentity, SiteRegistry

IDENTITY_FILE = "identity.pem"


class RegistryError(ValueError):
    """The registry or a site's identity key is missing, malformed, or does not match."""


@dataclass(frozen=True)
class FederationRegistry:
    ids: dict[str, int]
    """site name → secure-aggregation site id"""
    keys: SiteRegistry
    """site id → identity public key"""

    def name_of(self, site_id: int) -> str:
        return next(name for name, sid in self.ids.items() if sid == site_id)


def load_registry(path: str | Path) -> FederationRegistry:
    path = Path(path)
    try:
        sites = json.loads(path.read_text())["sites"]
        ids = {name: int(entry["id"]) for name, entry in sites.items()}
        keys = SiteRegistry({int(entry["id"]): bytes.fromhex(entry["identity"]) for entry in sites.values()})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"site registry {path} is unreadable ({exc}); re-provision or restore it") from exc
    if len(set(ids.values())) != len(ids):
        raise RegistryError(f"site registry {path} gives two sites the same id")
    return FederationRegistry(ids, keys)


def write_registry(path: Path, identities: dict[str, tuple[int, bytes]]) -> None:
    """``identities``: site name → (id, raw public key)."""
    payload = {"version": 1, "sites": {name: {"id": sid, "identity": public.hex()}
                                       for name, (sid, public) in sorted(identities.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def create_site_identities(names: list[str], state_dirs: dict[str, Path], registry_path: Path) -> None:
    """Fresh identity keys for each site (private key into its own state dir) and the registry."""
    public = {}
    for site_id, name in enumerate(names):
        identity = SiteIdentity.generate()
        write_private(state_dirs[name] / IDENTITY_FILE, identity.to_pem())
        public[name] = (site_id, identity.public_bytes())
    write_registry(registry_path, public)


def load_identity(state_dir: Path, name: str, registry: FederationRegistry) -> tuple[int, SiteIdentity]:
    """The site's id and private identity key, checked against the registry."""
    if name not in registry.ids:
        raise RegistryError(f"site {name!r} is not in the federation's registry; ask the coordinator to enrol it")
    path = state_dir / IDENTITY_FILE
    try:
        identity = SiteIdentity.from_pem(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"site identity key {path} is unreadable ({exc}); restore it from the startup kit") from exc
    site_id = registry.ids[name]
    if registry.keys[site_id].public_bytes_raw() != identity.public_bytes():
        raise RegistryError(f"the identity key in {path} is not the one registered for site {name!r}")
    return site_id, identity
