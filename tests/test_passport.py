"""Model passports: round trip, and every way verification must fail (tampering, changed files, wrong key)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from common.passport import (
    PASSPORT_FILE,
    PassportError,
    build_passport,
    canonical_json,
    key_id,
    load_public_key,
    load_signing_key,
    public_key_pem,
    sign_passport,
    signing_key_pem,
    verify_passport,
)
from fedtune.cli import main as run_cli

BASE_SHA = "ab" * 32
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
          "task_type": "SEQ_CLS"}


@pytest.fixture()
def adapter(tmp_path: Path) -> Path:
    """A tiny PEFT-shaped adapter directory: config + a 2x4 safetensors file, no model."""
    directory = tmp_path / "adapter"
    directory.mkdir()
    (directory / "adapter_config.json").write_text(json.dumps(CONFIG))
    save_file({"base_model.model.layer.lora_B.weight": np.arange(8, dtype=np.float32).reshape(2, 4)},
              str(directory / "adapter_model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signed(adapter: Path, key: Ed25519PrivateKey, **overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {"base_model_sha256": BASE_SHA, "server_round": 3, "contributors": 2,
                                 "epsilon": {"hospital-a": 2.5, "hospital-b": None}, "fedtune_version": "0.1.0"}
    passport = build_passport(adapter, **(arguments | overrides))
    sign_passport(adapter, passport, key)
    return passport


def rewrite(adapter: Path, change) -> None:
    path = adapter / PASSPORT_FILE
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def test_round_trip(adapter: Path, key: Ed25519PrivateKey) -> None:
    passport = signed(adapter, key)
    assert verify_passport(adapter, key.public_key()) == passport
    assert passport["adapter_config"] == CONFIG
    assert (passport["base_model_sha256"], passport["server_round"], passport["contributors"]) == (BASE_SHA, 3, 2)
    assert passport["epsilon"] == {"hospital-a": 2.5, "hospital-b": None}
    assert passport["fedtune_version"] == "0.1.0" and passport["created"].endswith("+00:00")
    document = json.loads((adapter / PASSPORT_FILE).read_text())
    assert document["key_id"] == key_id(key.public_key()) == \
        hashlib.sha256(key.public_key().public_bytes_raw()).hexdigest()
    key.public_key().verify(bytes.fromhex(document["signature"]), canonical_json(passport))


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": {"ε": 0.5, "c": None}}) == '{"a":{"c":null,"ε":0.5},"b":1}'.encode()
    with pytest.raises(PassportError):
        canonical_json({"a": float("nan")})


@pytest.mark.parametrize(("field", "value"), [
    ("contributors", 3), ("server_round", 4), ("epsilon", {"hospital-a": 0.1, "hospital-b": None}),
    ("base_model_sha256", "cd" * 32), ("adapter_sha256", "00" * 32),
])
def test_a_tampered_passport_fails(adapter: Path, key: Ed25519PrivateKey, field: str, value: Any) -> None:
    signed(adapter, key)
    rewrite(adapter, lambda document: document["passport"].__setitem__(field, value))
    with pytest.raises(PassportError, match="bad signature.*tampered"):
        verify_passport(adapter, key.public_key())


def test_a_changed_adapter_file_fails(adapter: Path, key: Ed25519PrivateKey) -> None:
    signed(adapter, key)
    save_file({"base_model.model.layer.lora_B.weight": np.ones((2, 4), dtype=np.float32)},
              str(adapter / "adapter_model.safetensors"))
    with pytest.raises(PassportError, match="adapter file changed"):
        verify_passport(adapter, key.public_key())


def test_a_changed_adapter_config_fails(adapter: Path, key: Ed25519PrivateKey) -> None:
    signed(adapter, key)
    (adapter / "adapter_config.json").write_text(json.dumps(CONFIG | {"r": 64}))
    with pytest.raises(PassportError, match="adapter config changed"):
        verify_passport(adapter, key.public_key())


def test_the_wrong_key_fails(adapter: Path, key: Ed25519PrivateKey) -> None:
    signed(adapter, key)
    with pytest.raises(PassportError, match="wrong key"):
        verify_passport(adapter, Ed25519PrivateKey.generate().public_key())


def test_a_forged_key_id_does_not_help(adapter: Path, key: Ed25519PrivateKey) -> None:
    signed(adapter, Ed25519PrivateKey.generate())  # someone else's key ...
    rewrite(adapter, lambda document: document.__setitem__("key_id", key_id(key.public_key())))  # ... posing as ours
    with pytest.raises(PassportError, match="bad signature"):
        verify_passport(adapter, key.public_key())


def test_missing_files_fail(adapter: Path, key: Ed25519PrivateKey) -> None:
    with pytest.raises(PassportError, match="missing file: .*passport.json"):
        verify_passport(adapter, key.public_key())
    signed(adapter, key)
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(PassportError, match="missing file: .*adapter_model.safetensors"):
        verify_passport(adapter, key.public_key())


@pytest.mark.parametrize("content", ["", "{", "[]", '{"passport": {}, "signature": "zz", "key_id": "x"}'])
def test_a_malformed_passport_fails(adapter: Path, key: Ed25519PrivateKey, content: str) -> None:
    (adapter / PASSPORT_FILE).write_text(content)
    with pytest.raises(PassportError, match="malformed"):
        verify_passport(adapter, key.public_key())


def test_a_passport_is_only_signed_for_its_own_adapter(adapter: Path, key: Ed25519PrivateKey) -> None:
    passport = build_passport(adapter, base_model_sha256=BASE_SHA, server_round=1, contributors=2,
                              epsilon={}, fedtune_version="0.1.0")
    with pytest.raises(PassportError, match="refusing to sign"):
        sign_passport(adapter, passport | {"adapter_sha256": "00" * 32}, key)
    assert not (adapter / PASSPORT_FILE).exists()


@pytest.mark.parametrize(("overrides", "says"), [
    ({"base_model_sha256": "xyz"}, "64 lowercase hex"),
    ({"server_round": -1}, "server_round"),
    ({"contributors": 0}, "contributors"),
    ({"epsilon": {"a": float("inf")}}, "finite number"),
    ({"epsilon": {"a": -1.0}}, "finite number"),
    ({"audit": {"a": {"audited_epsilon": float("nan"), "audit_canaries": 1, "audit_guesses": 1,
                      "audit_correct": 1}}}, "privacy audit"),
    ({"audit": {"a": {"audited_epsilon": 0.5, "audit_canaries": 200}}}, "privacy audit"),
])
def test_build_rejects_bad_fields(adapter: Path, overrides: dict[str, Any], says: str) -> None:
    arguments = {"base_model_sha256": BASE_SHA, "server_round": 1, "contributors": 2, "epsilon": {},
                 "fedtune_version": "0.1.0"}
    with pytest.raises(PassportError, match=says):
        build_passport(adapter, **(arguments | overrides))


def test_the_initial_adapter_chosen_as_the_best_round_has_a_passport_with_no_contributors(adapter: Path) -> None:
    """--select-round best publishes round 0 when the initial adapter scored best: no site contributed to it."""
    passport = build_passport(adapter, base_model_sha256=BASE_SHA, server_round=0, contributors=0, epsilon={},
                              fedtune_version="0.1.0")
    assert (passport["server_round"], passport["contributors"]) == (0, 0)


def test_pem_keys_round_trip(tmp_path: Path, adapter: Path, key: Ed25519PrivateKey) -> None:
    (tmp_path / "k.key").write_bytes(signing_key_pem(key))
    (tmp_path / "k.pub").write_bytes(public_key_pem(key.public_key()))
    signed(adapter, load_signing_key(tmp_path / "k.key"))
    assert verify_passport(adapter, load_public_key(tmp_path / "k.pub"))["server_round"] == 3
    (tmp_path / "bad.pub").write_text("not a key")
    with pytest.raises(PassportError, match="unreadable"):
        load_public_key(tmp_path / "bad.pub")


def test_provisioned_keys_sign_and_verify(tmp_path: Path, adapter: Path) -> None:
    from fedtune.runtime.kits import provision, site_keygen

    fed = provision([site_keygen(s, tmp_path / "keys" / s) for s in ("a", "b")], ["localhost"], tmp_path / "fed")
    signed(adapter, load_signing_key(fed / "server" / "passport-signing.key"))
    verify_passport(adapter, load_public_key(fed / "sites" / "b" / "passport-signing.pub"))


@settings(max_examples=30, deadline=None)
@given(epsilon=st.dictionaries(st.text(min_size=1, max_size=12),
                               st.none() | st.floats(min_value=0, max_value=1e6, allow_nan=False), max_size=5),
       server_round=st.integers(0, 10**6))
def test_any_passport_round_trips_through_its_file(tmp_path_factory: pytest.TempPathFactory, epsilon, server_round,
                                                   ) -> None:
    directory = tmp_path_factory.mktemp("adapter")
    (directory / "adapter_config.json").write_text(json.dumps(CONFIG))
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(directory / "adapter_model.safetensors"))
    key = Ed25519PrivateKey.generate()
    passport = signed(directory, key, epsilon=epsilon, server_round=server_round)
    assert verify_passport(directory, key.public_key()) == passport


def test_cli_passport_verify_exit_codes(tmp_path: Path, adapter: Path, key: Ed25519PrivateKey,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    pub = tmp_path / "passport-signing.pub"
    pub.write_bytes(public_key_pem(key.public_key()))
    signed(adapter, key)
    assert run_cli(["passport", "verify", str(adapter), "--key", str(pub)]) == 0
    assert "passport OK" in capsys.readouterr().out
    rewrite(adapter, lambda document: document["passport"].__setitem__("contributors", 9))
    assert run_cli(["passport", "verify", str(adapter), "--key", str(pub)]) == 1
    assert "PASSPORT INVALID" in capsys.readouterr().err
    assert run_cli(["passport", "verify", str(adapter), "--key", str(tmp_path / "nope.pub")]) == 2
    assert run_cli(["passport", "verify", str(tmp_path / "no-such-dir"), "--key", str(pub)]) == 2


def test_a_passport_carries_each_sites_privacy_audit_and_verify_prints_it(
        tmp_path: Path, adapter: Path, key: Ed25519PrivateKey, capsys: pytest.CaptureFixture[str]) -> None:
    released = {"audited_epsilon": 0.3, "audit_canaries": 200, "audit_guesses": 40, "audit_correct": 27}
    passport = signed(adapter, key, audit={"hospital-a": released})
    assert verify_passport(adapter, key.public_key())["privacy_audit"] == {"hospital-a": released}
    pub = tmp_path / "passport-signing.pub"
    pub.write_bytes(public_key_pem(key.public_key()))
    assert run_cli(["passport", "verify", str(adapter), "--key", str(pub)]) == 0
    assert ("hospital-a: ε accounted 2.50 — ε audited ≥ 0.30 at 95 % (200 canaries, 40 guesses, 27 correct)"
            in capsys.readouterr().out)
    assert passport["epsilon"]["hospital-a"] == 2.5 and "privacy_audit" not in signed(adapter, key)  # no audit: no key


def test_a_final_adapter_chosen_on_the_federated_evaluation_says_so_and_verify_prints_it(
        tmp_path: Path, adapter: Path, key: Ed25519PrivateKey, capsys: pytest.CaptureFixture[str]) -> None:
    chosen = {"rule": "best federated accuracy", "round": 2, "score": 0.71, "interval": [0.66, 0.76], "evaluations": 4}
    signed(adapter, key, selection=chosen)
    assert verify_passport(adapter, key.public_key())["selection"] == chosen
    pub = tmp_path / "passport-signing.pub"
    pub.write_bytes(public_key_pem(key.public_key()))
    assert run_cli(["passport", "verify", str(adapter), "--key", str(pub)]) == 0
    assert ("chosen as the final adapter: best federated accuracy 0.710 over 4 evaluation(s); ε is the whole run's"
            in capsys.readouterr().out)
    passport = json.loads((adapter / "passport.json").read_text())
    passport["passport"]["selection"]["round"] = 3  # a selection is signed like every other field
    (adapter / "passport.json").write_text(json.dumps(passport))
    with pytest.raises(PassportError):
        verify_passport(adapter, key.public_key())
