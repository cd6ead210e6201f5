"""Deployment end to end, on loopback: the docker-compose trial (deploy/docker-compose.yml) run as Docker would
run it, without Docker (tests/compose.py), with one more site made from the same template, through a crash.

Every command the compose file's header tells people to run (each site's keygen, the coordinator's
provisioning from the public enrolment files, each officer's members check and pin), then every service's
command with the image's entrypoint and environment: a SuperLink with TLS and site authentication, site
daemons (SuperNodes with their kits, keys and receipts), DP and secure aggregation. The only changes to what
the file runs: hostnames → 127.0.0.1, the published port → a free one, volumes → directories, tiny data and
the coordinator's sizes (TRIAL_SIZES), and a fourth site, hospital-d, from hospital-a's lines, so that one
site can die while the other three still meet every site's policy (at least 3 sites per round).

One scenario, in order: an unregistered SuperNode key is refused; a site is killed mid-run and the rounds go
on with the others; the coordinator is SIGKILLed mid-round, after a site sealed its update and before any
masked upload left, and its compose command (which always resumes) completes the run with a continuous
checkpoint lineage, each round charged once; the killed site restarts and keeps its ε ledger; the final
adapter's passport verifies and a tampered one does not; `docker compose down` (SIGTERM to each service)
stops every process the services started.

Nothing here depends on how fast the machine is: each step waits for the state it needs (the first round
of a run waits for all four sites to connect), with deadlines only as a safety net; a site that dies is
dropped when the SuperLink's heartbeat marks it offline, not by a timeout. Slow: about 4 minutes (more on
a busy machine: `make test-busy`).
"""

from __future__ import annotations

import itertools
import json
import re
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
from common.run_files import ROUND_FILE, RoundInfo, read_metrics, read_round_info, read_run_info
from fedtune.runtime.kits import supernode_fingerprint
from fedtune.runtime.processes import free_port
from tests.compose import (
    COMPOSE_FILE,
    Command,
    Loopback,
    as_command,
    compose,
    documented_commands,
    renamed,
    service_command,
)
from tests.conftest import write_csv
from tests.processes import ProcessFamily, described

pytestmark = [pytest.mark.slow, pytest.mark.process]
DEADLINE_S = 1800.0
"""Safety net of every wait for a state (a run's round, a daemon's exit): only a hung run reaches it."""
TRIAL_SITES = [name for name in compose()["services"] if name != "coordinator"]
EXTRA, ROGUE = "hospital-d", "rogue"
SITES = [*TRIAL_SITES, EXTRA]
TRIAL_SIZES = ["--sites", str(len(SITES)), "--rounds", "3", "--max-length", "16", "--batch-size", "8",
               "--local-epochs", "1",
               # Round 1 starts once all four sites are connected (their daemons start with the coordinator,
               # and a SuperNode refused before its key is registered retries with a growing pause).
               "--site-wait", str(DEADLINE_S),
               # A busy machine may take minutes to start a site's app for the resumed run: a site is dropped when
               # the SuperLink's heartbeat marks it offline, never because it answered slowly.
               "--stage-timeout", str(DEADLINE_S),
               "--eval-epsilon", "8"]  # a few evaluation records per site: more evaluation ε, so every round scores
SITE_SIZES = ["--connect-timeout", str(DEADLINE_S),  # a busy machine may start the coordinator slowly
              "--max-eval-epsilon", "8"]  # each site's policy allows the run's evaluation ε


def fedtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedtune.cli", *args]


def site_service(site: str) -> Command:
    """A site's compose service; a site the file does not list runs the first one's, renamed."""
    return service_command(site) if site in TRIAL_SITES else renamed(service_command(TRIAL_SITES[0]),
                                                                      TRIAL_SITES[0], site)


