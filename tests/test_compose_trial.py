"""The docker-compose trial, without Docker: every command deploy/docker-compose.yml's header tells people to
run (each site's keygen, the coordinator's provisioning, each officer's members check and pin), then every
service's command, as the image runs them (its entrypoint and environment), mapped onto loopback
(tests/compose.py). The trial must complete its rounds with the three sites every site's policy needs.

The only changes to what the file runs: hostnames → 127.0.0.1, the published port → a free one, volumes →
directories under tmp_path, tiny data, and the coordinator's sizes (TRIAL_SIZES) so it ends in minutes.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from common.run_files import read_metrics
from fedtune.runtime.processes import free_port
from tests.compose import COMPOSE_FILE, Loopback, as_command, compose, documented_commands, service_command
from tests.conftest import write_csv
from tests.processes import described

TRIAL_SIZES = ["--rounds", "2", "--max-length", "16", "--batch-size", "8", "--local-epochs", "1",
               "--site-wait", "1800"]  # round 1 waits for all 3 sites however slowly a busy machine starts them
RUN_DEADLINE_S = 2400  # a safety net on a busy machine; the test waits for the run's end, not for a time


def run(loopback: Loopback, argv: list[str]) -> subprocess.CompletedProcess:
    command = as_command(argv)
    assert command is not None, argv
    args, env, cwd = loopback.argv(command)
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


@pytest.mark.slow
@pytest.mark.process
def test_the_compose_trial_runs_its_rounds_on_loopback(tmp_path: Path, drug_reviews, started_processes) -> None:
    loopback = Loopback(tmp_path, free_port())
    services = compose()["services"]
    sites = [name for name in services if name != "coordinator"]
    for name, rows in [("coordinator", drug_reviews[500:530]),
                       *[(site, drug_reviews[i * 15:(i + 1) * 15]) for i, site in enumerate(sites)]]:
        (tmp_path / "data" / name).mkdir(parents=True)
        write_csv(tmp_path / "data" / name / ("test.csv" if name == "coordinator" else "train.csv"), rows)

    # The one-off steps, as the header shows them; each officer's two commands for every site.
    digest = ""
    for argv in documented_commands():
        if argv[:3] == ["docker", "compose", "up"]:
            continue
        if argv[:3] == ["docker", "compose", "run"]:
            template = argv[argv.index("--no-deps") + 1]
            for site in sites:
                done = run(loopback, [site if arg == template else digest if arg == "HEX" else arg for arg in argv])
                assert "pin-members" in argv or f"members digest: {digest}" in done.stdout
            continue
        done = run(loopback, argv)
        if "provision" in argv:
            digest = done.stdout.split("members digest: ", 1)[1].splitlines()[0]  # confirmed by phone
    assert digest and all((tmp_path / "volumes" / f"{site}-state" / "members.json").is_file() for site in sites)

    # `docker compose up -d`: the coordinator first (depends_on), then the sites.
    (tmp_path / "logs").mkdir()
    family = started_processes  # every process below the services is recorded while the trial runs
    procs: dict[str, subprocess.Popen] = {}
    for name in ["coordinator", *sites]:
        args, env, cwd = loopback.argv(service_command(name))
        args += TRIAL_SIZES if name == "coordinator" else []
        with open(tmp_path / "logs" / f"{name}.log", "wb") as out:
            procs[name] = family.start(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + RUN_DEADLINE_S
    while procs["coordinator"].poll() is None:  # the run ends after its rounds: the coordinator exits
        assert time.monotonic() < deadline, "the trial did not finish"
        for site in sites:
            assert procs[site].poll() is None, (tmp_path / "logs" / f"{site}.log").read_text()[-3000:]
        family.snapshot()
        time.sleep(1)
    assert procs["coordinator"].returncode == 0, (tmp_path / "logs" / "coordinator.log").read_text()[-3000:]
    for proc in procs.values():  # SIGTERM each service, as `docker compose down` does
        if proc.poll() is None:
            proc.terminate()
    for proc in procs.values():
        family.wait(proc, 180)
    assert described(family.alive()) == []

    run_dir = tmp_path / "volumes" / "coordinator-state" / "run"
    lines = read_metrics(run_dir, start=1)  # round 0: the coordinator's baseline evaluation
    assert [line.round for line in lines] == [1, 2]
    assert lines[0].contributors == len(sites) and lines[0].model_updated  # round 1 waits for every site
    assert all(line.contributors == len(sites) for line in lines if line.model_updated)  # policy: ≥ 3
    assert (run_dir / "final" / "adapter" / "passport.json").is_file()
    for site in sites:  # each site trained in its own executor and kept its ledger in its own state volume
        ledger = json.loads((tmp_path / "volumes" / f"{site}-state" / "privacy-ledger.json").read_text())
        assert ledger["rounds"] and ledger["rounds"][-1]["epsilon"] <= 8.0
    coordinator = (tmp_path / "logs" / "coordinator.log").read_text()
    assert re.search(r"final adapter: \S+", coordinator)


@pytest.mark.process
def test_docker_compose_accepts_the_file() -> None:
    """Where Docker Compose is installed, it accepts the file (elsewhere skipped, saying so: the trial's commands
    are still run on loopback by test_the_compose_trial_runs_its_rounds_on_loopback)."""
    if shutil.which("docker") is None:
        pytest.skip("docker is not on PATH: `docker compose config` not run")
    if subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60).returncode != 0:
        pytest.skip("docker has no compose plugin here (`docker compose version` fails): `docker compose config` "
                    "not run")
    done = subprocess.run(["docker", "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
