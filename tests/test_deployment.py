"""Deployment end to end, on loopback: a SuperLink with TLS and site authentication, four site
daemons (SuperNodes with their kits), DP and secure aggregation, through the `fedtune` CLI.

Each site makes its own keys (`fedtune site keygen`); the coordinator provisions from their
public enrolment files. One scenario, in order: an unregistered site is refused; a site is
killed mid-run and the rounds go on with the others; the coordinator is SIGKILLed mid-round, after
a site sealed its update and before any masked upload left, and `--resume` completes the run with a
continuous checkpoint lineage, each round charged once; the killed site restarts and keeps its ε
ledger; the final adapter's passport verifies and a tampered one does not. Every
process the test started, and every process below those, is stopped.

Nothing here depends on how fast the machine is: each step waits for the state it needs (the first
round of a run waits for all four sites to connect), with deadlines only as a safety net; a site that
dies is dropped when the SuperLink's heartbeat marks it offline, not by a timeout.
Slow: about 3 minutes (more on a busy machine: `make test-busy`).
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from common.audit import verify_chain
from common.run_files import ROUND_FILE, RoundInfo, read_metrics, read_round_info
from fedtune.runtime.kits import supernode_fingerprint
from fedtune.runtime.processes import free_port
from tests.conftest import write_csv
from tests.processes import ProcessFamily, described

pytestmark = [pytest.mark.slow, pytest.mark.process]
SITES = ["site-a", "site-b", "site-c", "site-d"]
DEADLINE_S = 1800.0
"""Safety net of every wait for a state (a run's round, a daemon's exit): only a hung run reaches it."""


def fedtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtune.cli", *args]


def wait_for(world: dict, condition: Callable[[], bool], what: str, poll: float = 0.5) -> None:
    """Until ``condition`` holds, recording the processes' descendants; the coordinator stopping first fails."""
    family, server = world["family"], world["procs"]["server"]
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        family.snapshot()
        if server.poll() is not None or time.monotonic() > deadline:
            log = (world["logs"] / "server.log").read_text()[-3000:]
            raise AssertionError(f"no {what} (the coordinator's exit code: {server.returncode}):\n{log}")
        time.sleep(poll)


def released(root: Path, site: str, server_round: int, suffix: str) -> bool:
    """Whether the site has sealed its update for the round ("npy") or its masked upload left ("uploaded")."""
    return any((root / "state" / site / "released").glob(f"round-{server_round:06d}-*.{suffix}"))


def checkpoints(run: Path) -> list[RoundInfo]:
    return [read_round_info(p) for p in sorted((run / "checkpoints").glob("round-*")) if (p / ROUND_FILE).exists()]


