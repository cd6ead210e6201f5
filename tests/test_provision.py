"""Site keys and provisioning: sites make their own keys (`fedtune site keygen`), provisioning sees only
their public enrolments; kit contents, owner-only modes, no leaked secrets, certificates, refusals, check_kit."""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from hypothesis import given, settings
from hypothesis import strategies as st

from common.registry import IDENTITY_FILE, load_identity, load_registry, pin_members
from fedtune.cli import build_parser
from fedtune.cli import main as run_cli
from fedtune.runtime.kits import (
    SITE_KEY_FILES,
    SITE_KIT_FILES,
    SITE_NAME,
    Enrolment,
    ProvisionError,
    check_kit,
    check_members,
    check_server_certificates,
    provision,
    read_enrolment,
    read_enrolments,
    renew,
    site_keygen,
    validate_request,
)
from tests.processes import described

SITES = ["hospital-a", "hospital-b", "clinic-3"]
HOSTS = ["superlink.example.org", "10.0.0.5"]
SERVER_FILES = {"ca.crt", "server.crt", "server.key", "registry.json", "passport-signing.key",
                "passport-signing.pub", "supernode-keys"}
PEM_PRIVATE = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----.+?-----END [A-Z ]*PRIVATE KEY-----\n?", re.S)


def enrol(root: Path, names: list[str]) -> list[Enrolment]:
    """Each site runs keygen in its own directory root/keys/<site>; provisioning gets the public halves."""
    return [site_keygen(name, root / "keys" / name) for name in names]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three sites' keys and one provisioning, read-only: tests that change a kit copy it first."""
    root = tmp_path_factory.mktemp("prov")
    enrolments = enrol(root, SITES)
    return {"fed": provision(enrolments, HOSTS, root / "fed", days=30), "keys": root / "keys"}


@pytest.fixture(scope="module")
def federation(world: dict[str, Path]) -> Path:
    return world["fed"]


@pytest.fixture(scope="module")
def keys(world: dict[str, Path]) -> Path:
    return world["keys"]


def copy_kit(federation: Path, tmp_path: Path, site: str = "hospital-a") -> Path:
    return Path(shutil.copytree(federation / "sites" / site, tmp_path / site))


def copy_keys(keys: Path, tmp_path: Path, site: str = "hospital-a") -> Path:
    return Path(shutil.copytree(keys / site, tmp_path / f"{site}-keys"))


def private_key_material(path: Path) -> list[bytes]:
    """The file's bytes and its key's raw private scalar (bytes, hex and base64)."""
    data = path.read_bytes()
    key = (serialization.load_ssh_private_key(data, None) if b"OPENSSH" in data
           else serialization.load_pem_private_key(data, None))
    if isinstance(key, ec.EllipticCurvePrivateKey):
        raw = key.private_numbers().private_value.to_bytes(48, "big")
    else:
        raw = key.private_bytes_raw()
    return [data, raw, raw.hex().encode(), base64.b64encode(raw)]


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def private_keys_in(path: Path) -> list[object]:
    """Every private key a file holds, whatever else is around it (PEM and OpenSSH blocks)."""
    found = []
    for block in PEM_PRIVATE.findall(path.read_bytes()):
        load = serialization.load_ssh_private_key if b"OPENSSH" in block else serialization.load_pem_private_key
        found.append(load(block, None))
    return found


# ----------------------------------------------------------------------------- site keygen

