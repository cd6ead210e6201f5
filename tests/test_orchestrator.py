"""The deployment commands refuse bad input before anything starts, naming what is wrong."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.runtime.kits import provision, site_keygen
from fedtune.runtime.orchestrator import KitError, ServerKit, start_server
from fedtune.runtime.project import RunFailed


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kits")
    out = root / "kits"
    provision([site_keygen(site, root / "keys" / site) for site in ("site-a", "site-b")], ["127.0.0.1"], out)
    return out


def test_server_kit_loads_and_names_missing_or_exposed_files(kits: Path, tmp_path: Path):
    kit = ServerKit.load(kits / "server")
    assert sorted(kit.supernode_keys) == ["site-a", "site-b"]
    with pytest.raises(KitError, match=r"lacks \['ca.crt', 'server.crt', 'server.key'"):
        ServerKit.load(tmp_path)
    exposed = tmp_path / "server"
    import shutil

    shutil.copytree(kits / "server", exposed)
    (exposed / "server.key").chmod(0o644)
    with pytest.raises(KitError, match="readable by others: chmod 600"):
        ServerKit.load(exposed)


def test_a_port_in_use_is_refused_before_anything_starts(kits: Path, tmp_path: Path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(RunFailed, match=f"port {port} on 127.0.0.1 is already in use"):
            start_server(ServerKit.load(kits / "server"), tmp_path / "state", host="127.0.0.1", port=port,
                         run_config={}, resume=False, on_round=print)
    assert not (tmp_path / "state").exists()


def test_an_existing_run_needs_resume(kits: Path, tmp_path: Path):
    (tmp_path / "state" / "run" / "checkpoints" / "round-0000").mkdir(parents=True)
    (tmp_path / "state" / "run" / "checkpoints" / "round-0000" / "round.json").write_text("{}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RunFailed, match="already holds a run: continue it with --resume"):
        start_server(ServerKit.load(kits / "server"), tmp_path / "state", host="127.0.0.1", port=port,
                     run_config={}, resume=False, on_round=print)


@pytest.mark.process
@pytest.mark.parametrize("problem, fragment", [
    ("no-data", "does not exist"),
    ("no-kit", "startup kit (--kit)"),
    ("no-keys", "site keys directory (--keys)"),
    ("other-keys", "not the SuperNode key the coordinator enrolled for site 'site-a'"),
    ("foreign-label", "label 'maybe' is not one of"),
])
def test_client_start_refuses_bad_input_with_exit_2(kits: Path, tmp_path: Path, problem, fragment):
    data = tmp_path / "train.csv"
    if problem != "no-data":
        data.write_text("text,label\nfine,positive\n" + ("unsure,maybe\n" if problem == "foreign-label" else ""))
    kit = kits / "sites" / "site-a" if problem != "no-kit" else tmp_path / "nokit"
    keys = {"no-keys": tmp_path / "nokeys", "other-keys": kits.parent / "keys" / "site-b"}.get(
        problem, kits.parent / "keys" / "site-a")
    done = subprocess.run([sys.executable, "-m", "fedtune.cli", "client", "start", "--kit", str(kit), "--keys",
                           str(keys), "--data", str(data), "--state", str(tmp_path / "state"),
                           "--superlink", "127.0.0.1:1", "--labels", "negative,positive"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and fragment in done.stderr, done.stderr


def test_the_clientapp_reads_its_key_from_the_sites_own_folder_and_its_peers_from_its_pinned_members(
        kits: Path, tmp_path: Path):
    from flwr.common.config import parse_config_args

    from client.policy import SitePolicy
    from client.site import site_keys_dir
    from common.registry import load_identity, load_members, load_registry, pin_members
    from fedtune.runtime.daemon import node_config

    kit, keys = kits / "sites" / "site-a", kits.parent / "keys" / "site-a"
    pin_members(kit / "registry.json", tmp_path / "state", load_registry(kit / "registry.json").digest.hex())
    config = parse_config_args([node_config(kit, keys, tmp_path / "d.csv", tmp_path / "state", SitePolicy())])
    keys_dir = site_keys_dir(config)
    assert keys_dir == keys.resolve()
    assert load_identity(keys_dir, "site-a", load_members(Path(config["state-dir"])))[0] == 0


def test_the_sites_policy_flags_reach_the_clientapps_policy(kits: Path, tmp_path: Path):
    """The node config the daemon writes is the one the ClientApp's site policy reads."""
    from flwr.common.config import parse_config_args

    from client.policy import SitePolicy
    from fedtune.runtime.daemon import node_config

    wanted = SitePolicy(labels=("no", "yes"), model_path="/opt/models/bert", max_epsilon=2.5, max_delta=1e-6,
                        min_sites=4, declared_examples=300, dp_modes=("local", "distributed"), min_honest_sites=3)
    config = parse_config_args([node_config(kits / "sites" / "site-a", kits.parent / "keys" / "site-a",
                                            tmp_path / "d.csv", tmp_path / "s", wanted)])
    policy = {k.removeprefix("policy."): v for k, v in config.items() if k.startswith("policy.")}
    assert SitePolicy.from_mapping(policy, "node config") == wanted
