"""Deployed round overhead on loopback: 4 site daemons, TLS, site authentication, DP, secure aggregation.

    python -m simulations.benchmarks.deployed_round [--sites 4] [--rounds 3] [--executors fedtune,flower]

The same federation runs once per executor, one after the other in one run:
- ``fedtune``: ``fedtune client start`` (a SuperNode with short idle polls, and the site's own executor
  process, which keeps the ClientApp, torch and the data loaded between messages);
- ``flower``: Flower's stock SuperNode (``--isolation subprocess``: a fresh ``flwr-clientapp`` per
  message, which installs and imports the coordinator's FAB, and 3 s idle polls), for comparison only.
Overhead = the round's exchanges (identify, train, share, mask, confirm, unmask) minus the slowest
site's DP training (from its ledger charge to its sealed release, in the site's own audit log).
Prints a Markdown table with the time of each exchange.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from client.policy import SitePolicy
from client.privacy import CHARGE_EVENT
from common.data import read_records, write_records
from common.registry import load_registry
from common.run_files import RUN_FILE, read_metrics
from fedtune.runtime.daemon import node_config
from fedtune.runtime.kits import check_kit
from fedtune.runtime.processes import ManagedProcess, console_script, flower_env, free_port, terminate_as_interrupt

LABELS = "negative,neutral,positive"


def fedtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtune.cli", *args]


def provision(root: Path, sites: list[str]) -> None:
    for site in sites:
        subprocess.run(fedtune("site", "keygen", "--site", site, "--out", str(root / "keys" / site)), check=True,
                       capture_output=True)
    enrolments = ",".join(str(root / "keys" / site / f"{site}.enrol.json") for site in sites)
    subprocess.run(fedtune("provision", "--enrol", enrolments, "--server-host", "127.0.0.1", "--out",
                           str(root / "kits")), check=True, capture_output=True)


def site_daemon(executor: str, root: Path, run: Path, site: str, superlink: str) -> ManagedProcess:
    kit, keys, data, state = root / "kits" / "sites" / site, root / "keys" / site, root / f"{site}.csv", run / site
    # The site's officer pins the member list (here the one provisioning made, as every officer confirmed it).
    subprocess.run(fedtune("site", "pin-members", "--registry", str(kit / "registry.json"), "--state", str(state),
                           "--digest", load_registry(kit / "registry.json").digest.hex()), check=True,
                   capture_output=True)
    if executor == "fedtune":
        command = fedtune("client", "start", "--kit", str(kit), "--keys", str(keys), "--data", str(data), "--state",
                          str(state), "--superlink", superlink, "--labels", LABELS, "--max-epsilon", "8")
    else:  # Flower's stock executor, with the same kit, keys and node config
        files = check_kit(kit, keys)["files"]
        policy = SitePolicy(labels=tuple(LABELS.split(",")), max_epsilon=8.0)
        command = [console_script("flower-supernode"), "--superlink", superlink, "--root-certificates",
                   str(files["ca.crt"]), "--auth-supernode-private-key", str(files["supernode.key"]), "--node-config",
                   node_config(kit, keys, data, state, policy), "--isolation", "subprocess", "--host", "127.0.0.1",
                   "--port", str(free_port())]
    return ManagedProcess(command, flower_env(state / "flwr"), run / f"{site}.log")


def wait_for(path: Path, server: ManagedProcess, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if server.exited() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the coordinator did not start its run: see {server.log_path}")
        time.sleep(0.5)


def federation(executor: str, root: Path, sites: list[str], rounds: int) -> list[dict]:
    """Run one federation; per round: each exchange's seconds and the slowest site's training."""
    run, port = root / executor, free_port()
    server = ManagedProcess(fedtune(
        "server", "start", "--kit", str(root / "kits" / "server"), "--state", str(run / "server"), "--host",
        "127.0.0.1", "--port", str(port), "--sites", str(len(sites)), "--rounds", str(rounds), "--test-data",
        str(root / "test.csv"), "--labels", LABELS, "--max-length", "16", "--local-epochs", "1", "--batch-size", "8"),
        flower_env(run / "flwr"), run / "server.log")
    daemons = [site_daemon(executor, root, run, site, f"127.0.0.1:{port}") for site in sites]
    with terminate_as_interrupt():
        try:
            server.start()
            if executor == "flower":  # a stock SuperNode gives up if the sites are not registered yet
                wait_for(run / "server" / "run" / RUN_FILE, server)
            for daemon in daemons:
                daemon.start()
            if server.wait(timeout=1800) != 0:
                raise RuntimeError(f"the {executor} federation failed: see {run / 'server.log'}")
        finally:
            for process in [*daemons, server]:
                process.stop()
    trained: dict[int, float] = {}  # the slowest site's DP training per round, from the sites' own audit logs
    for audit in run.glob("site-*/audit.jsonl"):
        charged = {}
        for entry in map(json.loads, audit.read_text().splitlines()):
            when = datetime.fromisoformat(entry["time"]).timestamp()
            if entry["event"] == CHARGE_EVENT:
                charged[entry["round"]] = when
            elif entry["event"] == "released":
                trained[entry["round"]] = max(trained.get(entry["round"], 0.0), when - charged[entry["round"]])
    rows = []
    for line in read_metrics(run / "server" / "run"):
        if line.round == 0:  # the initial adapter
            continue
        if line.secure_aggregation is None:
            raise RuntimeError(f"round {line.round} was not a secure round: see {run}")
        exchanges = line.secure_aggregation.exchange_seconds
        total = sum(exchanges.values())
        if line.round not in trained:
            raise RuntimeError(f"no site logged its training for round {line.round}: see {run}")
        rows.append({"round": line.round, "exchanges": exchanges, "total": total,
                     "training": trained[line.round], "overhead": total - trained[line.round]})
    return rows


def table(results: dict[str, list[dict]]) -> str:
    stages = list(next(iter(results.values()))[0]["exchanges"])
    lines = ["| executor | round | " + " | ".join(stages) + " | round | slowest training | overhead |",
             "|---|---:|" + "---:|" * (len(stages) + 3)]
    for executor, rows in results.items():
        for row in rows:
            lines.append(f"| {executor} | {row['round']} | " + " | ".join(
                f"{row['exchanges'].get(stage, 0):.2f}" for stage in stages) +
                f" | {row['total']:.1f} | {row['training']:.1f} | **{row['overhead']:.1f}** |")
    medians = {executor: statistics.median(row["overhead"] for row in rows) for executor, rows in results.items()}
    lines.append("")
    lines.append("median overhead per round: " + ", ".join(f"{e} {m:.1f} s" for e, m in medians.items()))
    if {"fedtune", "flower"} <= set(medians):
        lines.append(f"Flower's stock executor / fedtune's: {medians['flower'] / medians['fedtune']:.1f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--executors", default="fedtune,flower")
    args = parser.parse_args()
    sites = [f"site-{i}" for i in range(args.sites)]
    reviews = read_records("drugreview")
    with tempfile.TemporaryDirectory(prefix="fedtune-deployed-") as tmp:
        root = Path(tmp)
        for i, site in enumerate(sites):
            write_records(root / f"{site}.csv", reviews[i * 15:(i + 1) * 15])
        write_records(root / "test.csv", reviews[500:530])
        provision(root, sites)
        results = {}
        for executor in args.executors.split(","):
            results[executor] = federation(executor, root, sites, args.rounds)
            print(json.dumps({executor: results[executor]}), flush=True)  # the raw rows, as soon as they exist
    print(table(results))


if __name__ == "__main__":
    main()