@pytest.fixture(scope="module")
def world(tmp_path_factory, drug_reviews):
    root = tmp_path_factory.mktemp("deploy")
    for i, site in enumerate(SITES):
        write_csv(root / f"{site}.csv", drug_reviews[i * 15:(i + 1) * 15])
    write_csv(root / "test.csv", drug_reviews[500:530])
    # Each site makes its own keys; the coordinator provisions from their public enrolment files only.
    for site in SITES:
        made = subprocess.run(fedtune("site", "keygen", "--site", site, "--out", str(root / "keys" / site)),
                              capture_output=True, text=True, timeout=120)
        assert made.returncode == 0, made.stderr
    enrolments = ",".join(str(root / "keys" / site / f"{site}.enrol.json") for site in SITES)
    done = subprocess.run(fedtune("provision", "--enrol", enrolments, "--server-host", "127.0.0.1",
                                  "--out", str(root / "kits")), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # Every officer confirms the members digest provisioning printed, and pins it in the site's state.
    digest = done.stdout.split("members digest: ", 1)[1].splitlines()[0]
    for site in [*SITES, "site-rogue"]:
        kit = root / "kits" / "sites" / (site if site in SITES else "site-d")
        pinned = subprocess.run(fedtune("site", "pin-members", "--registry", str(kit / "registry.json"), "--state",
                                        str(root / "state" / site), "--digest", digest),
                                capture_output=True, text=True, timeout=120)
        assert pinned.returncode == 0, pinned.stderr
    # A site that trusts our CA and holds a real site identity, but a SuperNode key nobody registered
    # (its kit's site.json edited to name that key, so it gets past the local check to the coordinator).
    rogue, rogue_keys = root / "rogue-kit", root / "rogue-keys"
    shutil.copytree(root / "kits" / "sites" / "site-d", rogue)
    shutil.copytree(root / "keys" / "site-d", rogue_keys)
    key = ec.generate_private_key(ec.SECP384R1())
    (rogue_keys / "supernode.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    (rogue_keys / "supernode.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    info = json.loads((rogue / "site.json").read_text())
    info["supernode_sha256"] = supernode_fingerprint(key.public_key())
    (rogue / "site.json").write_text(json.dumps(info))
    port = free_port()
    server_args = ["server", "start", "--kit", str(root / "kits" / "server"), "--state", str(root / "server"),
                   "--host", "127.0.0.1", "--port", str(port), "--sites", "4", "--rounds", "3",
                   "--test-data", str(root / "test.csv"), "--labels", "negative,neutral,positive",
                   "--max-length", "16", "--local-epochs", "1", "--batch-size", "8",
                   # Round 1 starts once all four sites are connected (their daemons start with the coordinator,
                   # and a SuperNode refused before its key is registered retries with a growing pause).
                   "--site-wait", str(DEADLINE_S)]
    procs: dict[str, subprocess.Popen] = {}
    family = ProcessFamily()
    logs = root / "logs"
    logs.mkdir()

    def start(name: str, args: list[str]) -> subprocess.Popen:
        with open(logs / f"{name}.log", "ab") as out:
            procs[name] = family.start(fedtune(*args), stdout=out, stderr=subprocess.STDOUT)
        return procs[name]

    def start_site(site: str, kit: Path | None = None, keys: Path | None = None, data: str | None = None,
                   connect_timeout: float = DEADLINE_S) -> subprocess.Popen:
        return start(site, ["client", "start", "--kit", str(kit or root / "kits" / "sites" / site),
                            "--keys", str(keys or root / "keys" / site), "--data", str(root / f"{data or site}.csv"),
                            "--state", str(root / "state" / site),
                            "--superlink", f"127.0.0.1:{port}", "--labels", "negative,neutral,positive",
                            "--max-epsilon", "8", "--connect-timeout", str(connect_timeout)])

    yield {"root": root, "run": root / "server" / "run", "start": start, "start_site": start_site,
           "server_args": server_args, "procs": procs, "rogue": rogue, "rogue_keys": rogue_keys, "logs": logs,
           "family": family}
    family.stop()


def test_the_deployed_federation_survives_dropouts_and_a_coordinator_crash(world):
    run, procs, root, family = world["run"], world["procs"], world["root"], world["family"]
    world["start"]("server", world["server_args"])
    for site in SITES:
        world["start_site"](site)
    # An unregistered SuperNode key is refused at connection: the rogue daemon gives up (after its
    # --connect-timeout of refusals) with a clear error.
    rogue = world["start_site"]("site-rogue", world["rogue"], world["rogue_keys"], data="site-d", connect_timeout=40)
    assert family.wait(rogue, DEADLINE_S) != 0
    assert "the coordinator has not registered" in (world["logs"] / "site-rogue.log").read_text()

    # Kill one site mid-run, once round 1 is checkpointed: later rounds go on with the other three.
    wait_for(world, lambda: any(c.round == 1 for c in checkpoints(run)), "round 1", poll=0.1)
    family.signal_tree(procs["site-d"], 9)
    assert not released(root, "site-d", 2, "uploaded"), "killed too late: site-d's round-2 upload had left"
    # SIGKILL the coordinator (and its SuperLink) in round 3, once a site has sealed its round-3 update but
    # before any masked upload left: on resume the sealed updates are resent, for no new ε. (After an upload
    # the site must train afresh, charged, which the 3-round plan cannot afford: tests/test_federation_inprocess.)
    # No upload can leave before every site's training reply is in and their shares went round.
    wait_for(world, lambda: any(released(root, site, 3, "npy") for site in SITES[:3]), "a round-3 release",
             poll=0.05)
    family.signal_tree(procs["server"], 9)
    assert not any(released(root, site, 3, "uploaded") for site in SITES), "killed too late: an upload had left"
    assert not any(c.round == 3 for c in checkpoints(run))

    # Restart: the coordinator resumes from round 2; site-d comes back with its ledger (the resumed run's
    # first round waits for all four sites again).
    world["start"]("server", world["server_args"] + ["--resume"])
    world["start_site"]("site-d")
    assert family.wait(procs["server"], DEADLINE_S) == 0, (world["logs"] / "server.log").read_text()[-3000:]

    by_round = {line.round: line for line in read_metrics(run)}
    assert by_round[1].contributors == 4 and by_round[1].secure_aggregation.dropped == []
    assert by_round[2].model_updated and by_round[2].contributors == 3
    assert "site-d" not in by_round[2].secure_aggregation.survivors
    assert by_round[3].model_updated and by_round[3].contributors == 4, by_round[3]

    infos = checkpoints(run)
    assert [c.round for c in infos] == [0, 1, 2, 3]
    for parent, child in itertools.pairwise(infos):
        assert child.parent_sha256 == parent.adapter_sha256
    events = [json.loads(x)["event"] for x in (run / "audit.jsonl").read_text().splitlines()]
    assert verify_chain(run / "audit.jsonl") == len(events) and "run-resumed" in events

    # Each round is charged once: the sites that had sealed round 3 resent it, and the run ends inside every
    # site's budget. The restarted site kept its ledger; its local audit log shows each round it trained.
    assert "round 3 was already released for this adapter" in "".join(
        (root / "state" / site / "executor.log").read_text() for site in SITES[:3])
    # (site-d may have been killed after round 2's write-ahead charge, mid-training: that round stays charged.)
    for site, allowed in {"site-a": [[1, 2, 3]], "site-b": [[1, 2, 3]], "site-c": [[1, 2, 3]],
                          "site-d": [[1, 3], [1, 2, 3]]}.items():
        ledger = json.loads((root / "state" / site / "privacy-ledger.json").read_text())
        assert [e["round"] for e in ledger["rounds"]] in allowed, ledger
        spent = [e["epsilon"] for e in ledger["rounds"]]
        assert spent == sorted(spent) and spent[-1] <= 8.0, spent
    assert verify_chain(root / "state" / "site-d" / "audit.jsonl") >= 2

    # Every task ran in each site's own executor with the site's installed ClientApp: the coordinator's FAB
    # (code the coordinator wrote) was never unpacked, let alone imported, at any site.
    for site in SITES:
        assert "task train done" in (root / "state" / site / "executor.log").read_text()
        assert not (root / "state" / site / "flwr" / "apps").exists()


def test_the_final_passport_verifies_and_a_tampered_one_fails(world):
    adapter = world["run"] / "final" / "adapter"
    key = world["root"] / "kits" / "sites" / "site-a" / "passport-signing.pub"
    ok = subprocess.run(fedtune("passport", "verify", str(adapter), "--key", str(key)), capture_output=True, text=True)
    assert ok.returncode == 0 and "contributing sites" in ok.stdout, ok.stdout + ok.stderr
    tampered = world["root"] / "tampered"
    shutil.copytree(adapter, tampered)
    passport = json.loads((tampered / "passport.json").read_text())
    passport["passport"]["contributors"] = 40
    (tampered / "passport.json").write_text(json.dumps(passport))
    bad = subprocess.run(fedtune("passport", "verify", str(tampered), "--key", str(key)), capture_output=True,
                         text=True)
    assert bad.returncode == 1


def test_every_process_is_stopped(world):
    """SIGTERM to each fedtune command alone (what systemd or Ctrl-C does): fedtune itself must stop the
    SuperLink, SuperNodes and app processes it started (every one of them recorded while the run was live)."""
    family = world["family"]
    daemons = {proc.pid for proc in world["procs"].values()}
    below = [member for member in family.alive() if member.pid not in daemons]
    assert len(below) >= 2 * len(SITES), described(below)  # at least each site's SuperNode and executor
    for proc in world["procs"].values():
        if proc.poll() is None:
            proc.send_signal(15)
    for proc in world["procs"].values():
        family.wait(proc, DEADLINE_S)
    assert described(family.alive()) == []
