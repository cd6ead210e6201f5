"""Provisioning: kit contents, owner-only modes, no leaked secrets, certificates, refusals, check_kit."""

from __future__ import annotations

import argparse
import ipaddress
import json
import shutil
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store
from hypothesis import given, settings
from hypothesis import strategies as st

from common.registry import IDENTITY_FILE, load_identity, load_registry
from fedtune.deploy_cli import add_subcommands
from common.kits import (
    SITE_KIT_FILES,
    SITE_NAME,
    ProvisionError,
    check_kit,
    provision,
    validate_request,
)

SITES = ["hospital-a", "hospital-b", "clinic-3"]
HOSTS = ["superlink.example.org", "10.0.0.5"]
SERVER_FILES = {"ca.crt", "server.crt", "server.key", "registry.json", "passport-signing.key",
                "passport-signing.pub", "supernode-keys"}


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One provisioning, read-only: tests that change a kit copy it first."""
    return provision(SITES, HOSTS, tmp_path_factory.mktemp("prov") / "fed", days=30)


def copy_kit(federation: Path, tmp_path: Path, site: str = "hospital-a") -> Path:
    return Path(shutil.copytree(federation / "sites" / site, tmp_path / site))


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedtune")
    handlers = add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return handlers[args.command](args)


def private_key_material(path: Path) -> list[bytes]:
    """The file's bytes and the raw private scalar (bytes and hex) of the key it holds."""
    data = path.read_bytes()
    key = (serialization.load_ssh_private_key(data, None) if b"OPENSSH" in data
           else serialization.load_pem_private_key(data, None))
    if isinstance(key, ec.EllipticCurvePrivateKey):
        raw = key.private_numbers().private_value.to_bytes(48, "big")
    else:
        raw = key.private_bytes_raw()
    return [data, raw, raw.hex().encode()]


def all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


# ----------------------------------------------------------------------------- contents and modes

def test_kits_hold_exactly_the_listed_files(federation: Path) -> None:
    assert sorted(p.name for p in federation.iterdir()) == ["ca", "server", "sites"]
    assert [p.name for p in (federation / "ca").iterdir()] == ["ca.key"]
    assert {p.name for p in (federation / "server").iterdir()} == SERVER_FILES
    assert sorted(p.name for p in (federation / "server" / "supernode-keys").iterdir()) == \
        sorted(f"{site}.pub" for site in SITES)
    assert sorted(p.name for p in (federation / "sites").iterdir()) == sorted(SITES)
    for site in SITES:
        assert {p.name for p in (federation / "sites" / site).iterdir()} == set(SITE_KIT_FILES)
        assert IDENTITY_FILE in SITE_KIT_FILES


def test_every_file_is_0600_and_every_directory_0700(federation: Path) -> None:
    for path in federation.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} has mode {mode:04o}"


def test_no_private_key_outside_its_own_kit(federation: Path) -> None:
    sites = federation / "sites"
    for owner in SITES:
        secrets = [m for name in ("supernode.key", IDENTITY_FILE) for m in private_key_material(sites / owner / name)]
        elsewhere = [f for f in all_files(federation) if sites / owner not in f.parents]
        for path in elsewhere:
            data = path.read_bytes()
            assert not any(secret in data for secret in secrets), f"a secret of {owner} is in {path}"
    coordinator = [m for path in (federation / "ca" / "ca.key", federation / "server" / "server.key",
                                  federation / "server" / "passport-signing.key") for m in private_key_material(path)]
    ca_key = private_key_material(federation / "ca" / "ca.key")
    for path in all_files(sites):
        assert not any(secret in path.read_bytes() for secret in coordinator), f"coordinator secret in {path}"
    for path in all_files(federation / "server"):
        assert not any(secret in path.read_bytes() for secret in ca_key), f"the CA key is in {path}"


def test_site_info_and_supernode_keys(federation: Path) -> None:
    for site_id, site in enumerate(SITES):
        kit = federation / "sites" / site
        info = json.loads((kit / "site.json").read_text())
        assert (info["site"], info["site_id"], info["server_hosts"]) == (site, site_id, HOSTS)
        assert datetime.fromisoformat(info["created"]).tzinfo is not None
        private = serialization.load_ssh_private_key((kit / "supernode.key").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        registered = (federation / "server" / "supernode-keys" / f"{site}.pub").read_bytes()
        assert registered.startswith(b"ecdsa-sha2-nistp384 ")
        assert serialization.load_ssh_public_key(registered) == private.public_key()
        assert (kit / "supernode.pub").read_bytes() == registered


def test_registry_matches_the_identities(federation: Path) -> None:
    server_registry = federation / "server" / "registry.json"
    registry = load_registry(server_registry)
    assert registry.ids == {site: i for i, site in enumerate(SITES)}
    for site_id, site in enumerate(SITES):
        kit = federation / "sites" / site
        assert (kit / "registry.json").read_bytes() == server_registry.read_bytes()
        assert load_identity(kit, site, registry)[0] == site_id
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
    (["a", "b", "a"], HOSTS, 365, "more than once"),
    (["a"], HOSTS, 365, "at least 2 sites"),
    (["a", "b"], [], 365, "at least one server host"),
    (["a", "b"], ["superlink:9093"], 365, "without scheme or port"),
    (["a", "b"], ["https://superlink"], 365, "without scheme or port"),
    (["a", "b"], ["h", "h"], 365, "twice"),
    (["a", "b"], HOSTS, 0, "between 1 and 3650"),
    (["a", "b"], HOSTS, 3651, "between 1 and 3650"),
])
def test_bad_requests_are_refused_before_anything_is_written(tmp_path: Path, sites, hosts, days, says) -> None:
    with pytest.raises(ProvisionError, match=says):
        provision(sites, hosts, tmp_path / "fed", days=days)
    assert not (tmp_path / "fed").exists()


