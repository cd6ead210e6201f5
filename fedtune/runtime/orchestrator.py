"""``fedtune server start``: the coordinator — a SuperLink with TLS, site authentication and a
persistent state database; registers the kit's sites, submits the fedtune run, streams rounds.

With ``resume`` it continues from the newest checkpoint in the state directory (after a crash or
a SIGKILL), or starts afresh when there is none yet (so a service manager can always pass it):
no completed round is lost and each checkpoint names its parent's checksum.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import BadInput
from common.run_files import MetricsLine, latest_checkpoint
from fedtune.runtime.control import CONNECTION, Control, wait_healthy
from fedtune.runtime.kits import check_server_certificates
from fedtune.runtime.processes import ManagedProcess, console_script, flower_env, port_in_use, terminate_as_interrupt
from fedtune.runtime.project import RunFailed

log = logging.getLogger("fedtune.server")
START_TIMEOUT_S = 60.0


class KitError(BadInput):
    """The server kit is missing a file or holds one it must not."""


@dataclass(frozen=True)
class ServerKit:
    ca: Path
    certificate: Path
    key: Path
    registry: Path
    passport_key: Path
    supernode_keys: dict[str, Path]

    @classmethod
    def load(cls, directory: Path) -> ServerKit:
        files = {name: directory / name for name in
                 ("ca.crt", "server.crt", "server.key", "registry.json", "passport-signing.key")}
        missing = [name for name, path in files.items() if not path.is_file()]
        if missing:
            raise KitError(f"server kit {directory} lacks {missing}; "
                           "use the server/ directory `fedtune provision` wrote")
        for secret in ("server.key", "passport-signing.key"):
            if files[secret].stat().st_mode & 0o077:
                raise KitError(f"{files[secret]} is readable by others: chmod 600 it")
        if (directory / "ca.key").exists():
            raise KitError(f"{directory} holds ca.key: keep the CA key offline, not in the server kit")
        check_server_certificates(directory)  # valid now (a warning 30 days before expiry), one provisioning's
        keys = {path.stem: path for path in sorted((directory / "supernode-keys").glob("*.pub"))}
        if not keys:
            raise KitError(f"server kit {directory} has no supernode-keys/*.pub: no site could authenticate")
        return cls(files["ca.crt"], files["server.crt"], files["server.key"], files["registry.json"],
                   files["passport-signing.key"], keys)


def start_server(kit: ServerKit, state: Path, *, host: str, port: int, run_config: dict[str, Any], resume: bool,
                 on_round: Callable[[MetricsLine], None]) -> dict[str, Any]:
    """Run the SuperLink and one federated run to its end; Flower's final run record."""
    if port_in_use(host, port):
        raise RunFailed(f"port {port} on {host} is already in use: stop what holds it or pass --port")
    state.mkdir(parents=True, exist_ok=True)
    out_dir = state / "run"
    found = latest_checkpoint(out_dir)
    resume_from = str(found) if resume and found else ""
    if resume and not found:
        log.warning("--resume: no checkpoint in %s yet, starting the run afresh", out_dir)
    elif not resume and found:
        raise RunFailed(f"{out_dir} already holds a run: continue it with --resume, or use a new --state directory")
    run_config = run_config | {
        "out-dir": str(out_dir.resolve()), "secagg.registry": str(kit.registry.resolve()),
        "passport-key": str(kit.passport_key.resolve()), "resume-from": resume_from,
    }
    flwr_home = state / "flwr"
    superlink = ManagedProcess(
        [console_script("flower-superlink"), "--ssl-ca-certfile", str(kit.ca), "--ssl-certfile", str(kit.certificate),
         "--ssl-keyfile", str(kit.key), "--enable-supernode-auth", "--database", str(state / "superlink.db"),
         "--host", host, "--port", str(port), "--isolation", "subprocess",
         "--disable-runtime-dependency-installation"],
        flower_env(flwr_home), state / "superlink.log")
    control = Control(flwr_home, f"{host}:{port}", root_certificates=kit.ca)
    with terminate_as_interrupt():
        try:
            superlink.start()
            wait_healthy(superlink, f"https://{host}:{port}/health", START_TIMEOUT_S, verify=str(kit.ca))
            register_sites(control, kit)
            return control.run_to_end(run_config, out_dir, on_round, state / "flower.log", superlink)
        finally:
            superlink.stop()


def register_sites(control: Control, kit: ServerKit) -> None:
    """Enrol every site's SuperNode key; a key already enrolled (a restart) is fine."""
    for site, key in kit.supernode_keys.items():
        answer = control.flwr("supernode", "register", str(key.resolve()), CONNECTION, "--name", site)
        if not answer.get("success") and "already" not in str(answer.get("error-message", "")).lower():
            raise RunFailed(f"could not register site {site!r}: {answer.get('error-message', answer)}")