def test_keygen_writes_owner_only_keys_and_a_public_enrolment(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    enrolment = site_keygen("hospital-a", out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert sorted(p.name for p in out.iterdir()) == sorted([*SITE_KEY_FILES, "hospital-a.enrol.json"])
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    identity = serialization.load_pem_private_key((out / IDENTITY_FILE).read_bytes(), None)
    supernode = serialization.load_ssh_private_key((out / "supernode.key").read_bytes(), None)
    assert isinstance(identity, Ed25519PrivateKey)
    assert isinstance(supernode, ec.EllipticCurvePrivateKey) and isinstance(supernode.curve, ec.SECP384R1)
    assert (out / "supernode.pub").read_bytes().startswith(b"ecdsa-sha2-nistp384 ")
    # The enrolment file carries exactly the public halves, and nothing private.
    enrol_file = out / "hospital-a.enrol.json"
    assert read_enrolment(enrol_file) == enrolment
    assert enrolment.identity == identity.public_key() and enrolment.supernode == supernode.public_key()
    secrets = private_key_material(out / IDENTITY_FILE) + private_key_material(out / "supernode.key")
    assert not any(secret in enrol_file.read_bytes() for secret in secrets)
    assert set(json.loads(enrol_file.read_text())) == {"format", "site", "identity_public_key",
                                                       "supernode_public_key"}


def test_keygen_refuses_to_overwrite_keys_or_fill_a_used_directory(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keys"
    site_keygen("hospital-a", out)
    before = {p: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ProvisionError, match="already holds site keys .* refusing to overwrite"):
        site_keygen("hospital-a", out)
    with pytest.raises(ProvisionError, match="refusing to overwrite"):
        site_keygen("hospital-b", out)
    assert run_cli(["site", "keygen", "--site", "hospital-a", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.iterdir()} == before
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("x")
    with pytest.raises(ProvisionError, match="is not empty"):
        site_keygen("hospital-a", tmp_path / "etc")
    with pytest.raises(ProvisionError, match="not allowed"):
        site_keygen("Hospital A", tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_cli_keygen_prints_the_fingerprints_provision_shows(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    printed = {}
    for site in ("a", "b"):
        assert run_cli(["site", "keygen", "--site", site, "--out", str(tmp_path / site)]) == 0
        printed[site] = capsys.readouterr().out
        assert "client start --kit KIT --keys" in printed[site]
    fingerprints = {site: re.findall(r"SHA-256 ((?:[0-9a-f]{4} ){15}[0-9a-f]{4})", text)
                    for site, text in printed.items()}
    assert all(len(f) == 2 for f in fingerprints.values())
    assert run_cli(["provision", "--enrol", f"{tmp_path / 'a' / 'a.enrol.json'},{tmp_path / 'b'}",
                    "--server-host", "localhost", "--out", str(tmp_path / "fed")]) == 0
    shown = capsys.readouterr().out
    assert "CONFIRM each site's fingerprints" in shown
    for site, (identity, supernode) in fingerprints.items():
        block = shown.split(f"site {site!r} (id")[1]
        assert identity in block and supernode in block


# ----------------------------------------------------------------------------- contents and modes

def test_kits_hold_exactly_the_listed_files(federation: Path) -> None:
    assert sorted(p.name for p in federation.iterdir()) == ["README.md", "ca", "server", "sites"]
    assert [p.name for p in (federation / "ca").iterdir()] == ["ca.key"]
    assert {p.name for p in (federation / "server").iterdir()} == SERVER_FILES
    assert sorted(p.name for p in (federation / "server" / "supernode-keys").iterdir()) == \
        sorted(f"{site}.pub" for site in SITES)
    assert sorted(p.name for p in (federation / "sites").iterdir()) == sorted(SITES)
    for site in SITES:
        assert {p.name for p in (federation / "sites" / site).iterdir()} == set(SITE_KIT_FILES)
    assert not set(SITE_KIT_FILES) & {IDENTITY_FILE, "supernode.key"}


def test_every_file_is_0600_and_every_directory_0700(federation: Path) -> None:
    for path in federation.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} has mode {mode:04o}"


def test_provisioning_holds_no_site_private_key(federation: Path, keys: Path) -> None:
    """Every byte under --out: no site's identity or SuperNode private key, in any encoding."""
    files = all_files(federation)
    for site in SITES:
        secrets = [m for name in (IDENTITY_FILE, "supernode.key") for m in private_key_material(keys / site / name)]
        for path in files:
            data = path.read_bytes()
            assert not any(secret in data for secret in secrets), f"a private key of {site} is in {path}"


def test_the_coordinator_holds_no_key_that_signs_as_a_site(federation: Path) -> None:
    """No private key anywhere under --out belongs to a registered site identity: nothing there can
    sign a secure-aggregation key bundle that a site would accept as another site's."""
    registry = load_registry(federation / "server" / "registry.json")
    registered = [registry.keys[site_id] for site_id in registry.ids.values()]
    ed25519 = [key for path in all_files(federation) for key in private_keys_in(path)
               if isinstance(key, Ed25519PrivateKey)]
    assert len(ed25519) == 1  # the passport signing key, and nothing else
    for key in ed25519:
        signature = key.sign(b"round key bundle")
        for public in registered:
            assert public.public_bytes_raw() != key.public_key().public_bytes_raw()
            with pytest.raises(InvalidSignature):
                public.verify(signature, b"round key bundle")


def test_coordinator_secrets_stay_out_of_site_kits(federation: Path) -> None:
    sites = federation / "sites"
    coordinator = [m for path in (federation / "ca" / "ca.key", federation / "server" / "server.key",
                                  federation / "server" / "passport-signing.key") for m in private_key_material(path)]
    ca_key = private_key_material(federation / "ca" / "ca.key")
    for path in all_files(sites):
        assert not any(secret in path.read_bytes() for secret in coordinator), f"coordinator secret in {path}"
        assert private_keys_in(path) == [], f"a private key in the site kit file {path}"
    for path in all_files(federation / "server"):
        assert not any(secret in path.read_bytes() for secret in ca_key), f"the CA key is in {path}"


def test_site_info_and_supernode_keys(federation: Path, keys: Path) -> None:
    for site_id, site in enumerate(SITES):
        kit = federation / "sites" / site
        info = json.loads((kit / "site.json").read_text())
        assert (info["site"], info["site_id"], info["server_hosts"]) == (site, site_id, HOSTS)
        assert datetime.fromisoformat(info["created"]).tzinfo is not None
        private = serialization.load_ssh_private_key((keys / site / "supernode.key").read_bytes(), None)
        registered = (federation / "server" / "supernode-keys" / f"{site}.pub").read_bytes()
        assert registered.startswith(b"ecdsa-sha2-nistp384 ")
        assert serialization.load_ssh_public_key(registered) == private.public_key()
        assert info["supernode_sha256"] == read_enrolment(keys / site / f"{site}.enrol.json").supernode_fingerprint


def test_registry_holds_the_sites_own_identities(federation: Path, keys: Path) -> None:
    server_registry = federation / "server" / "registry.json"
    registry = load_registry(server_registry)
    assert registry.ids == {site: i for i, site in enumerate(SITES)}
    for site_id, site in enumerate(SITES):
        kit = federation / "sites" / site
        assert (kit / "registry.json").read_bytes() == server_registry.read_bytes()
        assert load_identity(keys / site, site, registry)[0] == site_id
        assert (kit / "passport-signing.pub").read_bytes() == \
            (federation / "server" / "passport-signing.pub").read_bytes()


# ----------------------------------------------------------------------------- certificates

def test_server_certificate_verifies_against_the_ca_for_every_host(federation: Path) -> None:
    server = federation / "server"
    ca = x509.load_pem_x509_certificate((server / "ca.crt").read_bytes())
    leaf = x509.load_pem_x509_certificate((server / "server.crt").read_bytes())
    for subject in (x509.DNSName("superlink.example.org"), x509.IPAddress(ipaddress.ip_address("10.0.0.5"))):
        verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
        assert verifier.verify(leaf, [])[-1] == ca
    wrong = PolicyBuilder().store(Store([ca])).build_server_verifier(x509.DNSName("evil.example.org"))
    with pytest.raises(x509.verification.VerificationError):
        wrong.verify(leaf, [])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert isinstance(ca.public_key().curve, ec.SECP384R1)
    key = serialization.load_pem_private_key((server / "server.key").read_bytes(), None)
    assert key.public_key() == leaf.public_key()
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 30


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(("sites", "hosts", "days", "says"), [
    (["Hospital-A", "b"], HOSTS, 365, "not allowed"),
    (["-a", "b"], HOSTS, 365, "not allowed"),
    (["a_1", "b"], HOSTS, 365, "not allowed"),
    (["a" * 64, "b"], HOSTS, 365, "not allowed"),
    (["a\n", "b"], HOSTS, 365, "not allowed"),
    (["", "b"], HOSTS, 365, "not allowed"),
    (["a", "b", "a"], HOSTS, 365, "enrolled more than once"),
    (["a"], HOSTS, 365, "at least 2 sites"),
    (["a", "b"], [], 365, "at least one server host"),
    (["a", "b"], ["superlink:9093"], 365, "without scheme or port"),
    (["a", "b"], ["https://superlink"], 365, "without scheme or port"),
    (["a", "b"], ["h", "h"], 365, "twice"),
    (["a", "b"], HOSTS, 0, "between 1 and 3650"),
    (["a", "b"], HOSTS, 3651, "between 1 and 3650"),
])
def test_bad_requests_are_refused(sites, hosts, days, says) -> None:
    with pytest.raises(ProvisionError, match=says):
        validate_request(sites, hosts, days)


def test_a_refused_provisioning_writes_nothing(tmp_path: Path) -> None:
    a, b = enrol(tmp_path, ["a", "b"])
    with pytest.raises(ProvisionError, match="without scheme or port"):
        provision([a, b], ["https://x"], tmp_path / "fed")
    with pytest.raises(ProvisionError, match="enrolled more than once"):
        provision([a, b, a], ["localhost"], tmp_path / "fed")
    with pytest.raises(ProvisionError, match="same identity public key"):
        provision([a, Enrolment("c", a.identity, b.supernode)], ["localhost"], tmp_path / "fed")
    with pytest.raises(ProvisionError, match="same SuperNode public key"):
        provision([a, Enrolment("c", b.identity, a.supernode)], ["localhost"], tmp_path / "fed")
    assert not (tmp_path / "fed").exists()


def test_an_existing_provisioning_is_never_overwritten(tmp_path: Path) -> None:
    sites = enrol(tmp_path, ["a", "b"])
    out = provision(sites, ["localhost"], tmp_path / "fed")
    before = {p: p.read_bytes() for p in all_files(out)}
    with pytest.raises(ProvisionError, match="refusing to overwrite its keys"):
        provision(sites, ["localhost"], out)
    assert {p: p.read_bytes() for p in all_files(out)} == before
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "ca", "server", "sites"]  # no staging left


def _ssh_line(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()


def _pem(key) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


BAD_ENROLMENTS = [
    ("not json", lambda e: "{not json", "not JSON"),
    ("wrong format", lambda e: e | {"format": "something-else"}, "not a fedtune enrolment"),
    ("no identity", lambda e: {k: v for k, v in e.items() if k != "identity_public_key"}, "lacks identity_public_key"),
    ("bad site name", lambda e: e | {"site": "Hospital A"}, "not allowed"),
    ("site name mismatch", lambda e: e | {"site": "hospital-b"}, "site name mismatch"),
    ("identity not a key", lambda e: e | {"identity_public_key": "hello"}, "not a PEM public key"),
    ("identity is EC", lambda e: e | {"identity_public_key": _pem(ec.generate_private_key(ec.SECP256R1()))},
     "EC secp256r1 key, not Ed25519"),
    ("supernode not a key", lambda e: e | {"supernode_public_key": "ssh-nothing AAAA"}, "not an OpenSSH public key"),
    ("supernode is ed25519", lambda e: e | {"supernode_public_key": _ssh_line(Ed25519PrivateKey.generate())},
     "not ecdsa-sha2-nistp384"),
    ("supernode is P-256", lambda e: e | {"supernode_public_key": _ssh_line(ec.generate_private_key(ec.SECP256R1()))},
     "EC secp256r1 key, not ecdsa-sha2-nistp384"),
    ("supernode is RSA", lambda e: e | {"supernode_public_key": _ssh_line(rsa.generate_private_key(65537, 2048))},
     "RSA key, not ecdsa-sha2-nistp384"),
    ("private key inside", lambda e: e | {"identity_public_key": Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()},
     "holds a PRIVATE key"),
]


@pytest.mark.parametrize(("change", "says"), [(c, s) for _, c, s in BAD_ENROLMENTS],
                         ids=[name for name, _, _ in BAD_ENROLMENTS])
def test_bad_enrolment_files_are_refused_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              change, says) -> None:
    site_keygen("hospital-a", tmp_path / "keys-a")
    site_keygen("hospital-b", tmp_path / "keys-b")
    good = json.loads((tmp_path / "keys-a" / "hospital-a.enrol.json").read_text())
    changed = change(good)
    bad = tmp_path / "hospital-a.enrol.json"
    bad.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(ProvisionError, match=says):
        read_enrolment(bad)
    assert run_cli(["provision", "--enrol", f"{bad},{tmp_path / 'keys-b'}", "--server-host", "localhost",
                    "--out", str(tmp_path / "fed")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedtune provision: enrolment file {bad}") and re.search(says, err), err
    assert not (tmp_path / "fed").exists()


def test_enrolment_paths_duplicates_and_wrong_names_are_refused(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    enrol(tmp_path, ["a", "b"])
    a, b = tmp_path / "keys" / "a" / "a.enrol.json", tmp_path / "keys" / "b" / "b.enrol.json"
    cases = [
        (f"{a},{a}", "'a' is enrolled more than once"),
        (f"{a},{b},{tmp_path / 'keys' / 'a'}", "'a' is enrolled more than once"),
        (f"{a}", "at least 2 sites"),
        (f"{a},{tmp_path / 'nope.enrol.json'}", "does not exist"),
        (f"{a},{tmp_path / 'empty'}", "holds no \\*.enrol.json"),
    ]
    (tmp_path / "empty").mkdir()
    renamed = tmp_path / "b.json"
    shutil.copy(b, renamed)
    cases.append((f"{a},{renamed}", "the name must be <site>.enrol.json"))
    for enrol_arg, says in cases:
        assert run_cli(["provision", "--enrol", enrol_arg, "--server-host", "localhost",
                        "--out", str(tmp_path / "fed")]) == 2, enrol_arg
        assert re.search(says, capsys.readouterr().err), enrol_arg
    assert not (tmp_path / "fed").exists()
    assert [e.site for e in read_enrolments([b, a])] == ["b", "a"]  # the order given is the id order


_FIELD = st.one_of(st.text(max_size=40), st.integers(), st.none(), st.lists(st.text(max_size=5), max_size=2),
                   st.sampled_from(["-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
                                    "ecdsa-sha2-nistp384 AAAAE2VjZHNh", "ssh-ed25519 AAAA x"]))


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=200), fields=st.fixed_dictionaries(
    {}, optional={"format": st.just("fedtune-enrolment-1") | _FIELD, "site": st.just("s") | _FIELD,
                  "identity_public_key": _FIELD, "supernode_public_key": _FIELD}), as_json=st.booleans())
def test_any_enrolment_file_parses_or_is_refused_with_a_provision_error(tmp_path_factory, raw, fields,
                                                                        as_json) -> None:
    path = tmp_path_factory.mktemp("enrol") / "s.enrol.json"
    path.write_bytes(json.dumps(fields).encode() if as_json else raw)
    try:
        read_enrolment(path)
    except ProvisionError as exc:
        assert str(path) in str(exc)
    else:
        raise AssertionError("no fuzzed file holds a valid key pair")


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcXyz019-_. \n", max_size=66))
def test_site_names_are_accepted_exactly_when_they_match_the_pattern(name: str) -> None:
    ok = SITE_NAME.fullmatch(name) is not None
    try:
        validate_request([name, "other-site"] if name != "other-site" else [name, "x"], ["localhost"], 1)
    except ProvisionError:
        assert not ok
    else:
        assert ok


# ----------------------------------------------------------------------------- check_kit

def test_check_kit_accepts_a_fresh_kit_with_the_sites_own_keys(federation: Path, keys: Path) -> None:
    result = check_kit(federation / "sites" / "hospital-b", keys / "hospital-b")
    assert (result["site"], result["site_id"], result["server_hosts"]) == ("hospital-b", 1, HOSTS)
    assert result["files"]["supernode.key"] == keys / "hospital-b" / "supernode.key"
    assert result["files"]["ca.crt"] == federation / "sites" / "hospital-b" / "ca.crt"


@pytest.mark.parametrize("name", SITE_KIT_FILES)
def test_check_kit_names_a_missing_kit_file(federation: Path, keys: Path, tmp_path: Path, name: str) -> None:
    kit = copy_kit(federation, tmp_path)
    (kit / name).unlink()
    with pytest.raises(ProvisionError, match=f"{name} is missing from the startup kit"):
        check_kit(kit, keys / "hospital-a")


@pytest.mark.parametrize("name", SITE_KEY_FILES)
def test_check_kit_names_a_missing_key_file(federation: Path, keys: Path, tmp_path: Path, name: str) -> None:
    own = copy_keys(keys, tmp_path)
    (own / name).unlink()
    with pytest.raises(ProvisionError, match=f"{name} is missing from the site keys directory"):
        check_kit(federation / "sites" / "hospital-a", own)


@pytest.mark.parametrize("name", ["supernode.key", IDENTITY_FILE])
def test_check_kit_refuses_a_key_others_can_read(federation: Path, keys: Path, tmp_path: Path, name: str) -> None:
    own = copy_keys(keys, tmp_path)
    (own / name).chmod(0o644)
    with pytest.raises(ProvisionError, match=rf"{name} .* by group or others \(mode 0644\).*chmod 600"):
        check_kit(federation / "sites" / "hospital-a", own)


def test_check_kit_refuses_a_ca_from_another_provisioning(federation: Path, keys: Path, tmp_path: Path) -> None:
    other = provision(enrol(tmp_path, ["a", "b"]), ["localhost"], tmp_path / "other")
    kit = copy_kit(federation, tmp_path)
    shutil.copy2(other / "sites" / "a" / "ca.crt", kit / "ca.crt")
    with pytest.raises(ProvisionError, match="ca.crt .* not the CA this kit was issued with"):
        check_kit(kit, keys / "hospital-a")


def test_check_kit_refuses_an_expired_certificate(federation: Path, keys: Path, tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="expired"):
        check_kit(federation / "sites" / "hospital-a", keys / "hospital-a",
                  now=datetime.now(UTC) + timedelta(days=3651))
    old = provision(enrol(tmp_path, ["a", "b"]), ["localhost"], tmp_path / "old", days=1, ca_days=1,
                    issued_at=datetime.now(UTC) - timedelta(days=2))
    with pytest.raises(ProvisionError, match="ca.crt .* expired"):
        check_kit(old / "sites" / "a", tmp_path / "keys" / "a")


def test_check_kit_refuses_another_sites_identity(federation: Path, keys: Path, tmp_path: Path) -> None:
    own = copy_keys(keys, tmp_path)
    shutil.copy2(keys / "hospital-b" / IDENTITY_FILE, own / IDENTITY_FILE)
    with pytest.raises(ProvisionError, match="not the one registered for site 'hospital-a'"):
        check_kit(federation / "sites" / "hospital-a", own)


def test_check_kit_refuses_keys_that_were_not_enrolled(federation: Path, keys: Path, tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="not the SuperNode key the coordinator enrolled for site 'hospital-a'"):
        check_kit(federation / "sites" / "hospital-a", keys / "hospital-b")
    site_keygen("hospital-a", tmp_path / "fresh")  # new keys, never enrolled
    with pytest.raises(ProvisionError, match="not the SuperNode key the coordinator enrolled"):
        check_kit(federation / "sites" / "hospital-a", tmp_path / "fresh")


def test_check_kit_refuses_mismatched_supernode_keys(federation: Path, keys: Path, tmp_path: Path) -> None:
    own = copy_keys(keys, tmp_path)
    shutil.copy2(keys / "hospital-b" / "supernode.pub", own / "supernode.pub")
    with pytest.raises(ProvisionError, match="supernode.pub .* does not match supernode.key"):
        check_kit(federation / "sites" / "hospital-a", own)


@pytest.mark.parametrize("secret", ["ca.key", "passport-signing.key", "server.key", IDENTITY_FILE, "supernode.key"])
def test_check_kit_refuses_a_private_key_in_a_site_kit(federation: Path, keys: Path, tmp_path: Path,
                                                       secret: str) -> None:
    """A kit from the coordinator holds public files only: a coordinator secret, or a site key the
    coordinator made (which it could then use to act as the site), is refused."""
    kit = copy_kit(federation, tmp_path)
    (kit / secret).write_bytes(b"-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ProvisionError, match=f"{secret} must not be in a site kit"):
        check_kit(kit, keys / "hospital-a")


def test_check_kit_wants_the_kit_and_the_keys_apart(keys: Path, tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="--kit and --keys are both"):
        check_kit(keys / "hospital-a", keys / "hospital-a")
    with pytest.raises(ProvisionError, match="site keys directory .* is not a directory"):
        check_kit(keys / "hospital-a", tmp_path / "none")


# ----------------------------------------------------------------------------- CLI

def test_cli_provision_prints_who_gets_what(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    enrol(tmp_path, ["a", "b"])
    enrolled = tmp_path / "enrolled"
    enrolled.mkdir()
    for site in ("a", "b"):
        shutil.copy(tmp_path / "keys" / site / f"{site}.enrol.json", enrolled)
    out = tmp_path / "fed"
    assert run_cli(["provision", "--enrol", str(enrolled), "--server-host", "localhost,127.0.0.1",
                    "--out", str(out), "--days", "10"]) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'server'}/  -> the coordinator" in printed
    assert f"{out / 'sites' / 'a'}/  -> site 'a' (public files only" in printed
    assert f"{out / 'ca' / 'ca.key'}  -> offline storage" in printed
    assert check_kit(out / "sites" / "b", tmp_path / "keys" / "b")["server_hosts"] == ["localhost", "127.0.0.1"]
    assert run_cli(["provision", "--enrol", str(enrolled), "--server-host", "localhost", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_cli_provision_has_no_way_to_make_site_keys() -> None:
    with pytest.raises(SystemExit):  # the old `--sites` (provisioning made the site keys) is gone
        build_parser()[0].parse_args(["provision", "--sites", "a,b", "--server-host", "h", "--out", "x"])


# ----------------------------------------------------------------------------- renewal

def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in all_files(root)}


@pytest.fixture()
def fresh(tmp_path: Path) -> Path:
    """Three enrolled sites (keys under tmp_path/keys) and a provisioning valid 365 days, for 127.0.0.1."""
    return provision(enrol(tmp_path, SITES), ["127.0.0.1"], tmp_path / "fed")


def test_renewal_changes_only_the_server_certificate_and_key(fresh: Path, tmp_path: Path) -> None:
    before, keys = files_of(fresh), files_of(tmp_path / "keys")
    assert run_cli(["provision", "--renew", str(fresh), "--out", str(tmp_path / "new"), "--days", "90"]) == 0
    new = files_of(tmp_path / "new")
    assert files_of(fresh) == before and files_of(tmp_path / "keys") == keys  # the old one and the sites' keys
    assert sorted(name for name in new if new[name] != before.get(name)) == \
        ["README.md", "server/server.crt", "server/server.key"]
    assert new.keys() == before.keys()
    for path in (tmp_path / "new").rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    ca = x509.load_pem_x509_certificate(new["server/ca.crt"])
    leaf = x509.load_pem_x509_certificate(new["server/server.crt"])
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(loopback)
    assert verifier.verify(leaf, [])[-1] == ca and (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 90
    for site in SITES:  # every site's kit is unchanged and still checks with its own keys
        check_kit(tmp_path / "new" / "sites" / site, tmp_path / "keys" / site)


def test_renewal_with_a_new_ca_changes_ca_crt_and_site_json_in_every_kit(fresh: Path, tmp_path: Path) -> None:
    state = tmp_path / "state-a"
    pin_members(fresh / "sites" / "hospital-a" / "registry.json", state,
                load_registry(fresh / "server" / "registry.json").digest.hex())
    before, keys = files_of(fresh), files_of(tmp_path / "keys")
    new = renew(fresh, tmp_path / "new", new_ca=True, days=200)
    assert new == ["README.md", "ca/ca.key", "server/ca.crt", "server/server.crt", "server/server.key",
                   *[f"sites/{site}/{name}" for site in sorted(SITES) for name in ("ca.crt", "site.json")]]
    after = files_of(tmp_path / "new")
    for name in ("server/registry.json", "server/passport-signing.key", "server/passport-signing.pub",
                 *[f"server/supernode-keys/{site}.pub" for site in SITES]):
        assert after[name] == before[name], name
    assert files_of(tmp_path / "keys") == keys
    assert load_registry(tmp_path / "new" / "server" / "registry.json").digest == \
        load_registry(fresh / "server" / "registry.json").digest
    for site in SITES:
        check_kit(tmp_path / "new" / "sites" / site, tmp_path / "keys" / site)
    # The members this site pinned before still match the renewed kit: nothing to confirm or pin again.
    check_members(tmp_path / "new" / "sites" / "hospital-a", tmp_path / "keys" / "hospital-a", state)
    # A site that installs only one of the two new files is told its kit is mixed.
    half = copy_kit(fresh, tmp_path)
    shutil.copy2(tmp_path / "new" / "sites" / "hospital-a" / "ca.crt", half / "ca.crt")
    with pytest.raises(ProvisionError, match="not the CA this kit was issued with"):
        check_kit(half, tmp_path / "keys" / "hospital-a")
    # The coordinator's kit with only a new server certificate (old ca.crt) is refused before any start.
    mixed = Path(shutil.copytree(tmp_path / "new" / "server", tmp_path / "mixed"))
    shutil.copy2(fresh / "server" / "ca.crt", mixed / "ca.crt")
    with pytest.raises(ProvisionError, match="server.crt .* was not issued by its ca.crt"):
        check_server_certificates(mixed)


def _handshake(port: int, ca_file: Path) -> bytes:
    """A TLS client that trusts only ``ca_file``, verifying 127.0.0.1: the server's certificate (DER)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return tls.getpeercert(binary_form=True)


def test_a_site_kit_completes_a_tls_handshake_with_the_renewed_certificate(fresh: Path, tmp_path: Path) -> None:
    """A real TLS server on loopback with the renewed server.crt: the renewed site kit's ca.crt verifies it,
    an old kit's ca.crt (the CA replaced) does not."""
    renew(fresh, tmp_path / "new", new_ca=True)
    server_kit = tmp_path / "new" / "server"
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_kit / "server.crt", server_kit / "server.key")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve(connections: int) -> None:
            for _ in range(connections):
                conn, _ = listener.accept()
                with conn:
                    try:
                        context.wrap_socket(conn, server_side=True).close()
                    except (ssl.SSLError, OSError):
                        pass  # the client refused our certificate

        server = threading.Thread(target=serve, args=(2,), daemon=True)
        server.start()
        der = _handshake(port, tmp_path / "new" / "sites" / "hospital-b" / "ca.crt")
        assert der == x509.load_pem_x509_certificate((server_kit / "server.crt").read_bytes()).public_bytes(
            serialization.Encoding.DER)
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(port, fresh / "sites" / "hospital-b" / "ca.crt")
        server.join(timeout=30)


def test_renewal_refusals(fresh: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ProvisionError, match=r"before the 3650 days asked .* \(--new-ca\)"):
        renew(fresh, tmp_path / "a", days=3650)  # the CA (3650 days) was issued before now
    with pytest.raises(ProvisionError, match=r"--ca-days must be .* between --days \(30\) and 3650"):
        renew(fresh, tmp_path / "a", days=30, new_ca=True, ca_days=10)
    with pytest.raises(ProvisionError, match="not a provisioning"):
        renew(fresh / "server", tmp_path / "a")
    with pytest.raises(ProvisionError, match="already holds a provisioning"):
        renew(fresh, fresh)
    offline = Path(shutil.copytree(fresh, tmp_path / "offline"))
    (offline / "ca" / "ca.key").unlink()
    with pytest.raises(ProvisionError, match="ca.key is missing: bring the CA key back from offline storage"):
        renew(offline, tmp_path / "a")
    assert renew(offline, tmp_path / "b", new_ca=True)  # a new CA needs no old CA key
    assert not (tmp_path / "a").exists()
    assert run_cli(["provision", "--renew", str(fresh), "--out", str(tmp_path / "c"), "--server-host", "h"]) == 2
    assert "keeps the server hosts" in capsys.readouterr().err
    assert run_cli(["provision", "--enrol", str(tmp_path / "keys"), "--out", str(tmp_path / "c"), "--new-ca",
                    "--server-host", "h"]) == 2
    assert "--new-ca is for --renew" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(["provision", "--renew", str(fresh), "--enrol", "x", "--out", str(tmp_path / "c")])


def test_kit_checks_warn_30_days_before_a_certificate_expires(fresh: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """A renewal with short validity, through the CLI: the coordinator's and the sites' kit checks warn, once,
    on one line (`fedtune server start` prints it: test_the_coordinator_serves_a_renewed_certificate)."""
    with caplog.at_level("WARNING", logger="fedtune.kits"):
        check_server_certificates(fresh / "server")
        check_kit(fresh / "sites" / "hospital-a", tmp_path / "keys" / "hospital-a")
    assert caplog.records == []  # 365 days left: quiet
    assert run_cli(["provision", "--renew", str(fresh), "--out", str(tmp_path / "soon"), "--days", "10"]) == 0
    with caplog.at_level("WARNING", logger="fedtune.kits"):
        check_server_certificates(tmp_path / "soon" / "server")
    [line] = [r.getMessage() for r in caplog.records]
    assert re.fullmatch(r"WARNING: server\.crt in \S+ expires on \S+ \S+ UTC \(in 9 days\); renew it: "
                        r"`fedtune provision --renew .*", line), line
    caplog.clear()
    assert run_cli(["provision", "--renew", str(fresh), "--out", str(tmp_path / "ca-soon"), "--days", "10",
                    "--new-ca", "--ca-days", "10"]) == 0
    with caplog.at_level("WARNING", logger="fedtune.kits"):
        check_kit(tmp_path / "ca-soon" / "sites" / "hospital-a", tmp_path / "keys" / "hospital-a")
    [line] = [r.getMessage() for r in caplog.records]
    assert "ca.crt in" in line and "(in 9 days); ask the coordinator for the renewed ca.crt" in line
    assert "\n" not in line
    past = datetime.now(UTC) - timedelta(days=3)
    renew(fresh, tmp_path / "expired", days=1, issued_at=past)
    with pytest.raises(ProvisionError, match=r"server\.crt in \S+ expired on .* renew it: `fedtune provision --renew"):
        check_server_certificates(tmp_path / "expired" / "server")


def fedtune_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedtune.cli", *args], capture_output=True, text=True, timeout=300,
                          **kwargs)


@pytest.mark.process
def test_start_refuses_an_expired_certificate(tmp_path: Path, drug_reviews) -> None:
    """`fedtune server start` and `fedtune client start` stop at the kit check, before any process starts."""
    from tests.conftest import write_csv

    past = datetime.now(UTC) - timedelta(days=3)
    old = provision(enrol(tmp_path, SITES), ["127.0.0.1"], tmp_path / "old", days=1, ca_days=1, issued_at=past)
    data = write_csv(tmp_path / "data.csv", drug_reviews[:6])
    client = fedtune_cli("client", "start", "--kit", str(old / "sites" / "hospital-a"), "--keys",
                         str(tmp_path / "keys" / "hospital-a"), "--data", str(data), "--state", str(tmp_path / "state"),
                         "--superlink", "127.0.0.1:1", "--labels", "negative,neutral,positive", "--max-epsilon", "8")
    assert client.returncode == 2 and re.search(
        r"ca\.crt in \S+ expired on \S+ \(certificate expired\); ask the coordinator for the renewed", client.stderr)
    # An expired server certificate under a valid CA: renewed in the past with one day's validity.
    fed = provision(enrol(tmp_path / "b", SITES), ["127.0.0.1"], tmp_path / "fed", issued_at=past)
    renew(fed, tmp_path / "expired", days=1, issued_at=past)
    server = fedtune_cli("server", "start", "--kit", str(tmp_path / "expired" / "server"), "--state",
                         str(tmp_path / "s"), "--test-data", str(data), "--port", "1")
    assert server.returncode == 2 and re.search(
        r"server\.crt in \S+ expired on .* renew it: `fedtune provision --renew", server.stderr)
    assert not (tmp_path / "s").exists() and not (tmp_path / "state").exists()


@pytest.mark.process
def test_the_coordinator_serves_a_renewed_certificate(fresh: Path, tmp_path: Path, drug_reviews,
                                                     started_processes) -> None:
    """End to end on loopback: provision, renew with a new CA (10 days, through the CLI), start the coordinator
    (`fedtune server start`: its SuperLink) from the renewed kit. It warns, on one stderr line, that its
    certificates expire within 30 days; the renewed site kit's ca.crt completes a TLS handshake with it and
    receives the renewed certificate; an old kit's ca.crt is refused. Site keys and members are unchanged."""
    from fedtune.runtime.processes import free_port
    from tests.conftest import write_csv

    keys = files_of(tmp_path / "keys")
    renewed = fedtune_cli("provision", "--renew", str(fresh), "--out", str(tmp_path / "new"), "--new-ca",
                          "--days", "10", "--ca-days", "10")
    assert renewed.returncode == 0, renewed.stderr
    assert files_of(tmp_path / "keys") == keys
    assert (tmp_path / "new" / "server" / "registry.json").read_bytes() == \
        (fresh / "sites" / "hospital-a" / "registry.json").read_bytes()
    port = free_port()
    test_data = write_csv(tmp_path / "test.csv", drug_reviews[500:520])
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        server = started_processes.start([sys.executable, "-m", "fedtune.cli", "server", "start", "--kit",
                                   str(tmp_path / "new" / "server"), "--state", str(tmp_path / "state"), "--host",
                                   "127.0.0.1", "--port", str(port), "--sites", "3", "--rounds", "1",
                                   "--test-data", str(test_data), "--labels", "negative,neutral,positive"],
                                  stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 300
        while True:  # until the SuperLink listens: refused connections only, any TLS failure fails the test
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                der = _handshake(port, tmp_path / "new" / "sites" / "hospital-a" / "ca.crt")
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "the SuperLink did not listen within 300 s"
                started_processes.snapshot()
                time.sleep(0.2)
        assert der == x509.load_pem_x509_certificate(
            (tmp_path / "new" / "server" / "server.crt").read_bytes()).public_bytes(serialization.Encoding.DER)
        with pytest.raises(ssl.SSLCertVerificationError):
            _handshake(port, fresh / "sites" / "hospital-a" / "ca.crt")
    finally:
        started_processes.snapshot()
        server.terminate()  # SIGTERM: fedtune stops its SuperLink and everything it started
        started_processes.wait(server, 120)
    assert described(started_processes.alive()) == []
    warnings = [line for line in log.read_text().splitlines() if "expires on" in line]
    assert [w.split(" in ")[0] for w in warnings] == ["WARNING: ca.crt", "WARNING: server.crt"], warnings
    assert all("(in 9 days)" in w for w in warnings)
