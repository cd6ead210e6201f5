"""The federation's member list: each site's name, secure-aggregation id and identity key.

The registry (``registry.json``) is written at provisioning (or by the simulator) and read by the
server. A site never trusts it as it comes from the coordinator: its officer confirms the list's
digest (:attr:`FederationRegistry.digest`) with every other site's officer out of band, then pins
it in the site's own state dir (:func:`pin_members`, ``fedtune site pin-members``). A site verifies
its peers' round keys only against its pinned members (:func:`load_members`), and every round binds
the digest of the member list it was offered under, so a coordinator can neither substitute its own
keys for a site's peers nor add sites nobody confirmed.
"""

from __future__ import annotations

import hashlib
import json
import re
import stat
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from common.files import private_dir, write_json, write_private
from common.secagg import SiteIdentity, SiteRegistry
from common.secagg.prg import encode_context

IDENTITY_FILE = "identity.pem"
MEMBERS_FILE = "members.json"
MEMBERS_FORMAT = "fedtune-members-1"
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


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

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of the member list (every site's name, id and identity key, in id order): what the
        sites' officers confirm out of band and pin, and what each round's parameters bind."""
        members = sorted((sid, name) for name, sid in self.ids.items())
        fields = [part for sid, name in members for part in (sid, name, self.keys[sid].public_bytes_raw())]
        return hashlib.sha256(encode_context("fedtune-members", len(members), *fields)).digest()

    def to_json(self) -> dict[str, Any]:
        return {name: {"id": sid, "identity": self.keys[sid].public_bytes_raw().hex()}
                for name, sid in sorted(self.ids.items())}


def read_aloud(digest: bytes) -> str:
    """A digest as groups of 4 hex digits: easy to read aloud over the phone."""
    text = digest.hex()
    return " ".join(text[i:i + 4] for i in range(0, len(text), 4))


def fingerprint(data: bytes) -> str:
    """SHA-256 of ``data`` (a public key) as 16 groups of 4 hex digits: easy to read aloud over the phone."""
    return read_aloud(hashlib.sha256(data).digest())


def _members(sites: Any, where: str) -> FederationRegistry:
    try:
        ids = {name: int(entry["id"]) for name, entry in sites.items()}
        keys = SiteRegistry({int(entry["id"]): bytes.fromhex(entry["identity"]) for entry in sites.values()})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RegistryError(f"{where} is unreadable ({exc})") from exc
    if len(set(ids.values())) != len(ids):
        raise RegistryError(f"{where} gives two sites the same id")
    return FederationRegistry(ids, keys)


def load_registry(path: str | Path) -> FederationRegistry:
    path = Path(path)
    try:
        sites = json.loads(path.read_text())["sites"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"site registry {path} is unreadable ({exc}); re-provision or restore it") from exc
    return _members(sites, f"site registry {path}")


def write_registry(path: Path, identities: dict[str, tuple[int, bytes]]) -> None:
    """``identities``: site name → (id, raw public key)."""
    payload = {"version": 1, "sites": {name: {"id": sid, "identity": public.hex()}
                                       for name, (sid, public) in sorted(identities.items())}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def parse_digest(text: str) -> bytes:
    """A members digest as an officer types it: 64 hex digits, spaces allowed (as :func:`read_aloud` prints)."""
    compact = "".join(text.split()).lower()
    if not _HEX_DIGEST.fullmatch(compact):
        raise RegistryError(f"--digest {text!r} is not a members digest: give the 64 hex digits every officer "
                            "confirmed (spaces allowed), as `fedtune site members` and `fedtune provision` print it")
    return bytes.fromhex(compact)


def pin_members(registry_path: Path, state_dir: Path, confirmed: str) -> FederationRegistry:
    """Pin the members of ``registry_path`` in the site's state dir (owner-only), only if their digest is
    the one the officers ``confirmed`` out of band; otherwise nothing is written."""
    wanted = parse_digest(confirmed)
    members = load_registry(registry_path)
    if members.digest != wanted:
        raise RegistryError(f"the members in {registry_path} have digest {read_aloud(members.digest)}, not the "
                            f"{read_aloud(wanted)} the officers confirmed: nothing pinned. Do not run this site on "
                            f"that list; compare `fedtune site members {registry_path}` with the other officers")
    write_json(private_dir(Path(state_dir)) / MEMBERS_FILE,
               {"format": MEMBERS_FORMAT, "digest": members.digest.hex(), "sites": members.to_json()})
    return members


def load_members(state_dir: Path) -> FederationRegistry:
    """The member list this site pinned itself (never the coordinator's registry), checked intact."""
    path = Path(state_dir) / MEMBERS_FILE
    pin = (f"`fedtune site pin-members --registry KIT/registry.json --state {state_dir} --digest HEX` with the "
           "members digest every site's officer confirmed")
    if not path.is_file():
        raise RegistryError(f"this site has pinned no member list ({path} is missing), so it cannot tell its peers "
                            f"from the coordinator's keys; its officer runs {pin}")
    if path.stat().st_mode & 0o022:
        raise RegistryError(f"{path} is writable by group or others (mode {stat.S_IMODE(path.stat().st_mode):04o}); "
                            f"run: chmod 600 {path}")
    try:
        payload = json.loads(path.read_text())
        if not isinstance(payload, dict) or payload.get("format") != MEMBERS_FORMAT:
            raise ValueError(f"not a {MEMBERS_FORMAT} file")
        pinned = bytes.fromhex(payload["digest"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"pinned member list {path} is unreadable ({exc}); pin the members again: {pin}") from exc
    members = _members(payload.get("sites"), f"pinned member list {path}")
    if members.digest != pinned:
        raise RegistryError(f"pinned member list {path} was altered: its members have digest "
                            f"{read_aloud(members.digest)}, not the pinned {read_aloud(pinned)}; pin the confirmed "
                            f"members again: {pin}")
    return members


def create_site_identities(names: list[str], state_dirs: dict[str, Path], registry_path: Path) -> None:
    """Fresh identity keys for each site (private key into its own state dir) and the registry."""
    public = {}
    for site_id, name in enumerate(names):
        identity = SiteIdentity.generate()
        write_private(private_dir(state_dirs[name]) / IDENTITY_FILE, identity.to_pem())
        public[name] = (site_id, identity.public_bytes())
    write_registry(registry_path, public)


def load_identity(state_dir: Path, name: str, registry: FederationRegistry) -> tuple[int, SiteIdentity]:
    """The site's id and private identity key, checked against the registry."""
    if name not in registry.ids:
        raise RegistryError(f"site {name!r} is not among the federation's members; ask the coordinator to enrol it")
    path = state_dir / IDENTITY_FILE
    try:
        identity = SiteIdentity.from_pem(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"site identity key {path} is unreadable ({exc}); restore it from the startup kit") from exc
    site_id = registry.ids[name]
    if registry.keys[site_id].public_bytes_raw() != identity.public_bytes():
        raise RegistryError(f"the identity key in {path} is not the one registered for site {name!r}")
    return site_id, identity
