"""Site keys, enrolment, and provisioning a federation from the sites' public keys.

The coordinator is not trusted, so no site private key is ever made by, or passes through, it:

1. Each site runs ``fedtune site keygen --site NAME --out KEYS`` on its own machine: it writes its
   secure-aggregation identity key (Ed25519, ``identity.pem``), its SuperNode authentication key
   (EC P-384, OpenSSH, ``supernode.key`` / ``supernode.pub``) and a public enrolment file
   ``NAME.enrol.json`` into a new owner-only directory, and prints the keys' SHA-256 fingerprints.
2. The site sends the enrolment file to the coordinator; its officer reads the fingerprints to the
   coordinator's officer over the phone.
3. ``fedtune provision --enrol FILES|DIR`` (on the coordinator's trusted machine) prints the same
   fingerprints for confirmation and writes::

    DIR/ca/ca.key              the CA's private key: offline storage, never in a kit
    DIR/server/                the coordinator's kit: ca.crt, server.crt, server.key, registry.json,
                               supernode-keys/<site>.pub, passport-signing.key, passport-signing.pub
    DIR/sites/<site>/          one kit per site, public material only: ca.crt, registry.json,
                               passport-signing.pub, site.json

    DIR/README.md              who gets what, and how to roll the certificates

Every file is 0600 and every directory 0700. ``fedtune provision --renew DIR --out NEW [--new-ca]``
(:func:`renew`) issues new certificates into a new provisioning from DIR, copying every key and the
registry byte for byte. The Flower 1.42 flags these files feed:
SuperLink ``--ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key
--enable-supernode-auth``; ``flwr supernode register supernode-keys/<site>.pub CONN --name <site>``;
SuperNode ``--root-certificates KIT/ca.crt --auth-supernode-private-key KEYS/supernode.key``.
:func:`check_kit` validates a site's kit and its own keys before a SuperNode starts from them.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.config import BadInput
from common.files import private_dir, write_private
from common.passport import PASSPORT_PUB, PassportError, load_public_key, public_key_pem, signing_key_pem
from common.registry import (
    IDENTITY_FILE,
    FederationRegistry,
    RegistryError,
    fingerprint,
    load_identity,
    load_members,
    load_registry,
    read_aloud,
    write_registry,
)
from common.secagg import SiteIdentity

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*$")
MIN_SITES = 2  # secure aggregation needs at least two sites
MAX_DAYS = 3650
CA_DAYS = MAX_DAYS
"""The CA outlives the server certificates it signs (ten years), so a renewal needs no new CA and no site
changes anything; a new CA (`--renew --new-ca`) is for a lost or leaked key."""
CLOCK_SKEW = timedelta(minutes=5)  # certificates are valid from a little before issue time
EXPIRY_WARNING = timedelta(days=30)  # `server start` / `client start` warn this long before a certificate expires

CA_KEY, CA_CERT = "ca.key", "ca.crt"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
REGISTRY = "registry.json"
SUPERNODE_KEY, SUPERNODE_PUB, SUPERNODE_KEYS_DIR = "supernode.key", "supernode.pub", "supernode-keys"
PASSPORT_KEY = "passport-signing.key"
SITE_INFO = "site.json"
ENROL_SUFFIX = ".enrol.json"
ENROL_FORMAT = "fedtune-enrolment-1"
SITE_KIT_FILES = (CA_CERT, REGISTRY, PASSPORT_PUB, SITE_INFO)  # what the coordinator sends a site: public only
SITE_KEY_FILES = (IDENTITY_FILE, SUPERNODE_KEY, SUPERNODE_PUB)  # what `fedtune site keygen` makes, at the site
SITE_SECRETS = (IDENTITY_FILE, SUPERNODE_KEY)
NOT_IN_SITE_KIT = (CA_KEY, SERVER_KEY, PASSPORT_KEY, *SITE_SECRETS)  # a kit holding one of these is wrong
PARTS = ("ca", "server", "sites")
KIT_README = "README.md"

log = logging.getLogger("fedtune.kits")
SUPERNODE_KEY_TYPE = "ecdsa-sha2-nistp384"


class ProvisionError(BadInput):
    """A provisioning request, an enrolment, site keys or a startup kit are wrong; the message says
    what and how to fix it."""


# ----------------------------------------------------------------------------- fingerprints, enrolment

def supernode_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of a SuperNode key's SSH wire encoding (the base64 field of ``supernode.pub``)."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return fingerprint(base64.b64decode(line.split()[1]))


def openssh_public(key: ec.EllipticCurvePublicKey, site: str) -> bytes:
    """``ecdsa-sha2-nistp384 AAAA... fedtune-<site>``: what ``flwr supernode register`` reads."""
    line = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + f" fedtune-{site}\n".encode()


@dataclass(frozen=True)
class Enrolment:
    """A site's public keys, as its enrolment file carries them to the coordinator."""

    site: str
    identity: Ed25519PublicKey
    supernode: ec.EllipticCurvePublicKey

    @property
    def identity_raw(self) -> bytes:
        return self.identity.public_bytes_raw()

    @property
    def supernode_openssh(self) -> bytes:
        return openssh_public(self.supernode, self.site)

    @property
    def identity_fingerprint(self) -> str:
        """SHA-256 of the raw 32-byte Ed25519 public key (as the registry holds it)."""
        return fingerprint(self.identity_raw)

    @property
    def supernode_fingerprint(self) -> str:
        return supernode_fingerprint(self.supernode)

    def to_json(self) -> bytes:
        payload = {"format": ENROL_FORMAT, "site": self.site,
                   "identity_public_key": self.identity.public_bytes(
                       serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
                   "supernode_public_key": self.supernode_openssh.decode().strip()}
        return (json.dumps(payload, indent=2) + "\n").encode()


def site_keygen(site: str, out: Path) -> Enrolment:
    """At the site: create its identity and SuperNode keys in the new directory ``out`` (0700, files 0600)
    and its public enrolment file ``<site>.enrol.json`` beside them. Never overwrites anything."""
    out = Path(out)
    _check_site_name(site)
    if out.exists() and not out.is_dir():
        raise ProvisionError(f"--out {out} is a file, not a directory; give a new directory for the site's keys")
    if out.is_dir():
        existing = sorted(p.name for p in out.iterdir())
        if any(name in existing for name in SITE_KEY_FILES) or any(n.endswith(ENROL_SUFFIX) for n in existing):
            raise ProvisionError(f"{out} already holds site keys ({', '.join(existing)}); refusing to overwrite "
                                 "them. Keep using them, or if you really mean new keys, choose a new --out "
                                 "directory and enrol again with the coordinator")
        if existing:
            raise ProvisionError(f"{out} is not empty ({', '.join(existing[:5])}); give a new directory: it will "
                                 "hold only the site's keys, owner-only")
    identity = SiteIdentity.generate()
    supernode = ec.generate_private_key(ec.SECP384R1())
    enrolment = Enrolment(site, identity.private_key.public_key(), supernode.public_key())
    private_dir(out)
    _write_new(out / IDENTITY_FILE, identity.to_pem())
    _write_new(out / SUPERNODE_KEY, supernode.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    _write_new(out / SUPERNODE_PUB, enrolment.supernode_openssh)
    _write_new(out / f"{site}{ENROL_SUFFIX}", enrolment.to_json())
    return enrolment


def _write_new(path: Path, data: bytes) -> None:
    """A new owner-only file; an existing one is never replaced (O_EXCL)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ProvisionError(f"{path} already exists; refusing to overwrite a key") from exc
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def read_enrolment(path: Path) -> Enrolment:
    """Parse and check one enrolment file; :class:`ProvisionError` says what is wrong with it."""
    path = Path(path)
    where = f"enrolment file {path}"
    if not path.name.endswith(ENROL_SUFFIX):
        raise ProvisionError(f"{where}: the name must be <site>{ENROL_SUFFIX}, as `fedtune site keygen` wrote it")
    try:
        text = path.read_text(encoding="utf-8")
        payload = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ProvisionError(f"{where} is unreadable or not JSON ({exc}); ask the site for the file "
                             "`fedtune site keygen` wrote") from exc
    if "PRIVATE KEY" in text:
        raise ProvisionError(f"{where} holds a PRIVATE key: refuse it and tell the site to generate new keys "
                             "(`fedtune site keygen`); a site only ever sends its public enrolment file")
    if not isinstance(payload, dict) or payload.get("format") != ENROL_FORMAT:
        raise ProvisionError(f"{where} is not a fedtune enrolment (expected \"format\": \"{ENROL_FORMAT}\"); "
                             "ask the site for the file `fedtune site keygen` wrote")
    missing = [k for k in ("site", "identity_public_key", "supernode_public_key")
               if not isinstance(payload.get(k), str)]
    if missing:
        raise ProvisionError(f"{where} lacks {', '.join(missing)}; ask the site for the file `fedtune site keygen` "
                             "wrote, unedited")
    site = payload["site"]
    _check_site_name(site, where=where)
    if path.name != f"{site}{ENROL_SUFFIX}":
        raise ProvisionError(f"{where} names site {site!r} but its file name says "
                             f"{path.name.removesuffix(ENROL_SUFFIX)!r}: site name mismatch; confirm with the "
                             "site which it is, and use the file it sent, unrenamed")
    try:
        identity = serialization.load_pem_public_key(payload["identity_public_key"].encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ProvisionError(f"{where}: identity_public_key is not a PEM public key ({exc})") from exc
    if not isinstance(identity, Ed25519PublicKey):
        raise ProvisionError(f"{where}: identity_public_key is a {_key_kind(identity)} key, not Ed25519; the "
                             "secure-aggregation identity must be the Ed25519 key `fedtune site keygen` makes")
    try:
        supernode = serialization.load_ssh_public_key(payload["supernode_public_key"].encode())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ProvisionError(f"{where}: supernode_public_key is not an OpenSSH public key ({exc})") from exc
    if not isinstance(supernode, ec.EllipticCurvePublicKey) or not isinstance(supernode.curve, ec.SECP384R1):
        raise ProvisionError(f"{where}: supernode_public_key is a {_key_kind(supernode)} key, not "
                             f"{SUPERNODE_KEY_TYPE} (EC P-384) as Flower's SuperNode authentication needs")
    return Enrolment(site, identity, supernode)


def _key_kind(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__.removeprefix("_").replace("PublicKey", "") or "unknown"


def read_enrolments(paths: list[Path]) -> list[Enrolment]:
    """Every enrolment in ``paths`` (files, or directories of ``*.enrol.json``), in the order given
    (a directory's files by name). Duplicates are refused by :func:`provision`."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(path.glob(f"*{ENROL_SUFFIX}"))
            if not found:
                raise ProvisionError(f"{path} holds no *{ENROL_SUFFIX} file; put each site's enrolment file there")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ProvisionError(f"enrolment {path} does not exist; give the sites' {ENROL_SUFFIX} files or "
                                 "a directory of them")
    return [read_enrolment(path) for path in files]


# ----------------------------------------------------------------------------- validation

def _check_site_name(name: str, *, where: str = "") -> None:
    if not isinstance(name, str) or not SITE_NAME.fullmatch(name):
        raise ProvisionError(f"{where + ': ' if where else ''}site name {name!r} is not allowed: use 1-63 "
                             "lowercase letters, digits and '-', starting with a letter or digit (e.g. 'hospital-a')")


def validate_request(sites: list[str], server_hosts: list[str], days: int) -> None:
    """Raise :class:`ProvisionError` naming the first problem with a provisioning request."""
    for name in sites:
        _check_site_name(name)
    duplicates = sorted({name for name in sites if sites.count(name) > 1})
    if duplicates:
        raise ProvisionError(f"site {duplicates[0]!r} is enrolled more than once; give each site's enrolment "
                             "file once")
    if len(sites) < MIN_SITES:
        raise ProvisionError(f"secure aggregation needs at least {MIN_SITES} sites, got {len(sites)} "
                             f"({','.join(sites) or 'none'}); give every site's enrolment file")
    if not server_hosts:
        raise ProvisionError("give at least one server host (--server-host): the DNS name or IP address "
                             "the sites use to reach the SuperLink")
    for host in server_hosts:
        _host_name(host)
    if len(set(server_hosts)) != len(server_hosts):
        raise ProvisionError(f"a server host is listed twice in --server-host {','.join(server_hosts)}; give each once")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ProvisionError(f"--days must be a whole number of days between 1 and {MAX_DAYS}, got {days!r}")


def _check_distinct_keys(enrolments: list[Enrolment]) -> None:
    """Two sites with one key would let one of them act as the other: refuse."""
    for what, key in (("identity", lambda e: e.identity_raw), ("SuperNode", lambda e: e.supernode_openssh.split()[1])):
        seen: dict[bytes, str] = {}
        for enrolment in enrolments:
            other = seen.setdefault(key(enrolment), enrolment.site)
            if other != enrolment.site:
                raise ProvisionError(f"sites {other!r} and {enrolment.site!r} enrolled the same {what} public key: "
                                     "each site must run `fedtune site keygen` itself; refuse both until each "
                                     "confirms its own fingerprints")


def _host_name(host: str) -> x509.GeneralName:
    """The certificate's SAN entry for ``host``: an IPAddress when it parses as one, else a DNSName."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not DNS_NAME.fullmatch(host):
        raise ProvisionError(f"server host {host!r} is neither an IP address nor a DNS name; give the host "
                             "without scheme or port, e.g. --server-host superlink.example.org,10.0.0.5")
    return x509.DNSName(host)


def _refuse_existing(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ProvisionError(f"--out {out} is a file, not a directory; choose a new directory")
    existing = [part for part in (*PARTS, KIT_README) if (out / part).exists()]
    if existing:
        raise ProvisionError(f"{out} already holds a provisioning ({', '.join(existing)}/); refusing to overwrite "
                             "its keys. Choose a new --out directory, or move the old one away if you really "
                             "mean to re-key the whole federation")


# ----------------------------------------------------------------------------- provisioning

def provision(enrolments: list[Enrolment], server_hosts: list[str], out: Path, *, days: int = 365,
              ca_days: int = CA_DAYS, issued_at: datetime | None = None) -> Path:
    """Create the CA, the server kit and one public kit per enrolled site under ``out``; returns ``out``.

    Parameters
    ----------
    enrolments
        The sites' public keys (:func:`read_enrolments`); a site's secure-aggregation id is its
        position in this list. No site private key is made or seen here.
    server_hosts
        Names or IP addresses the sites use to reach the SuperLink (the certificate's SANs).
    out
        Directory to write; must not hold an earlier provisioning.
    days
        Validity of the server certificate (1 to 3650).
    ca_days
        Validity of the CA (at least ``days``; default ten years, so renewals keep the CA).
    issued_at
        Issue time (UTC); default now. Tests pass a past time to make expired kits.
    """
    if isinstance(server_hosts, str) or not all(isinstance(e, Enrolment) for e in enrolments):
        raise ProvisionError("provision takes a list of Enrolment (read_enrolments) and a list of host names")
    enrolments, server_hosts, out = list(enrolments), list(server_hosts), Path(out)
    validate_request([e.site for e in enrolments], server_hosts, days)
    _check_ca_days(ca_days, days)
    _check_distinct_keys(enrolments)
    _refuse_existing(out)
    now = _utc(issued_at or datetime.now(UTC))
    _write_staged(out, lambda root: _write_provisioning(root, enrolments, server_hosts, now, days, ca_days))
    return out


def _write_staged(out: Path, write: Callable[[Path], None]) -> None:
    """``write`` a whole provisioning into a staging directory, then move its parts into ``out``: nothing
    half-written is ever in place."""
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".provisioning-", dir=out))
    try:
        write(staging)
        for part in (*PARTS, KIT_README):
            os.replace(staging / part, out / part)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_ca_days(ca_days: int, days: int) -> None:
    if isinstance(ca_days, bool) or not isinstance(ca_days, int) or not days <= ca_days <= MAX_DAYS:
        raise ProvisionError(f"--ca-days must be a whole number of days between --days ({days}) and {MAX_DAYS}, "
                             f"got {ca_days!r}: the CA must outlive the server certificate it signs")


def _write_provisioning(root: Path, enrolments: list[Enrolment], hosts: list[str], now: datetime, days: int,
                        ca_days: int) -> None:
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = ca_certificate(ca_key, now=now, days=ca_days)
    server_key = ec.generate_private_key(ec.SECP384R1())
    signing_key = Ed25519PrivateKey.generate()
    registry = {e.site: (site_id, e.identity_raw) for site_id, e in enumerate(enrolments)}
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    passport_pub = public_key_pem(signing_key.public_key())

    write_private(private_dir(root / "ca") / CA_KEY, _pkcs8(ca_key))
    server = private_dir(root / "server")
    write_private(server / CA_CERT, ca_pem)
    write_private(server / SERVER_CERT, server_certificate(server_key.public_key(), ca_key, ca_cert, hosts,
                                                           now=now, days=days).public_bytes(serialization.Encoding.PEM))
    write_private(server / SERVER_KEY, _pkcs8(server_key))
    _write_registry(server / REGISTRY, registry)
    write_private(server / PASSPORT_KEY, signing_key_pem(signing_key))
    write_private(server / PASSPORT_PUB, passport_pub)
    keys_dir = private_dir(server / SUPERNODE_KEYS_DIR)
    for enrolment in enrolments:
        write_private(keys_dir / f"{enrolment.site}.pub", enrolment.supernode_openssh)

    private_dir(root / "sites")
    for site_id, enrolment in enumerate(enrolments):
        kit = private_dir(root / "sites" / enrolment.site)
        write_private(kit / CA_CERT, ca_pem)
        write_private(kit / REGISTRY, (server / REGISTRY).read_bytes())
        write_private(kit / PASSPORT_PUB, passport_pub)
        info = {"site": enrolment.site, "site_id": site_id, "server_hosts": hosts,
                "created": now.isoformat(timespec="seconds"),
                "ca_sha256": certificate_sha256(ca_cert),
                "supernode_sha256": enrolment.supernode_fingerprint}
        write_private(kit / SITE_INFO, (json.dumps(info, indent=2) + "\n").encode())
    _write_readme(root, ca_cert)


def renew(old: Path, out: Path, *, days: int = 365, new_ca: bool = False, ca_days: int = CA_DAYS,
          issued_at: datetime | None = None) -> list[str]:
    """Issue new certificates for the provisioning ``old`` into the new directory ``out``; returns the files
    that differ from ``old`` (paths relative to ``out``).

    Always a new server certificate and key (same hosts, valid ``days``). With ``new_ca`` also a new CA key and
    certificate (valid ``ca_days``): then ``ca.crt`` and ``site.json`` (its fingerprint) change in every site's
    kit. Everything else
    (each site's registered keys, ``registry.json`` and so its members digest, the passport signing keys) is
    copied byte for byte: no site makes keys, enrols or pins members again. Without ``new_ca`` the CA key in
    ``old/ca/`` signs, and must stay valid for the ``days`` asked. ``old`` is never changed.
    """
    old, out = Path(old), Path(out)
    sites, hosts = _read_provisioning(old)
    validate_request(sites, hosts, days)
    if new_ca:
        _check_ca_days(ca_days, days)
    _refuse_existing(out)
    now = _utc(issued_at or datetime.now(UTC))
    if new_ca:
        ca_key = ec.generate_private_key(ec.SECP384R1())
        ca_cert = ca_certificate(ca_key, now=now, days=ca_days)
    else:
        ca_key, ca_cert = _read_ca(old)
        if now + timedelta(days=days) > ca_cert.not_valid_after_utc:
            raise ProvisionError(f"the CA in {old} expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}, before the "
                                 f"{days} days asked for the server certificate: renew the CA too (--new-ca), or "
                                 f"ask for fewer --days")
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = server_certificate(server_key.public_key(), ca_key, ca_cert, hosts, now=now, days=days)

    def write(root: Path) -> None:
        for part in PARTS:  # copy2 keeps every mode: 0600 files, 0700 directories
            shutil.copytree(old / part, root / part, copy_function=shutil.copy2)
        write_private(root / "server" / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))
        write_private(root / "server" / SERVER_KEY, _pkcs8(server_key))
        if new_ca:
            write_private(root / "ca" / CA_KEY, _pkcs8(ca_key))
            ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
            write_private(root / "server" / CA_CERT, ca_pem)
            for site in sites:
                kit = root / "sites" / site
                write_private(kit / CA_CERT, ca_pem)
                info = _read_site_info(kit / SITE_INFO) | {"ca_sha256": certificate_sha256(ca_cert),
                                                          "renewed": now.isoformat(timespec="seconds")}
                write_private(kit / SITE_INFO, (json.dumps(info, indent=2) + "\n").encode())
        _write_readme(root, ca_cert)

    _write_staged(out, write)
    return sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file()
                  and not ((old / path.relative_to(out)).is_file()
                           and (old / path.relative_to(out)).read_bytes() == path.read_bytes()))


def _read_provisioning(old: Path) -> tuple[list[str], list[str]]:
    """The sites (by id) and server hosts of an earlier provisioning, checked to be complete and consistent."""
    if not all((old / part).is_dir() for part in PARTS):
        raise ProvisionError(f"--renew {old} is not a provisioning (it needs ca/, server/ and sites/ as "
                             "`fedtune provision --out` wrote them)")
    server = old / "server"
    for name in (CA_CERT, SERVER_CERT, REGISTRY, PASSPORT_KEY, PASSPORT_PUB):
        if not (server / name).is_file():
            raise ProvisionError(f"{name} is missing from {server}; give the whole provisioning `fedtune provision` "
                                 "wrote (its registry and keys are copied unchanged)")
    try:
        registry = load_registry(server / REGISTRY)
        cert = x509.load_pem_x509_certificate((server / SERVER_CERT).read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (RegistryError, ValueError, x509.ExtensionNotFound) as exc:
        raise ProvisionError(f"{server} is damaged ({exc}); renew from an intact copy of the provisioning") from exc
    sites = [name for name, _ in sorted(registry.ids.items(), key=lambda item: item[1])]
    registry_bytes = (server / REGISTRY).read_bytes()
    for site in sites:
        kit = old / "sites" / site
        if not (server / SUPERNODE_KEYS_DIR / f"{site}.pub").is_file() or not all(
                (kit / name).is_file() for name in SITE_KIT_FILES):
            raise ProvisionError(f"the provisioning {old} lacks site {site!r}'s kit or its registered SuperNode key; "
                                 "renew from an intact copy of the provisioning")
        if (kit / REGISTRY).read_bytes() != registry_bytes:
            raise ProvisionError(f"{kit / REGISTRY} differs from {server / REGISTRY}: the provisioning mixes two "
                                 "federations; renew from an intact copy")
    return sites, [str(name.value) for name in san]


def _read_ca(old: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    path = old / "ca" / CA_KEY
    if not path.is_file():
        raise ProvisionError(f"{path} is missing: bring the CA key back from offline storage to renew the server "
                             "certificate, or make a new CA (--new-ca; every site then needs its new ca.crt)")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((old / "server" / CA_CERT).read_bytes())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ProvisionError(f"{path} or {old / 'server' / CA_CERT} is unreadable ({exc})") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ProvisionError(f"{path} is not the key of the CA in {old / 'server' / CA_CERT}; give the CA key of "
                             "this provisioning, or make a new CA (--new-ca)")
    return key, cert


def _write_readme(root: Path, ca_cert: x509.Certificate) -> None:
    server_cert = x509.load_pem_x509_certificate((root / "server" / SERVER_CERT).read_bytes())
    text = KIT_README_TEXT.format(server_expires=f"{server_cert.not_valid_after_utc:%Y-%m-%d}",
                                  ca_expires=f"{ca_cert.not_valid_after_utc:%Y-%m-%d}",
                                  warning_days=EXPIRY_WARNING.days, days=MAX_DAYS)
    write_private(root / KIT_README, text.encode())


KIT_README_TEXT = """\
# fedtune provisioning

- `ca/ca.key`: the CA's private key. Offline storage; only `fedtune provision --renew` needs it.
- `server/`: the coordinator's kit (`ca.crt`, `server.crt`, `server.key`, `registry.json`,
  `supernode-keys/`, passport keys), for `fedtune server start --kit` on the coordinator's machine.
- `sites/SITE/`: SITE's kit, public files only (`ca.crt`, `registry.json`, `passport-signing.pub`,
  `site.json`), for `fedtune client start --kit` at that site. A site's own keys never pass here.

The server certificate expires on {server_expires}, the CA on {ca_expires}. `fedtune server start` and
`fedtune client start` warn {warning_days} days before a certificate they load expires, and refuse an
expired one.

## Rolling the certificates

Renewal writes a new provisioning next to this one, which stays as it is (keep it until the new one
runs). Each site's keys, `registry.json` (so the members digest every site pinned), `supernode-keys/`
and the passport signing keys are copied byte for byte: no site makes keys, enrols or pins members again.

**The server certificate** (the CA stays; every site's kit is unchanged):

1. Coordinator: bring `ca/ca.key` back from offline storage and run
   `fedtune provision --renew THIS_DIR --out NEW_DIR --days 365`
   (new `server/server.crt` and `server/server.key`; nothing else changes). Put `NEW_DIR/ca/ca.key` back
   offline.
2. Coordinator: stop `fedtune server start`, start it again with `--kit NEW_DIR/server` (and `--resume`
   if a run is under way). The sites' daemons reconnect by themselves.
3. Sites: nothing to do.

**A new CA** (the CA expires, or its key is lost or leaked):

1. Coordinator: `fedtune provision --renew THIS_DIR --out NEW_DIR --new-ca --days 365`. New: `ca/ca.key`,
   `server/ca.crt`, `server/server.crt`, `server/server.key`, and in every `sites/SITE/`: `ca.crt` and
   `site.json` (the new CA's fingerprint). Send each site those two public files; read the new CA's
   fingerprint (`ca_sha256` in `site.json`) to its officer by phone.
2. Agree a switch time with every site, between runs if possible. There is no overlap: a site trusts one
   CA, so from the coordinator's switch until a site has installed its new files, that site cannot
   connect (its daemon keeps retrying until `--connect-timeout`; a service manager restarts it). A run
   under way is resumed afterwards (`--resume`); each completed round stays.
3. At the switch, coordinator: stop `fedtune server start`, start it again with `--kit NEW_DIR/server`
   (`--resume` if a run is under way).
4. At the switch, each site: stop its daemon, replace `ca.crt` and `site.json` in its kit with the new ones
   (keys directory and pinned members stay as they are), start the daemon again. `fedtune client start`
   refuses a kit whose `ca.crt` and `site.json` come from different provisionings.

Validity: `--days` (1 to {days}). Without `--new-ca` the server certificate cannot outlive the CA.
"""


def ca_certificate(key: ec.EllipticCurvePrivateKey, *, now: datetime, days: int) -> x509.Certificate:
    """A self-signed CA certificate (CA:TRUE, may sign certificates only, no intermediates)."""
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtune federation"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "fedtune federation CA")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        _validity(x509.CertificateBuilder(), now, days)
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA384())
    )


def server_certificate(public_key: ec.EllipticCurvePublicKey, ca_key: ec.EllipticCurvePrivateKey,
                       ca_cert: x509.Certificate, hosts: list[str], *, now: datetime, days: int) -> x509.Certificate:
    """The SuperLink's TLS certificate: SAN = every host, serverAuth only, signed by the CA."""
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        _validity(x509.CertificateBuilder(), now, days)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject).public_key(public_key)
        .add_extension(x509.SubjectAlternativeName([_host_name(host) for host in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def certificate_sha256(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of a certificate's DER encoding, hex."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _validity(builder: x509.CertificateBuilder, now: datetime, days: int) -> x509.CertificateBuilder:
    return (builder.serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + timedelta(days=days)))


def _utc(moment: datetime) -> datetime:
    """An aware UTC time; a naive one is taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_registry(path: Path, identities: dict[str, tuple[int, bytes]]) -> None:
    write_private(path, b"")  # exists 0600 before the registry is written into it
    write_registry(path, identities)
    path.chmod(0o600)


# ----------------------------------------------------------------------------- kit check

def check_kit(kit_dir: Path, keys_dir: Path, *, now: datetime | None = None) -> dict[str, Any]:
    """Validate a site's startup kit (from the coordinator) and its own keys (from ``fedtune site
    keygen``) before a SuperNode starts from them.

    Checks that every file is there, that the kit holds no private key (a coordinator's, or a
    site key someone else made), that the keys are owner-only, that the CA certificate is the one
    the kit was issued with and is valid ``now`` (a warning within 30 days of its expiry), that the
    SuperNode key pair matches and is the one enrolled, and that the identity key is the one the
    registry holds for the site.

    Returns
    -------
    dict
        ``site``, ``site_id``, ``server_hosts``, ``ca_not_valid_after`` (ISO 8601) and ``files``:
        the path of each kit and key file, by name (e.g. ``files["supernode.key"]``).
    """
    kit_dir, keys_dir = Path(kit_dir), Path(keys_dir)
    for directory, what in ((kit_dir, "startup kit (--kit)"), (keys_dir, "site keys directory (--keys)")):
        if not directory.is_dir():
            raise ProvisionError(f"{what} {directory} is not a directory")
    if kit_dir.resolve() == keys_dir.resolve():
        raise ProvisionError(f"--kit and --keys are both {kit_dir}: keep the kit the coordinator sent and the keys "
                             "`fedtune site keygen` made in two directories, so no received file can replace a key")
    _check_kit_files(kit_dir)
    _check_key_files(keys_dir)
    info = _read_site_info(kit_dir / SITE_INFO)
    ca_cert = _check_ca(kit_dir / CA_CERT, info["ca_sha256"], _utc(now or datetime.now(UTC)))
    _check_supernode_keys(keys_dir, info)
    _check_identity(kit_dir, keys_dir, info)
    try:
        load_public_key(kit_dir / PASSPORT_PUB)
    except PassportError as exc:
        raise ProvisionError(f"{PASSPORT_PUB} in {kit_dir} is wrong: {exc}") from exc
    return {"site": info["site"], "site_id": info["site_id"], "server_hosts": info["server_hosts"],
            "ca_not_valid_after": ca_cert.not_valid_after_utc.isoformat(),
            "files": {name: kit_dir / name for name in SITE_KIT_FILES} | {name: keys_dir / name
                                                                          for name in SITE_KEY_FILES}}


def _check_kit_files(kit_dir: Path) -> None:
    for name in SITE_KIT_FILES:
        if not (kit_dir / name).is_file():
            raise ProvisionError(f"{name} is missing from the startup kit {kit_dir}; copy the complete kit "
                                 "again from the coordinator")
    for name in NOT_IN_SITE_KIT:
        if (kit_dir / name).exists():
            whose = "this site's own private key" if name in SITE_SECRETS else "a coordinator secret"
            raise ProvisionError(f"{kit_dir / name} must not be in a site kit (it would be {whose}, and a kit "
                                 "from the coordinator holds public files only); delete it here and tell the "
                                 "coordinator. Your own keys stay in the --keys directory")
    _check_modes(kit_dir, SITE_KIT_FILES, secrets=(), what="startup kit")


def _check_key_files(keys_dir: Path) -> None:
    for name in SITE_KEY_FILES:
        if not (keys_dir / name).is_file():
            raise ProvisionError(f"{name} is missing from the site keys directory {keys_dir}; give the directory "
                                 "`fedtune site keygen --out` wrote (its keys cannot be re-made: a new key needs a "
                                 "new enrolment)")
    _check_modes(keys_dir, SITE_KEY_FILES, secrets=SITE_SECRETS, what="site keys directory")


def _check_modes(directory: Path, names: tuple[str, ...], *, secrets: tuple[str, ...], what: str) -> None:
    if directory.stat().st_mode & 0o022:
        raise ProvisionError(f"{what} {directory} is writable by group or others; run: chmod 700 {directory}")
    for name in names:
        mode = stat.S_IMODE((directory / name).stat().st_mode)
        secret = name in secrets
        if mode & (0o077 if secret else 0o022):
            how = "readable or writable" if secret else "writable"
            raise ProvisionError(f"{name} in {directory} is {how} by group or others (mode {mode:04o}); "
                                 f"run: chmod 600 {directory / name}")


def _read_site_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
        ok = (isinstance(info, dict) and isinstance(info.get("site"), str) and SITE_NAME.fullmatch(info["site"])
              and isinstance(info.get("site_id"), int) and isinstance(info.get("server_hosts"), list)
              and info["server_hosts"] and all(isinstance(info.get(k), str)
                                               for k in ("ca_sha256", "supernode_sha256")))
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"{SITE_INFO} in {path.parent} is unreadable ({exc}); copy the kit again") from exc
    if not ok:
        raise ProvisionError(f"{SITE_INFO} in {path.parent} lacks site, site_id, server_hosts, ca_sha256 "
                             "or supernode_sha256; copy the kit again from the coordinator")
    return info


def _check_ca(path: Path, expected_sha256: str, now: datetime) -> x509.Certificate:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        cert.verify_directly_issued_by(cert)
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (OSError, ValueError, TypeError, x509.ExtensionNotFound) as exc:
        raise ProvisionError(f"{CA_CERT} in {path.parent} is not a valid self-signed CA certificate ({exc}); "
                             "copy the kit again from the coordinator") from exc
    except InvalidSignature as exc:
        raise ProvisionError(f"{CA_CERT} in {path.parent} has a bad self-signature; copy the kit again") from exc
    if not is_ca:
        raise ProvisionError(f"{CA_CERT} in {path.parent} is not a CA certificate; copy the kit again")
    if certificate_sha256(cert) != expected_sha256:
        raise ProvisionError(f"{CA_CERT} in {path.parent} is not the CA this kit was issued with (fingerprint "
                             f"{certificate_sha256(cert)[:16]}…, {SITE_INFO} says {expected_sha256[:16]}…); "
                             "the kit mixes files from two provisionings: copy the kit again")
    _check_validity(cert, path, now, how_to_renew=SITE_RENEWAL)
    return cert


SITE_RENEWAL = "ask the coordinator for the renewed ca.crt and site.json (`fedtune provision --renew --new-ca`)"
SERVER_RENEWAL = "renew it: `fedtune provision --renew PROVISIONING --out NEW` (README.md of the provisioning)"


def _check_validity(cert: x509.Certificate, path: Path, now: datetime, *, how_to_renew: str) -> None:
    """Refuse a certificate that is not valid ``now``; warn (one log line) when it expires within
    :data:`EXPIRY_WARNING`. ``how_to_renew`` says how to get a new one."""
    if now < cert.not_valid_before_utc:
        raise ProvisionError(f"{path.name} in {path.parent} is not valid before "
                             f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's clock")
    if now > cert.not_valid_after_utc:
        raise ProvisionError(f"{path.name} in {path.parent} expired on {cert.not_valid_after_utc:%Y-%m-%d} "
                             f"(certificate expired); {how_to_renew}")
    left = cert.not_valid_after_utc - now
    if left < EXPIRY_WARNING:
        log.warning("WARNING: %s in %s expires on %s UTC (in %d days); %s", path.name, path.parent,
                    f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M}", left.days, how_to_renew)


def check_server_certificates(kit_dir: Path, *, now: datetime | None = None) -> None:
    """The coordinator's CA and server certificates before the SuperLink starts from them: each valid now
    (a warning when one expires soon), the server certificate issued by this CA and matching ``server.key``."""
    when = _utc(now or datetime.now(UTC))
    try:
        ca_cert = x509.load_pem_x509_certificate((kit_dir / CA_CERT).read_bytes())
        server_cert = x509.load_pem_x509_certificate((kit_dir / SERVER_CERT).read_bytes())
        server_key = serialization.load_pem_private_key((kit_dir / SERVER_KEY).read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ProvisionError(f"the certificates or key in the server kit {kit_dir} are unreadable ({exc}); use the "
                             "server/ directory `fedtune provision` wrote") from exc
    for cert, name in ((ca_cert, CA_CERT), (server_cert, SERVER_CERT)):
        _check_validity(cert, kit_dir / name, when, how_to_renew=SERVER_RENEWAL)
    try:
        server_cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ProvisionError(f"{SERVER_CERT} in {kit_dir} was not issued by its {CA_CERT}: the kit mixes files from "
                             "two provisionings (a renewal half installed?); install ca.crt, server.crt and "
                             "server.key from one server/ directory") from exc
    if server_key.public_key() != server_cert.public_key():
        raise ProvisionError(f"{SERVER_KEY} in {kit_dir} is not the key of {SERVER_CERT}: install both from one "
                             "server/ directory `fedtune provision` wrote")


def _check_supernode_keys(keys_dir: Path, info: dict[str, Any]) -> None:
    try:
        private = serialization.load_ssh_private_key((keys_dir / SUPERNODE_KEY).read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ProvisionError(f"{SUPERNODE_KEY} in {keys_dir} is not an OpenSSH private key ({exc})") from exc
    if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(private.curve, ec.SECP384R1):
        raise ProvisionError(f"{SUPERNODE_KEY} in {keys_dir} is not an EC P-384 key; use the keys "
                             "`fedtune site keygen` made")
    try:
        public = serialization.load_ssh_public_key((keys_dir / SUPERNODE_PUB).read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise ProvisionError(f"{SUPERNODE_PUB} in {keys_dir} is not an OpenSSH public key ({exc})") from exc
    if public != private.public_key():
        raise ProvisionError(f"{SUPERNODE_PUB} in {keys_dir} does not match {SUPERNODE_KEY}; use the keys "
                             "`fedtune site keygen` made, as it made them")
    found = supernode_fingerprint(private.public_key())
    if found != info["supernode_sha256"]:
        raise ProvisionError(f"{SUPERNODE_KEY} in {keys_dir} is not the SuperNode key the coordinator enrolled for "
                             f"site {info['site']!r} (fingerprint {found[:19]}…, "
                             f"{SITE_INFO} says {info['supernode_sha256'][:19]}…); the coordinator would refuse "
                             "it: use the keys you enrolled, or enrol these again")


def _check_identity(kit_dir: Path, keys_dir: Path, info: dict[str, Any]) -> None:
    try:
        registry = load_registry(kit_dir / REGISTRY)
        site_id, _ = load_identity(keys_dir, info["site"], registry)
    except RegistryError as exc:
        raise ProvisionError(f"{IDENTITY_FILE} in {keys_dir} / {REGISTRY} in {kit_dir}: {exc}") from exc
    if site_id != info["site_id"]:
        raise ProvisionError(f"{SITE_INFO} in {kit_dir} gives site id {info['site_id']}, {REGISTRY} gives "
                             f"{site_id}; the kit mixes files from two provisionings: copy the kit again")


def check_members(kit_dir: Path, keys_dir: Path, state_dir: Path) -> FederationRegistry:
    """The member list this site pinned (``fedtune site pin-members``) before its daemon starts: present,
    intact, holding this site's own identity key, and the list the kit's registry holds (a kit with
    other members is a new consortium the officers must confirm and pin again, or a list nobody confirmed)."""
    site = _read_site_info(kit_dir / SITE_INFO)["site"]
    try:
        members = load_members(state_dir)
        load_identity(keys_dir, site, members)
        offered = load_registry(kit_dir / REGISTRY)
    except RegistryError as exc:
        raise ProvisionError(f"the members pinned in {state_dir}: {exc}") from exc
    if offered.digest != members.digest:
        raise ProvisionError(
            f"{REGISTRY} in {kit_dir} lists other members (digest {read_aloud(offered.digest)}) than the ones this "
            f"site pinned in {state_dir} (digest {read_aloud(members.digest)}). If the consortium changed, every "
            f"officer confirms the new list (`fedtune site members {kit_dir / REGISTRY}`) and you pin it again "
            "(`fedtune site pin-members`); otherwise the coordinator sent a member list nobody confirmed: do not start")
    return members
