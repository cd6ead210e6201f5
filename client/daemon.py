"""``fedtune client start``: the on-premise daemon — a Flower SuperNode with TLS and the site key.

Two directories: the kit the coordinator sent (public files: CA certificate, registry, passport
key, site.json) and the site's own keys from ``fedtune site keygen`` (identity and SuperNode keys,
made at the site and never anywhere else). The site's data path, state directory (privacy ledger,
secure-aggregation sessions, its own audit log), kit and ε ceiling go into the SuperNode's node
config; the coordinator never sees them. No runtime dependency installation (air-gapped sites).
The SuperNode retries without limit, so the daemon reconnects by itself after the coordinator
restarts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from common.data import read_records
from common.processes import ManagedProcess, console_script, flower_env, free_port, terminate_as_interrupt
from common.kits import SITE_KIT_FILES, check_kit
from common.registry import IDENTITY_FILE

log = logging.getLogger("fedtune.client")


NODE_KIT = "node-kit"


def node_kit(kit: Path, keys: Path, state: Path) -> Path:
    """``STATE/node-kit/``: links to the kit's public files and to the site's identity key, the one
    directory the ClientApp reads them from (its node config's ``kit-dir``). Rebuilt at each start;
    no key is copied."""
    target = state / NODE_KIT
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(mode=0o700, parents=True)
    for name in SITE_KIT_FILES:
        os.symlink((kit / name).resolve(), target / name)
    os.symlink((keys / IDENTITY_FILE).resolve(), target / IDENTITY_FILE)
    return target


def node_config(kit: Path, data: Path, state: Path, max_epsilon: float) -> str:
    site = json.loads((kit / "site.json").read_text())["site"]
    values = {"site-name": site, "data-path": str(data.resolve()), "state-dir": str(state.resolve()),
              "kit-dir": str(kit.resolve()), "max-epsilon": float(max_epsilon)}
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


CONNECTED_AFTER_S = 60.0
"""A SuperNode that ran this long had connected: its later exit is a lost connection, not a refusal."""


def start_client(kit: Path, keys: Path, data: Path, state: Path, *, superlink: str, max_epsilon: float,
                 connect_timeout: float = 600.0) -> int:
    """Keep the site's SuperNode running until the daemon is stopped (Ctrl-C, SIGTERM).

    A SuperNode that stops is started again (the coordinator may be restarting, or may not have
    registered the site yet); one that has not managed to connect for ``connect_timeout`` seconds
    ends the daemon with its exit code (an unregistered site, a kit from another provisioning).
    """
    files = check_kit(kit, keys)["files"]
    read_records(str(data))  # a bad data file is refused here, with its line, before we connect
    state.mkdir(parents=True, exist_ok=True)
    command = [console_script("flower-supernode"), "--superlink", superlink, "--root-certificates",
               str(files["ca.crt"]), "--auth-supernode-private-key", str(files["supernode.key"]), "--node-config",
               node_config(node_kit(kit, keys, state), data, state, max_epsilon), "--isolation", "subprocess",
               "--host", "127.0.0.1"]
    failing_since: float | None = None
    attempt = 0
    with terminate_as_interrupt():
        while True:
            supernode = ManagedProcess([*command, "--port", str(free_port())], flower_env(state / "flwr"),
                                       state / "supernode.log")
            started = time.monotonic()
            try:
                supernode.start()
                while (code := supernode.exited()) is None:
                    supernode.track()
                    time.sleep(1.0)
            finally:
                supernode.stop()
            now = time.monotonic()
            if now - started >= CONNECTED_AFTER_S:
                failing_since, attempt = None, 0
            failing_since = failing_since or started
            if now - failing_since > connect_timeout:
                return code or 1
            attempt += 1
            pause = min(30.0, 2.0 ** attempt)
            log.warning("the SuperNode stopped (exit %s); connecting again in %.0fs", code, pause)
            time.sleep(pause)
