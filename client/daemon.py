"""``fedtune client start``: the on-premise daemon — a Flower SuperNode with TLS and the site key.

The site's data path, state directory (privacy ledger, secure-aggregation sessions, its own
audit log), kit and ε ceiling go into the SuperNode's node config; the coordinator never sees
them. No runtime dependency installation (air-gapped sites). The SuperNode retries without
limit, so the daemon reconnects by itself after the coordinator restarts.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from common.data import read_records
from common.processes import ManagedProcess, console_script, flower_env, free_port, terminate_as_interrupt
from common.kits import check_kit

log = logging.getLogger("fedtune.client")


def node_config(kit: Path, data: Path, state: Path, max_epsilon: float) -> str:
    site = json.loads((kit / "site.json").read_text())["site"]
    values = {"site-name": site, "data-path": str(data.resolve()), "state-dir": str(state.resolve()),
              "kit-dir": str(kit.resolve()), "max-epsilon": float(max_epsilon)}
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def start_client(kit: Path, data: Path, state: Path, *, superlink: str, max_epsilon: float) -> int:
    """Run the SuperNode until it stops or the daemon is interrupted; its exit code."""
    check_kit(kit)
    read_records(str(data))  # a bad data file is refused here, with its line, before we connect
    state.mkdir(parents=True, exist_ok=True)
    supernode = ManagedProcess(
        [console_script("flower-supernode"), "--superlink", superlink, "--root-certificates", str(kit / "ca.crt"),
         "--auth-supernode-private-key", str(kit / "supernode.key"), "--node-config",
         node_config(kit, data, state, max_epsilon), "--host", "127.0.0.1", "--port", str(free_port()),
         "--isolation", "subprocess"],
        flower_env(state / "flwr"), state / "supernode.log")
    with terminate_as_interrupt():
        try:
            supernode.start()
            while (code := supernode.exited()) is None:
                supernode.track()
                time.sleep(1.0)
            return code
        finally:
            supernode.stop()