def run(loopback: Loopback, command: Command, digest: str = "") -> subprocess.CompletedProcess:
    args, env, cwd = loopback.argv(command)
    done = subprocess.run([digest if arg == "HEX" else arg for arg in args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


def one_off_steps(loopback: Loopback) -> str:
    """The header's one-off commands, for every site (the extra one's made from the first site's lines); the
    members digest provisioning printed, which every officer pinned."""
    first, digest = TRIAL_SITES[0], ""
    for argv in documented_commands():
        command = as_command(argv)
        if argv[:3] == ["docker", "compose", "up"] or command is None:
            continue
        if argv[:3] == ["docker", "compose", "run"]:  # each officer's commands, shown for one site
            for site in SITES:
                done = run(loopback, renamed(command, command.service, site), digest)
                assert "pin-members" in argv or f"members digest: {digest}" in done.stdout
        elif "provision" in argv:
            enrol = command.args.index("--enrol") + 1
            listed = command.args[enrol].split(",")
            extended = ",".join([*listed, listed[0].replace(first, EXTRA)])
            done = run(loopback, Command(command.service, command.volumes,
                                         (*command.args[:enrol], extended, *command.args[enrol + 1:])))
            digest = done.stdout.split("members digest: ", 1)[1].splitlines()[0]  # confirmed by phone
        else:
            run(loopback, command)
            if "keygen" in argv and first in argv:
                run(loopback, renamed(command, first, EXTRA))
    return digest


def make_rogue(root: Path) -> None:
    """A site that trusts our CA and holds a real site identity, but a SuperNode key nobody registered (its kit's
    site.json edited to name that key, so it gets past the local check to the coordinator); its officer pinned
    the same members as hospital-d's."""
    shutil.copytree(root / "kits" / "sites" / EXTRA, root / "kits" / "sites" / ROGUE)
    state(root, ROGUE).mkdir(mode=0o700)
    shutil.copy2(state(root, EXTRA) / "members.json", state(root, ROGUE) / "members.json")
    shutil.copytree(root / "keys" / EXTRA, root / "keys" / ROGUE)
    shutil.copytree(root / "data" / EXTRA, root / "data" / ROGUE)
    key = ec.generate_private_key(ec.SECP384R1())
    (root / "keys" / ROGUE / "supernode.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    (root / "keys" / ROGUE / "supernode.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    site_json = root / "kits" / "sites" / ROGUE / "site.json"
    info = json.loads(site_json.read_text())
    info["supernode_sha256"] = supernode_fingerprint(key.public_key())
    site_json.write_text(json.dumps(info))


def wait_for(world: dict, condition: Callable[[], bool], what: str, poll: float = 0.5) -> None:
    """Until ``condition`` holds, recording the processes' descendants; the coordinator stopping first fails."""
    family, server = world["family"], world["procs"]["coordinator"]
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        family.snapshot()
        if server.poll() is not None or time.monotonic() > deadline:
            log = (world["logs"] / "coordinator.log").read_text()[-3000:]
            raise AssertionError(f"no {what} (the coordinator's exit code: {server.returncode}):\n{log}")
        time.sleep(poll)


def state(root: Path, site: str) -> Path:
    return root / "volumes" / f"{site}-state"


def released(root: Path, site: str, server_round: int, suffix: str) -> bool:
    """Whether the site has sealed its update for the round ("npy") or its masked upload left ("uploaded")."""
    return any((state(root, site) / "released").glob(f"round-{server_round:06d}-*.{suffix}"))


def checkpoints(run_dir: Path) -> list[RoundInfo]:
    return [read_round_info(p) for p in sorted((run_dir / "checkpoints").glob("round-*"))
            if (p / ROUND_FILE).exists()]


@pytest.fixture(scope="module")
def world(tmp_path_factory, drug_reviews):
    root = tmp_path_factory.mktemp("deploy")
    assert EXTRA not in TRIAL_SITES and len(TRIAL_SITES) == 3, f"{COMPOSE_FILE} lists {TRIAL_SITES}"
    loopback = Loopback(root, free_port())
    for i, site in enumerate(SITES):  # the coordinator holds no records: the sites evaluate, privately
        (root / "data" / site).mkdir(parents=True)
        write_csv(root / "data" / site / "train.csv", drug_reviews[i * 20:(i + 1) * 20])
    (root / "keys").mkdir()
    (root / "kits").mkdir()
    digest = one_off_steps(loopback)
    assert digest and all((state(root, site) / "members.json").is_file() for site in SITES)
    make_rogue(root)

    procs: dict[str, subprocess.Popen] = {}
    family = ProcessFamily()
    logs = root / "logs"
    logs.mkdir()

    def start(name: str, extra: list[str]) -> subprocess.Popen:
        """A service's command on loopback (`docker compose up`, or a restart of one service)."""
        command = service_command(name) if name == "coordinator" else site_service(name)
        args, env, cwd = loopback.argv(command)
        with open(logs / f"{name}.log", "ab") as out:
            procs[name] = family.start(args + extra, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        return procs[name]

    yield {"root": root, "run": state(root, "coordinator") / "run", "start": start, "procs": procs, "logs": logs,
           "family": family}
    family.stop()


def test_the_compose_trial_survives_dropouts_and_a_coordinator_crash(world):
    run_dir, procs, root, family, start = world["run"], world["procs"], world["root"], world["family"], world["start"]
    start("coordinator", TRIAL_SIZES)
    for site in SITES:
        start(site, SITE_SIZES)
    # An unregistered SuperNode key is refused at connection: the rogue daemon gives up (after its
    # --connect-timeout of refusals) with a clear error.
    rogue = start(ROGUE, ["--connect-timeout", "40"])
    wait_for(world, lambda: rogue.poll() is not None, "exit of the unregistered site")  # fails if the coordinator died
    assert rogue.returncode != 0
    assert "the coordinator has not registered" in (world["logs"] / f"{ROGUE}.log").read_text()

    # Kill one site mid-run, once round 1 is checkpointed: later rounds go on with the other three.
    wait_for(world, lambda: any(c.round == 1 for c in checkpoints(run_dir)), "round 1", poll=0.1)
    family.signal_tree(procs[EXTRA], 9)
    assert not released(root, EXTRA, 2, "uploaded"), "killed too late: the site's round-2 upload had left"
    # SIGKILL the coordinator (and its SuperLink) in round 3, once a site has sealed its round-3 update but
    # before any masked upload left: on resume the sealed updates are resent, for no new ε. (After an upload
    # the site must train afresh, charged, which the 3-round plan cannot afford: tests/test_federation_inprocess.)
    # No upload can leave before every site's training reply is in and their shares went round.
    wait_for(world, lambda: any(released(root, site, 3, "npy") for site in TRIAL_SITES), "a round-3 release",
             poll=0.05)
    family.signal_tree(procs["coordinator"], 9)
    assert not any(released(root, site, 3, "uploaded") for site in SITES), "killed too late: an upload had left"
    assert not any(c.round == 3 for c in checkpoints(run_dir))

    # Restart (compose's restart policy runs the same command, which resumes from the newest checkpoint); the
    # killed site comes back with its ledger (the resumed run's first round waits for all four sites again).
    start("coordinator", TRIAL_SIZES)
    start(EXTRA, SITE_SIZES)
    assert family.wait(procs["coordinator"], DEADLINE_S) == 0, (world["logs"] / "coordinator.log").read_text()[-3000:]
    assert re.search(r"final adapter: \S+", (world["logs"] / "coordinator.log").read_text())

    by_round = {line.round: line for line in read_metrics(run_dir)}
    # No coordinator test set: the learning curve is the sites' federated evaluation, one noisy sum per round.
    assert by_round[0].server == {} and all(by_round[r].server == {} for r in (1, 2, 3))
    for r in (1, 2, 3):
        federated = by_round[r].federated_evaluation
        assert federated is not None and federated.sites == by_round[r].contributors, by_round[r]
        assert federated.scores["accuracy"] is not None and federated.noise_sigma > 0
    assert by_round[1].contributors == 4 and by_round[1].secure_aggregation.dropped == []
    assert by_round[2].model_updated and by_round[2].contributors == 3
    assert EXTRA not in by_round[2].secure_aggregation.survivors
    assert by_round[3].model_updated and by_round[3].contributors == 4, by_round[3]

    infos = checkpoints(run_dir)
    assert [c.round for c in infos] == [0, 1, 2, 3]
    for parent, child in itertools.pairwise(infos):
        assert child.parent_sha256 == parent.adapter_sha256
    events = [json.loads(x)["event"] for x in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert verify_chain(run_dir / "audit.jsonl") == len(events) and "run-resumed" in events

    # Each round is charged once: the sites that had sealed round 3 resent it, and the run ends inside every
    # site's budget. The restarted site kept its ledger; its local audit log shows each round it trained.
    assert "round 3 was already released for this adapter" in "".join(
        (state(root, site) / "executor.log").read_text() for site in TRIAL_SITES)
    # (hospital-d may have been killed after round 2's write-ahead charge, mid-training: that round stays charged.)
    for site in SITES:
        ledger = json.loads((state(root, site) / "privacy-ledger.json").read_text())
        allowed = [[1, 3], [1, 2, 3]] if site == EXTRA else [[1, 2, 3]]
        assert [e["round"] for e in ledger["rounds"]] in allowed, ledger
        spent = [e["epsilon"] for e in ledger["rounds"]]
        assert spent == sorted(spent) and spent[-1] <= 8.0, spent
    assert verify_chain(state(root, EXTRA) / "audit.jsonl") >= 2

    # --select-round best: the final adapter is the best-scored checkpoint, named in run.json; each site audited its
    # privacy with its own canaries and kept its exact scores and report to itself.
    selected = read_run_info(run_dir).selected_round
    assert selected in (0, 1, 2) and "best federated accuracy" in read_run_info(run_dir).selected_because
    assert read_round_info(run_dir / "final" / "adapter").round == selected
    # (Each unit is drawn into the evaluation split with probability 0.2: in about 1 run in 90, none of a site's 20
    # rows is drawn, and that site then releases noise only and keeps no scores.)
    evaluating = 0
    for site in SITES:
        drawn = json.loads((state(root, site) / "eval-split.json").read_text())["evaluation"]
        assert (state(root, site) / "site-report.html").is_file() == bool(drawn), site
        evaluating += bool(drawn)
        if not drawn:
            assert "drew none of its units" in (state(root, site) / "executor.log").read_text()
    assert evaluating >= 1
    for site in TRIAL_SITES:  # hospital-d never saw two adapters of one Flower run (the resume starts a new one)
        assert (state(root, site) / "audit-result.json").is_file()

    # Every task ran in each site's own executor with the site's installed ClientApp: the coordinator's FAB
    # (code the coordinator wrote) was never unpacked, let alone imported, at any site. Each site kept the
    # coordinator's receipts in its own receipts volume, apart from its state.
    for site in SITES:
        assert "task train done" in (state(root, site) / "executor.log").read_text()
        assert not (state(root, site) / "flwr" / "apps").exists()
        assert any((root / "volumes" / f"{site}-receipts").iterdir())


def test_the_final_passport_verifies_and_a_tampered_one_fails(world):
    adapter = world["run"] / "final" / "adapter"
    key = world["root"] / "kits" / "sites" / TRIAL_SITES[0] / "passport-signing.pub"
    verify = ProcessFamily()
    ok = verify.run(fedtune("passport", "verify", str(adapter), "--key", str(key)), 600)
    assert ok.returncode == 0 and "contributing sites" in ok.stdout, ok.stdout + ok.stderr
    assert "chosen as the final adapter: best federated accuracy" in ok.stdout  # the chosen round, signed
    assert ok.stdout.count("ε audited ≥") == len(TRIAL_SITES)  # each auditing site's latest audit, signed
    tampered = world["root"] / "tampered"
    shutil.copytree(adapter, tampered)
    passport = json.loads((tampered / "passport.json").read_text())
    passport["passport"]["contributors"] = 40
    (tampered / "passport.json").write_text(json.dumps(passport))
    assert verify.run(fedtune("passport", "verify", str(tampered), "--key", str(key)), 600).returncode == 1


def test_every_process_is_stopped(world):
    """`docker compose down`: SIGTERM to each service's command alone; fedtune itself must stop the SuperLink,
    SuperNodes and app processes it started (every one of them recorded while the run was live)."""
    family = world["family"]
    services = {proc.pid for proc in world["procs"].values()}
    below = [member for member in family.alive() if member.pid not in services]
    assert len(below) >= 2 * len(SITES), described(below)  # at least each site's SuperNode and executor
    for proc in world["procs"].values():
        if proc.poll() is None:
            proc.send_signal(15)
    for proc in world["procs"].values():
        family.wait(proc, DEADLINE_S)
    assert described(family.alive()) == []
