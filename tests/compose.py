"""deploy/docker-compose.yml read as Docker would run it: the image (deploy/Dockerfile's ENTRYPOINT and ENV),
each service's command, environment and volumes, and the one-off commands its header tells people to run.
:class:`Loopback` maps all of it onto this machine (hostnames → 127.0.0.1, the published port → a free
one, volumes → directories), so tests run the exact commands without Docker."""

from __future__ import annotations

import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
IMAGE = "fedtune:0.1.0"


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def image() -> tuple[list[str], dict[str, str]]:
    """The image's ENTRYPOINT and ENV, from deploy/Dockerfile."""
    entrypoint: list[str] = []
    env: dict[str, str] = {}
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT "):
            entrypoint = json.loads(line.removeprefix("ENTRYPOINT "))
        elif line.startswith("ENV "):
            env |= dict(item.split("=", 1) for item in shlex.split(line.removeprefix("ENV ")))
    return entrypoint, env


@dataclass(frozen=True)
class Command:
    """One command as Docker runs it: the service it runs as ("" for a plain ``docker run``), its volumes
    (``SOURCE:TARGET[:ro]``), working directory, environment and arguments after the image's entrypoint."""

    service: str
    volumes: tuple[str, ...]
    args: tuple[str, ...]
    workdir: str = ""
    environment: dict[str, str] = field(default_factory=dict)


def service_command(name: str, args: list[str] | None = None) -> Command:
    """A compose service, with its own command or ``args`` (``docker compose run SERVICE ARGS``)."""
    service = compose()["services"][name]
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return Command(name, tuple(service.get("volumes", ())), tuple(args if args is not None else service["command"]),
                   service.get("working_dir", ""), {k: str(v) for k, v in env.items()})


def renamed(command: Command, site: str, other: str) -> Command:
    """The same service for another site: every mention of ``site`` (its kit, keys, volumes, data) names ``other``."""
    def swap(text: str) -> str:
        return text.replace(site, other)
    return Command(swap(command.service), tuple(map(swap, command.volumes)), tuple(map(swap, command.args)),
                   command.workdir, {name: swap(value) for name, value in command.environment.items()})


def documented_commands() -> list[list[str]]:
    """The shell commands the compose file's header shows (lines joined at a trailing backslash), as argv."""
    lines = [line.removeprefix("#").strip() for line in COMPOSE_FILE.read_text().splitlines() if line.startswith("#")]
    commands, current = [], ""
    for line in lines:
        current += line
        if current.endswith("\\"):
            current = current[:-1].rstrip() + " "
            continue
        if current.startswith("docker "):
            commands.append(shlex.split(current))
        current = ""
    return commands


def as_command(argv: list[str]) -> Command | None:
    """``docker run [--rm] [-v S:T]... [-w DIR] IMAGE ARGS`` or ``docker compose run [--rm] [--no-deps] SERVICE
    ARGS`` as a :class:`Command`; None for ``docker compose up`` and anything else."""
    if argv[:2] == ["docker", "run"]:
        volumes, workdir, rest = [], "", argv[2:]
        while rest[0] != IMAGE:
            flag, rest = rest[0], rest[1:]
            if flag in ("-v", "-w"):
                volumes += [rest[0]] if flag == "-v" else []
                workdir = rest[0] if flag == "-w" else workdir
                rest = rest[1:]
            elif flag != "--rm":
                raise ValueError(f"docker run flag {flag} is not understood here: {shlex.join(argv)}")
        return Command("", tuple(volumes), tuple(rest[1:]), workdir)
    if argv[:3] == ["docker", "compose", "run"]:
        rest = [arg for arg in argv[3:] if arg not in ("--rm", "--no-deps")]
        return service_command(rest[0], rest[1:])
    return None


@dataclass(frozen=True)
class Loopback:
    """Where the trial lives on this machine: ``root`` is the compose project directory ($PWD, ./ paths), named
    volumes are ``root/volumes/NAME``; a service that publishes a port is reached at 127.0.0.1:``port``."""

    root: Path
    port: int

    def host_path(self, source: str) -> Path:
        if source.startswith("$PWD"):
            return self.root / source.removeprefix("$PWD").lstrip("/")
        if source.startswith(("./", "/")) or source == ".":
            return self.root / source.removeprefix("./").lstrip("/")
        volume = self.root / "volumes" / source  # a named volume: starts like the image's 0700 directories
        volume.mkdir(mode=0o700, parents=True, exist_ok=True)
        return volume

    def argv(self, command: Command) -> tuple[list[str], dict[str, str], Path]:
        """The command's argv, environment and working directory on loopback."""
        mounts = {target: self.host_path(source)
                  for source, target, *_ in (volume.split(":") for volume in command.volumes)}
        servers = {name: s["ports"] for name, s in compose()["services"].items() if s.get("ports")}
        hosts = set(servers)  # the services others reach by name (the sites are never reached)
        published = {str(p).split(":")[-1] for ports in servers.values() for p in ports}

        def local(arg: str) -> str:
            for target, path in sorted(mounts.items(), key=lambda item: -len(item[0])):
                if arg == target or arg.startswith(target + "/"):
                    return str(path) + arg.removeprefix(target)
            host, _, port = arg.rpartition(":")
            if host in hosts and port in published:
                return f"127.0.0.1:{self.port}"
            return "127.0.0.1" if arg in hosts else str(self.port) if arg in published else arg

        entrypoint, env = image()
        program = [sys.executable, "-m", "fedtune.cli"] if entrypoint == ["fedtune"] else entrypoint
        environment = os.environ | env | command.environment | {"PYTHONPATH": str(ROOT)}
        workdir = mounts.get(command.workdir, self.root) if command.workdir else self.root
        args = [",".join(map(local, arg.split(","))) for arg in command.args]  # lists of paths or hosts too
        return [*program, *args], environment, workdir
