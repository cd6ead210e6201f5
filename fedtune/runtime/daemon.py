"""``fedtune client start``: the on-premise daemon — a Flower SuperNode with TLS and the site key, and
the site's own task executor (fedtune.runtime.executor), which runs every message with the ClientApp installed
here and keeps it loaded; the coordinator's FAB is never installed or run at the site.

Two directories: the kit the coordinator sent (public files: CA certificate, registry, passport
key, site.json) and the site's own keys from ``fedtune site keygen`` (identity and SuperNode keys,
made at the site and never anywhere else). The daemon starts only once the site's officer has
pinned the member list every officer confirmed (``fedtune site pin-members``, in the state dir).
The site's data path, state directory (privacy ledger, pinned members, secure-aggregation
sessions, its own audit log), kit and ε ceiling go into the SuperNode's node config; the
coordinator never sees them. The coordinator's signed receipts of the site's charges are kept
OUTSIDE the state directory (``--receipts``; default ``<state>/../<state-name>.receipts``), so a
backup of the state restored over a newer one is noticed (client/rollback.py). No runtime
dependency installation (air-gapped sites).
The SuperNode retries without limit, so the daemon reconnects by itself after the coordinator
restarts.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path

from client.policy import SitePolicy
from common.config import unit_column
from common.data import encode_labels, read_records, unit_indices
from common.files import default_receipts_dir, private_dir, write_private
from fedtune.runtime.kits import check_kit, check_members
from fedtune.runtime.processes import ManagedProcess, flower_env, free_port, terminate_as_interrupt

log = logging.getLogger("fedtune.client")


def node_config(kit: Path, keys: Path, data: Path, state: Path, policy: SitePolicy,
                receipts: Path | None = None) -> str:
    """What the ClientApp learns of its site: where things are, and the site's own policy (``policy.*``)."""
    site = json.loads((kit / "site.json").read_text())["site"]
    receipts = receipts or default_receipts_dir(state)
    values = {"site-name": site, "data-path": str(data.resolve()), "state-dir": str(state.resolve()),
              "kit-dir": str(kit.resolve()), "keys-dir": str(keys.resolve()), "receipts-dir": str(receipts.resolve()),
              **{f"policy.{key}": value for key, value in policy.to_mapping().items() if value is not None}}
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


CONNECTED_AFTER_S = 60.0
"""A SuperNode that ran this long had connected: its later exit is a lost connection, not a refusal."""


def site_processes(files: dict[str, Path], kit: Path, keys: Path, data: Path, state: Path, *, superlink: str,
                   policy: SitePolicy, receipts: Path | None = None) -> tuple[ManagedProcess, ManagedProcess]:
    """The SuperNode (short idle polls, ``fedtune.runtime.supernode``) and the site's executor, which runs every
    task with the site's own ClientApp and shares a fresh secret with the SuperNode to claim them.
    The state and receipts directories are made (or forced) 0700, the secret 0600."""
    port = free_port()
    private_dir(state)
    private_dir(receipts or default_receipts_dir(state))
    secret = state / "executor.secret"
    write_private(secret, secrets.token_bytes(32))
    env = flower_env(state / "flwr")
    supernode = ManagedProcess(
        [sys.executable, "-m", "fedtune.runtime.supernode", "--superlink", superlink, "--root-certificates",
         str(files["ca.crt"]), "--auth-supernode-private-key", str(files["supernode.key"]), "--node-config",
         node_config(kit, keys, data, state, policy, receipts), "--isolation", "process",
         "--superexec-auth-secret-file", str(secret), "--host", "127.0.0.1", "--port", str(port)], env,
        state / "supernode.log")
    executor = ManagedProcess([sys.executable, "-m", "fedtune.runtime.executor",
                                "--runtime-api-address", f"127.0.0.1:{port}", "--secret-file", str(secret),
                                "--state-dir", str(state)], env, state / "executor.log")
    return supernode, executor


def run_site_processes(files: dict[str, Path], kit: Path, keys: Path, data: Path, state: Path, *,
                       superlink: str, policy: SitePolicy, receipts: Path | None = None,
                       on_serving: Callable[[bool], None] = lambda serving: None) -> int:
    """Run the SuperNode and its executor until either stops; return the exit code of the one that did.
    ``on_serving`` hears when both run, and when they stop (the site's readiness)."""
    supernode, executor = site_processes(files, kit, keys, data, state, superlink=superlink, policy=policy,
                                         receipts=receipts)
    try:
        supernode.start()
        executor.start()
        on_serving(True)
        while (code := supernode.exited()) is None and (code := executor.exited()) is None:
            supernode.track()
            time.sleep(1.0)
        return code
    finally:
        on_serving(False)
        executor.stop()
        supernode.stop()


def start_client(kit: Path, keys: Path, data: Path, state: Path, *, superlink: str, policy: SitePolicy,
                 connect_timeout: float = 600.0, receipts: Path | None = None,
                 on_serving: Callable[[bool], None] = lambda serving: None) -> int:
    """Keep the site's SuperNode running until the daemon is stopped (Ctrl-C, SIGTERM).

    A SuperNode that stops is started again (the coordinator may be restarting, or may not have
    registered the site yet); one that has not managed to connect for ``connect_timeout`` seconds
    ends the daemon with its exit code (an unregistered site, a kit from another provisioning).
    """
    files = check_kit(kit, keys)["files"]
    # A bad data file, a record whose label is not the agreed one, or a row without its privacy unit is
    # refused here, locally, with its line.
    records = read_records(str(data), task=policy.task)
    if policy.task == "classification":
        encode_labels(records, policy.labels, str(data))
    unit_indices(records, unit_column(policy.privacy_unit), str(data))
    private_dir(state)
    check_members(kit, keys, state)  # the peers this site's officer confirmed, pinned in its own state dir
    failing_since: float | None = None
    attempt = 0
    with terminate_as_interrupt():
        while True:
            started = time.monotonic()
            code = run_site_processes(files, kit, keys, data, state, superlink=superlink, policy=policy,
                                      receipts=receipts, on_serving=on_serving)
            now = time.monotonic()
            if now - started >= CONNECTED_AFTER_S:
                failing_since, attempt = None, 0
            failing_since = failing_since or started
            if now - failing_since > connect_timeout:
                return code or 1
            attempt += 1
            pause = min(30.0, 2.0 ** attempt)
            log.warning("the SuperNode or the site executor stopped (exit %s); starting both again in %.0fs", code,
                        pause)
            time.sleep(pause)