def test_an_existing_provisioning_is_never_overwritten(federation: Path, tmp_path: Path) -> None:
    out = provision(["a", "b"], ["localhost"], tmp_path / "fed")
    before = {p: p.read_bytes() for p in all_files(out)}
    with pytest.raises(ProvisionError, match="refusing to overwrite its keys"):
        provision(["a", "b"], ["localhost"], out)
    assert {p: p.read_bytes() for p in all_files(out)} == before
    assert sorted(p.name for p in out.iterdir()) == ["ca", "server", "sites"]  # no staging left behind


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

def test_check_kit_accepts_a_fresh_kit(federation: Path) -> None:
    result = check_kit(federation / "sites" / "hospital-b")
    assert (result["site"], result["site_id"], result["server_hosts"]) == ("hospital-b", 1, HOSTS)
    assert result["files"]["supernode.key"] == federation / "sites" / "hospital-b" / "supernode.key"


@pytest.mark.parametrize("name", SITE_KIT_FILES)
def test_check_kit_names_a_missing_file(federation: Path, tmp_path: Path, name: str) -> None:
    kit = copy_kit(federation, tmp_path)
    (kit / name).unlink()
    with pytest.raises(ProvisionError, match=f"{name} is missing"):
        check_kit(kit)


@pytest.mark.parametrize("name", ["supernode.key", IDENTITY_FILE])
def test_check_kit_refuses_a_key_others_can_read(federation: Path, tmp_path: Path, name: str) -> None:
    kit = copy_kit(federation, tmp_path)
    (kit / name).chmod(0o644)
    with pytest.raises(ProvisionError, match=rf"{name} .* by group or others \(mode 0644\).*chmod 600"):
        check_kit(kit)


def test_check_kit_refuses_a_ca_from_another_provisioning(federation: Path, tmp_path: Path) -> None:
    other = provision(["a", "b"], ["localhost"], tmp_path / "other")
    kit = copy_kit(federation, tmp_path)
    shutil.copy2(other / "sites" / "a" / "ca.crt", kit / "ca.crt")
    with pytest.raises(ProvisionError, match="ca.crt .* not the CA this kit was issued with"):
        check_kit(kit)


def test_check_kit_refuses_an_expired_certificate(federation: Path, tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="expired"):
        check_kit(federation / "sites" / "hospital-a", now=datetime.now(timezone.utc) + timedelta(days=31))
    old = provision(["a", "b"], ["localhost"], tmp_path / "old", days=1,
                    issued_at=datetime.now(timezone.utc) - timedelta(days=2))
    with pytest.raises(ProvisionError, match="ca.crt .* expired"):
        check_kit(old / "sites" / "a")


def test_check_kit_refuses_another_sites_identity(federation: Path, tmp_path: Path) -> None:
    kit = copy_kit(federation, tmp_path)
    shutil.copy2(federation / "sites" / "hospital-b" / IDENTITY_FILE, kit / IDENTITY_FILE)
    with pytest.raises(ProvisionError, match="identity.pem .* not the one registered for site 'hospital-a'"):
        check_kit(kit)


def test_check_kit_refuses_mismatched_supernode_keys(federation: Path, tmp_path: Path) -> None:
    kit = copy_kit(federation, tmp_path)
    shutil.copy2(federation / "sites" / "hospital-b" / "supernode.pub", kit / "supernode.pub")
    with pytest.raises(ProvisionError, match="supernode.pub .* does not match supernode.key"):
        check_kit(kit)


def test_check_kit_refuses_a_coordinator_secret_in_a_site_kit(federation: Path, tmp_path: Path) -> None:
    kit = copy_kit(federation, tmp_path)
    shutil.copy2(federation / "ca" / "ca.key", kit / "ca.key")
    with pytest.raises(ProvisionError, match="ca.key must not be in a site kit"):
        check_kit(kit)


# ----------------------------------------------------------------------------- CLI

def test_cli_provision_prints_who_gets_what(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fed"
    assert run_cli(["provision", "--sites", "a,b", "--server-host", "localhost,127.0.0.1",
                    "--out", str(out), "--days", "10"]) == 0
    printed = capsys.readouterr().out
    assert f"{out / 'server'}/  -> the coordinator" in printed
    assert f"{out / 'sites' / 'a'}/  -> site 'a' only, over a secure channel" in printed
    assert f"{out / 'ca' / 'ca.key'}  -> offline storage" in printed
    assert check_kit(out / "sites" / "b")["server_hosts"] == ["localhost", "127.0.0.1"]
    assert run_cli(["provision", "--sites", "a,b", "--server-host", "localhost", "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_cli_provision_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["provision", "--sites", "only-one", "--server-host", "h", "--out", str(tmp_path / "x")]) == 2
    assert "at least 2 sites" in capsys.readouterr().err
