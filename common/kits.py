"""Provisioning a federation: a CA, the SuperLink's TLS certificate, and one startup kit per site.

``fedtune provision`` runs once, on the coordinator's trusted machine, and writes::

    DIR/ca/ca.key              the CA's private key: offline storage, never in a kit
    DIR/server/                the coordinator's kit: ca.crt, server.crt, server.key, registry.json,
                               supernode-keys/<site>.pub, passport-signing.key, passport-signing.pub
    DIR/sites/<site>/          one kit per site, holding that site's own secrets only: ca.crt,
                               supernode.key, supernode.pub, identity.pem, registry.json,
                               passport-signing.pub, site.json

Every file is 0600 and every directory 0700. The Flower 1.42 flags these files feed:
SuperLink ``--ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key
--enable-supernode-auth``; ``flwr supernode register supernode-keys/<site>.pub CONN --name <site>``;
SuperNode ``--root-certificates ca.crt --auth-supernode-private-key supernode.key``.
:func:`check_kit` validates a site kit before a SuperNode starts from it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import stat
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.passport import PassportError, load_public_key, public_key_pem, signing_key_pem
from common.files import write_private
from common.registry import IDENTITY_FILE, RegistryError, load_identity, load_registry, write_registry
from common.secagg import SiteIdentity

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME = re.compile(rf"^(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*$")
MIN_SITES = 2  # secure aggregation needs at least two sites
MAX_DAYS = 3650
CLOCK_SKEW = timedelta(minutes=5)  # certificates are valid from a little before issue time

CA_KEY, CA_CERT = "ca.key", "ca.crt"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
REGISTRY = "registry.json"
SUPERNODE_KEY, SUPERNODE_PUB, SUPERNODE_KEYS_DIR = "supernode.key", "supernode.pub", "supernode-keys"
PASSPORT_KEY, PASSPORT_PUB = "passport-signing.key", "passport-signing.pub"
SITE_INFO = "site.json"
SITE_KIT_FILES = (CA_CERT, SUPERNODE_KEY, SUPERNODE_PUB, IDENTITY_FILE, REGISTRY, PASSPORT_PUB, SITE_INFO)
SITE_SECRETS = (SUPERNODE_KEY, IDENTITY_FILE)
NOT_IN_SITE_KIT = (CA_KEY, SERVER_KEY, PASSPORT_KEY)  # a site kit holding one of these leaks a secret
PARTS = ("ca", "server", "sites")


class ProvisionError(ValueError):
    """A provisioning request or a startup kit is wrong; the message says what and how to fix it."""


# ----------------------------------------------------------------------------- validation

def validate_request(sites: list[str], server_hosts: list[str], days: int) -> None:
    """Raise :class:`ProvisionError` naming the first problem with a provisioning request."""
    for name in sites:
        if not SITE_NAME.fullmatch(name):
            raise ProvisionError(f"site name {name!r} is not allowed: use 1-63 lowercase letters, digits and "
                                 "'-', starting with a letter or digit (e.g. 'hospital-a')")
    duplicates = sorted({name for name in sites if sites.count(name) > 1})
    if duplicates:
        raise ProvisionError(f"site {duplicates[0]!r} is listed more than once in --sites; give each site once")
    if len(sites) < MIN_SITES:
        raise ProvisionError(f"secure aggregation needs at least {MIN_SITES} sites, got {len(sites)} "
                             f"({','.join(sites) or 'none'}); list every site, e.g. --sites hospital-a,hospital-b")
    if not server_hosts:
        raise ProvisionError("give at least one server host (--server-host): the DNS name or IP address "
                             "the sites use to reach the SuperLink")
    for host in server_hosts:
        _host_name(host)
    if len(set(server_hosts)) != len(server_hosts):
        raise ProvisionError(f"a server host is listed twice in --server-host {','.join(server_hosts)}; give each once")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ProvisionError(f"--days must be a whole number of days between 1 and {MAX_DAYS}, got {days!r}")


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
    existing = [part for part in PARTS if (out / part).exists()]
    if existing:
        raise ProvisionError(f"{out} already holds a provisioning ({', '.join(existing)}/); refusing to overwrite "
                             "its keys. Choose a new --out directory, or move the old one away if you really "
                             "mean to re-key the whole federation")


# ----------------------------------------------------------------------------- provisioning

def provision(sites: list[str], server_hosts: list[str], out: Path, *, days: int = 365,
              issued_at: datetime | None = None) -> Path:
    """Create the CA, the server kit and one kit per site under ``out``; returns ``out``.

    Parameters
    ----------
    sites
        Site names; a site's secure-aggregation id is its position in this list.
    server_hosts
        Names or IP addresses the sites use to reach the SuperLink (the certificate's SANs).
    out
        Directory to write; must not hold an earlier provisioning.
    days
        Validity of the CA and server certificates (1 to 3650).
    issued_at
        Issue time (UTC); default now. Tests pass a past time to make expired kits.
    """
    if isinstance(sites, str) or isinstance(server_hosts, str):
        raise ProvisionError("sites and server_hosts are lists of names, not one comma-separated string")
    sites, server_hosts, out = list(sites), list(server_hosts), Path(out)
    validate_request(sites, server_hosts, days)
    _refuse_existing(out)
    now = _utc(issued_at or datetime.now(timezone.utc))
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".provisioning-", dir=out))  # nothing half-written is ever in place
    try:
        _write_provisioning(staging, sites, server_hosts, now, days)
        for part in PARTS:
            os.replace(staging / part, out / part)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _write_provisioning(root: Path, sites: list[str], hosts: list[str], now: datetime, days: int) -> None:
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = ca_certificate(ca_key, now=now, days=days)
    server_key = ec.generate_private_key(ec.SECP384R1())
    signing_key = Ed25519PrivateKey.generate()
    identities = {name: SiteIdentity.generate() for name in sites}
    supernode_keys = {name: ec.generate_private_key(ec.SECP384R1()) for name in sites}
    registry = {name: (site_id, identities[name].public_bytes()) for site_id, name in enumerate(sites)}
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    passport_pub = public_key_pem(signing_key.public_key())

    write_private(_private_dir(root / "ca") / CA_KEY, _pkcs8(ca_key))
    server = _private_dir(root / "server")
    write_private(server / CA_CERT, ca_pem)
    write_private(server / SERVER_CERT, server_certificate(server_key.public_key(), ca_key, ca_cert, hosts,
                                                           now=now, days=days).public_bytes(serialization.Encoding.PEM))
    write_private(server / SERVER_KEY, _pkcs8(server_key))
    _write_registry(server / REGISTRY, registry)
    write_private(server / PASSPORT_KEY, signing_key_pem(signing_key))
    write_private(server / PASSPORT_PUB, passport_pub)
    keys_dir = _private_dir(server / SUPERNODE_KEYS_DIR)
    for name, key in supernode_keys.items():
        write_private(keys_dir / f"{name}.pub", _openssh_public(key, name))

    _private_dir(root / "sites")
    for site_id, name in enumerate(sites):
        kit = _private_dir(root / "sites" / name)
        write_private(kit / CA_CERT, ca_pem)
        write_private(kit / SUPERNODE_KEY, supernode_keys[name].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        write_private(kit / SUPERNODE_PUB, _openssh_public(supernode_keys[name], name))
        write_private(kit / IDENTITY_FILE, identities[name].to_pem())
        write_private(kit / REGISTRY, (server / REGISTRY).read_bytes())
        write_private(kit / PASSPORT_PUB, passport_pub)
        info = {"site": name, "site_id": site_id, "server_hosts": hosts,
                "created": now.isoformat(timespec="seconds"),
                "ca_sha256": certificate_sha256(ca_cert)}
        write_private(kit / SITE_INFO, (json.dumps(info, indent=2) + "\n").encode())


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
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _openssh_public(key: ec.EllipticCurvePrivateKey, comment: str) -> bytes:
    """``ecdsa-sha2-nistp384 AAAA... fedtune-<site>``: what ``flwr supernode register`` reads."""
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return line + f" fedtune-{comment}\n".encode()


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)  # whatever the umask
    return path


def _write_registry(path: Path, identities: dict[str, tuple[int, bytes]]) -> None:
    write_private(path, b"")  # exists 0600 before the registry is written into it
    write_registry(path, identities)
    path.chmod(0o600)


# ----------------------------------------------------------------------------- kit check

def check_kit(kit_dir: Path, *, now: datetime | None = None) -> dict[str, Any]:
    """Validate a site's startup kit before a SuperNode starts from it.

    Checks that every file is there and no coordinator secret is, that the keys are owner-only,
    that the CA certificate is the one the kit was issued with and is valid ``now``, that the
    SuperNode key pair matches, and that the identity key is the one the registry holds for the site.

    Returns
    -------
    dict
        ``site``, ``site_id``, ``server_hosts``, ``ca_not_valid_after`` (ISO 8601) and ``files``:
        the path of each kit file, by name (e.g. ``files["supernode.key"]``).
    """
    kit_dir = Path(kit_dir)
    if not kit_dir.is_dir():
        raise ProvisionError(f"startup kit {kit_dir} is not a directory; give the path of your site's kit")
    _check_kit_files(kit_dir)
    info = _read_site_info(kit_dir / SITE_INFO)
    ca_cert = _check_ca(kit_dir / CA_CERT, info["ca_sha256"], _utc(now or datetime.now(timezone.utc)))
    _check_supernode_keys(kit_dir)
    _check_identity(kit_dir, info)
    try:
        load_public_key(kit_dir / PASSPORT_PUB)
    except PassportError as exc:
        raise ProvisionError(f"{PASSPORT_PUB} in {kit_dir} is wrong: {exc}") from exc
    return {"site": info["site"], "site_id": info["site_id"], "server_hosts": info["server_hosts"],
            "ca_not_valid_after": ca_cert.not_valid_after_utc.isoformat(),
            "files": {name: kit_dir / name for name in SITE_KIT_FILES}}


def _check_kit_files(kit_dir: Path) -> None:
    for name in SITE_KIT_FILES:
        if not (kit_dir / name).is_file():
            raise ProvisionError(f"{name} is missing from the startup kit {kit_dir}; copy the complete kit "
                                 "again from the coordinator")
    for name in NOT_IN_SITE_KIT:
        if (kit_dir / name).exists():
            raise ProvisionError(f"{kit_dir / name} must not be in a site kit (it is a coordinator secret); "
                                 "delete it here and tell the coordinator")
    if kit_dir.stat().st_mode & 0o022:
        raise ProvisionError(f"startup kit {kit_dir} is writable by group or others; run: chmod 700 {kit_dir}")
    for name in SITE_KIT_FILES:
        mode = stat.S_IMODE((kit_dir / name).stat().st_mode)
        secret = name in SITE_SECRETS
        if mode & (0o077 if secret else 0o022):
            what = "readable or writable" if secret else "writable"
            raise ProvisionError(f"{name} in {kit_dir} is {what} by group or others (mode {mode:04o}); "
                                 f"run: chmod 600 {kit_dir / name}")


def _read_site_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
        ok = (isinstance(info, dict) and isinstance(info.get("site"), str) and SITE_NAME.fullmatch(info["site"])
              and isinstance(info.get("site_id"), int) and isinstance(info.get("server_hosts"), list)
              and info["server_hosts"] and isinstance(info.get("ca_sha256"), str))
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"{SITE_INFO} in {path.parent} is unreadable ({exc}); copy the kit again") from exc
    if not ok:
        raise ProvisionError(f"{SITE_INFO} in {path.parent} lacks site, site_id, server_hosts or ca_sha256; "
                             "copy the kit again from the coordinator")
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
    if now < cert.not_valid_before_utc:
        raise ProvisionError(f"{CA_CERT} in {path.parent} is not valid before "
                             f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's clock")
    if now > cert.not_valid_after_utc:
        raise ProvisionError(f"{CA_CERT} in {path.parent} expired on {cert.not_valid_after_utc:%Y-%m-%d} "
                             "(certificate chain expired); ask the coordinator to re-provision the federation")
    return cert


def _check_supernode_keys(kit_dir: Path) -> None:
    try:
        private = serialization.load_ssh_private_key((kit_dir / SUPERNODE_KEY).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ProvisionError(f"{SUPERNODE_KEY} in {kit_dir} is not an OpenSSH private key ({exc}); "
                             "copy the kit again") from exc
    if not isinstance(private, ec.EllipticCurvePrivateKey) or not isinstance(private.curve, ec.SECP384R1):
        raise ProvisionError(f"{SUPERNODE_KEY} in {kit_dir} is not an EC P-384 key; copy the kit again")
    try:
        public = serialization.load_ssh_public_key((kit_dir / SUPERNODE_PUB).read_bytes())
    except (OSError, ValueError) as exc:
        raise ProvisionError(f"{SUPERNODE_PUB} in {kit_dir} is not an OpenSSH public key ({exc}); "
                             "copy the kit again") from exc
    if public != private.public_key():
        raise ProvisionError(f"{SUPERNODE_PUB} in {kit_dir} does not match {SUPERNODE_KEY}; copy the kit again")


def _check_identity(kit_dir: Path, info: dict[str, Any]) -> None:
    try:
        registry = load_registry(kit_dir / REGISTRY)
        site_id, _ = load_identity(kit_dir, info["site"], registry)
    except RegistryError as exc:
        raise ProvisionError(f"{IDENTITY_FILE} / {REGISTRY} in {kit_dir}: {exc}") from exc
    if site_id != info["site_id"]:
        raise ProvisionError(f"{SITE_INFO} in {kit_dir} gives site id {info['site_id']}, {REGISTRY} gives "
                             f"{site_id}; the kit mixes files from two provisionings: copy the kit again")
