"""Experiment tracking (MLflow, TensorBoard) and Prometheus metrics, against the real libraries and stores.

The metrics lines are typed records (common.run_files.MetricsLine, the one definition the ServerApp writes)
written by ``append_metrics`` and read back as the CLI follows them. MLflow is a real sqlite store read
back with MlflowClient; TensorBoard's event files are read with its EventAccumulator; each exporter is
scraped over HTTP and parsed with prometheus_client's own parser. The site's ε comes from a real
PrivacyLedger on disk. The process tests start the real `fedtune client start` / `server start`.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from common.run_files import MetricsLine, read_metrics
from fedtune.runtime.processes import free_port, port_in_use
from fedtune.runtime.tracking import TrackingError, final_adapter, open_trackers, round_scalars
from tests.processes import ProcessFamily, described

SITES = ("site-a", "site-b", "site-c")
SETTINGS = {"federation.rounds": 2, "privacy.epsilon": 8.0, "train.learning-rate": 0.02, "task": "classification"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as the ServerApp leaves it: metrics.jsonl (round 0, a round of 3 sites, a round where one
    timed out and one ran out of budget), privacy.json, run.json and the final adapter with its passport."""
    from common.run_files import Failure, MetricsLine, SecureRoundDetails, append_metrics

    run = tmp_path_factory.mktemp("run")

    def details(survivors: list[str], dropped: list[str], train_s: float) -> SecureRoundDetails:
        return SecureRoundDetails(survivors, dropped, 3000, 0, False, 9.3e-08, 32, 30, 2, 2, True, 152076,
                                  {"identify": 0.5, "train": train_s, "share": 1.25, "unmask": 0.75})

    def scores(accuracy: float) -> dict[str, Any]:
        return {"accuracy": accuracy, "macro_f1": accuracy / 2, "loss": 0.9, "examples": 30}

    append_metrics(run, MetricsLine(round=0, server={"accuracy": 0.25, "macro_f1": 0.2, "loss": 1.1, "examples": 30}))
    rounds = [
        (3, (), details(list(SITES), [], 20.0), 0.5, 3.5),
        (1, (Failure("site-b", "timeout", "no answer to train in 90s", "train"),
             Failure("site-c", "budget-exhausted", "the site will not train again")),
         details(["site-a"], ["site-b", "site-c"], 90.0), 0.625, 4.5),
    ]
    for server_round, (contributors, failures, secure, accuracy, epsilon_a) in enumerate(rounds, start=1):
        append_metrics(run, MetricsLine(
            round=server_round, server=scores(accuracy), aggregation="secure", contributors=contributors,
            failures=failures, model_updated=False, secure_aggregation=secure, dp=True, privacy_unit="record",
            epsilon={"site-a": epsilon_a, "site-b": 2.75, "site-c": 3.0}, duration_s=30.0 * server_round,
            checkpoint=f"round-{server_round:04d}"))
    adapter = final_adapter(run)
    adapter.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", "round.json", "passport.json"):
        (adapter / name).write_text(json.dumps({"file": name}))
    for name in ("run.json", "privacy.json"):
        (run / name).write_text(json.dumps({"file": name}))
    return run


@pytest.fixture(scope="module")
def lines(run_dir: Path) -> list[MetricsLine]:
    return read_metrics(run_dir)


def test_each_number_of_a_metrics_line_is_a_named_scalar(lines: list[MetricsLine]) -> None:
    first, second = round_scalars(lines[1]), round_scalars(lines[2])
    assert first["server/accuracy"] == 0.5 and first["contributors"] == 3 and first["failures/total"] == 0
    assert first["epsilon/site-a"] == 3.5 and first["secure_aggregation/exchange_seconds/train"] == 20.0
    assert first["secure_aggregation/survivors"] == 3 and first["secure_aggregation/mean_clipped"] == 0
    assert second["failures/total"] == 2 and second["failures/timeout"] == 1
    assert second["failures/budget-exhausted"] == 1
    assert second["secure_aggregation/dropped"] == 2 and second["duration_s"] == 60.0
    assert set(round_scalars(lines[0])) == {"server/accuracy", "server/macro_f1", "server/loss", "server/examples"}
    assert not any(name in ("round", "aggregation", "checkpoint", "privacy_unit") for name in second)
    odd = round_scalars(MetricsLine(round=1, server={}, epsilon={"bad site\n": 1.0, "none": None}))
    assert odd["epsilon/bad site_"] == 1.0 and "epsilon/none" not in odd


@pytest.mark.slow  # a new MLflow store migrates its schema: 5 to 20 s on a busy machine
def test_mlflow_records_settings_each_round_each_sites_epsilon_and_the_outputs(
        tmp_path: Path, run_dir: Path, lines: list[MetricsLine], capfd: pytest.CaptureFixture[str]) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'tracking' / 'mlflow.db'}"
    with open_trackers(mlflow_uri=uri, tensorboard_dir=None, run_name="hospitals") as tracker:
        tracker.log_settings(SETTINGS)
        for line in lines:
            tracker.log_round(line)
        tracker.log_outputs(run_dir)
    out, err = capfd.readouterr()
    assert out == "" and err == "", "MLflow's INFO lines and warnings stay out of the terminal"

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fedtune")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "hospitals" and run.info.status == "FINISHED"
    assert run.data.params == {key: str(value) for key, value in SETTINGS.items()}

    def history(name: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, name),
                                                  key=lambda m: m.step)]

    assert history("server/accuracy") == [(0, 0.25), (1, 0.5), (2, 0.625)]
    assert history("contributors") == [(1, 3.0), (2, 1.0)]
    assert history("epsilon/site-a") == [(1, 3.5), (2, 4.5)] and history("epsilon/site-c") == [(1, 3.0), (2, 3.0)]
    assert history("failures/timeout") == [(2, 1.0)] and history("failures/total") == [(1, 0.0), (2, 2.0)]
    assert history("secure_aggregation/exchange_seconds/train") == [(1, 20.0), (2, 90.0)]
    assert history("duration_s") == [(1, 30.0), (2, 60.0)]
    top = {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert top == {"adapter", "passport.json", "run"}
    assert {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "adapter")} == {
        "adapter_model.safetensors", "adapter_config.json", "round.json", "passport.json"}
    assert {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "run")} == {
        "run.json", "metrics.jsonl", "privacy.json"}
    assert (tmp_path / "tracking" / "mlartifacts").is_dir(), "artifacts beside the database, not in the cwd"


def test_tensorboard_writes_the_same_scalars(tmp_path: Path, lines: list[MetricsLine]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with open_trackers(mlflow_uri=None, tensorboard_dir=tmp_path / "tb", run_name="hospitals") as tracker:
        tracker.log_settings(SETTINGS)
        for line in lines:
            tracker.log_round(line)
    events = EventAccumulator(str(tmp_path / "tb" / "hospitals"))
    events.Reload()
    expected: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        for name, value in round_scalars(line).items():
            expected.setdefault(name, []).append((line.round, value))
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, points in expected.items():
        scalars = events.Scalars(name)
        assert [e.step for e in scalars] == [step for step, _ in points], name
        assert [e.value for e in scalars] == pytest.approx([value for _, value in points]), name
    assert events.Tags()["tensors"] == ["settings"]


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_run_goes_on(tmp_path: Path, lines, caplog) -> None:
    with open_trackers(mlflow_uri=None, tensorboard_dir=tmp_path / "tb", run_name="r") as tracker:
        board = tracker.trackers[0]
        board.writer.close()
        board.writer.add_event = lambda event: (_ for _ in ()).throw(OSError("disk full"))
        tracker.log_round(lines[1])
        tracker.log_round(lines[2])
    assert tracker.trackers == []
    assert "could not record round 1 (OSError: disk full); the run goes on without it" in caplog.text


@pytest.mark.parametrize("uri", ["nosuchscheme://tracking", "http://127.0.0.1:{port}"])
def test_an_unusable_mlflow_uri_is_refused_before_the_run(tmp_path: Path, uri: str) -> None:
    from fedtune.cli import build_parser, run_tracker

    args = build_parser()[0].parse_args(["simulate", "--out", str(tmp_path), "--mlflow", uri.format(port=free_port()),
                                         "--tensorboard", str(tmp_path / "tb")])
    with pytest.raises(TrackingError, match=r"--mlflow .*: cannot open a run there \(.*sqlite:///PATH/mlflow\.db"):
        run_tracker(args, "r")


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, parsed by prometheus_client's own parser: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def status(address: str, path: str) -> int:
    try:
        return urllib.request.urlopen(f"http://{address}{path}", timeout=10).status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_coordinator_exports_rounds_exchanges_failures_and_readiness(lines: list[MetricsLine]) -> None:
    from fedtune.runtime.monitoring import CoordinatorMetrics, superlink_ready

    port = free_port()
    superlink = CoordinatorMetrics(host="127.0.0.1", port=free_port(), ready=lambda: False)  # a stand-in health URL
    health = f"http://{superlink.server.address}/healthz"
    metrics = CoordinatorMetrics(host="127.0.0.1", port=port, ready=superlink_ready(health, True))
    address = metrics.server.address
    try:
        assert status(address, "/healthz") == 200 and status(address, "/readyz") == 200
        superlink.close(succeeded=True)
        assert status(address, "/readyz") == 503, "the SuperLink no longer answers"
        assert status(address, "/healthz") == 200
        for line in lines:
            metrics.log_round(line)
        samples = scrape(address)
    finally:
        metrics.close(succeeded=True)
    assert not port_in_use("127.0.0.1", port)
    prefix = "fedtune_coordinator"
    assert samples[(f"{prefix}_rounds_total", ())] == 2 and samples[(f"{prefix}_last_round", ())] == 2
    assert samples[(f"{prefix}_sites_contributing", ())] == 1
    assert samples[(f"{prefix}_site_failures_total", (("kind", "timeout"),))] == 1
    assert samples[(f"{prefix}_site_failures_total", (("kind", "budget-exhausted"),))] == 1
    assert samples[(f"{prefix}_round_seconds_count", ())] == 2 and samples[(f"{prefix}_round_seconds_sum", ())] == 90
    assert samples[(f"{prefix}_exchange_seconds_sum", (("exchange", "train"),))] == 110
    assert samples[(f"{prefix}_exchange_seconds_count", (("exchange", "unmask"),))] == 2
    assert samples[(f"{prefix}_test_score", (("metric", "accuracy"),))] == 0.625
    assert samples[(f"{prefix}_site_epsilon", (("site", "site-a"),))] == 4.5
    assert time.time() - 60 < samples[(f"{prefix}_last_round_timestamp_seconds", ())] <= time.time()


def test_a_metrics_port_in_use_is_refused_before_the_run_and_opens_no_mlflow_run(tmp_path: Path) -> None:
    from fedtune.cli import build_parser, run_tracker
    from fedtune.runtime.monitoring import MonitoringError

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = build_parser()[0].parse_args([
            "server", "start", "--kit", "kit", "--state", "state", "--metrics-port", str(port),
            "--mlflow", f"sqlite:///{tmp_path / 'mlflow.db'}"])
        with pytest.raises(MonitoringError, match=f"--metrics-port {port} on 127.0.0.1: cannot listen there"):
            run_tracker(args, "r", ready=lambda: True)
    assert not (tmp_path / "mlflow.db").exists(), "the port is checked first: no MLflow run was opened"


@pytest.fixture()
def policy():
    from client.policy import SitePolicy

    return SitePolicy(labels=("negative", "neutral", "positive"), max_epsilon=8.0)


def test_a_site_is_ready_only_once_its_ledger_can_be_read_for_a_scrape(tmp_path: Path, policy, monkeypatch) -> None:
    """The daemon no longer loads torch before it checks its input, so the ledger's accountant would load in the
    first scrape after /readyz, slower than a scrape may take on a busy machine: it loads before ready instead."""
    from fedtune.runtime import monitoring

    reads: list[bool] = []
    metrics = monitoring.SiteMetrics(tmp_path / "state", policy, host="127.0.0.1", port=free_port())
    monkeypatch.setattr(monitoring, "read_ledger", lambda state, policy: reads.append(metrics._serving))
    try:
        metrics.set_serving(True)
        metrics.set_serving(False)
        metrics.set_serving(True)
        assert reads == [False]  # once, before the daemon reports ready
    finally:
        metrics.close()


def test_a_site_exports_epsilon_spent_and_left_from_its_own_ledger(tmp_path: Path, policy) -> None:
    from client.privacy import LEDGER_FILE, PrivacyLedger
    from common.config import PrivacySettings
    from fedtune.runtime.monitoring import SiteActivity, SiteMetrics

    state = tmp_path / "state"
    metrics = SiteMetrics(state, policy, host="127.0.0.1", port=free_port())
    address = metrics.server.address
    try:
        fresh = scrape(address)
        assert fresh[("fedtune_site_epsilon_spent", ())] == 0 and fresh[("fedtune_site_epsilon_left", ())] == 8
        assert status(address, "/healthz") == 200 and status(address, "/readyz") == 503
        metrics.set_serving(True)
        assert status(address, "/readyz") == 200

        ledger = PrivacyLedger(state / LEDGER_FILE, PrivacySettings(epsilon=6.0, accountant="rdp"))
        for server_round in (1, 2):
            ledger.charge_round(run_id=7, server_round=server_round, sample_rate=0.1, steps=10, planned_rounds=4)
        SiteActivity.read(state).record(state, None).record(state, "budget-exhausted").record(state, None)
        samples = scrape(address)
        assert samples[("fedtune_site_epsilon_spent", ())] == pytest.approx(ledger.spent())
        assert samples[("fedtune_site_epsilon_budget", ())] == 6.0, "the budget the ledger is bound to"
        assert samples[("fedtune_site_epsilon_left", ())] == pytest.approx(6.0 - ledger.spent())
        assert 0 < ledger.spent() < 6.0
        assert samples[("fedtune_site_rounds_trained_total", ())] == 2
        assert samples[("fedtune_site_ledger_valid", ())] == 1 and samples[("fedtune_site_serving", ())] == 1
        assert samples[("fedtune_site_tasks_total", ())] == 3
        assert samples[("fedtune_site_refusals_total", (("kind", "budget-exhausted"),))] == 1
        assert time.time() - 60 < samples[("fedtune_site_last_contact_timestamp_seconds", ())] <= time.time()

        saved = json.loads((state / LEDGER_FILE).read_text())
        saved["history"] = []  # an edited ledger: the exporter says so, as the site itself refuses to train
        (state / LEDGER_FILE).write_text(json.dumps(saved))
        assert scrape(address)[("fedtune_site_ledger_valid", ())] == 0
    finally:
        metrics.close()


def test_wait_ready_follows_the_daemons_readiness(tmp_path: Path, policy, capsys: pytest.CaptureFixture[str]) -> None:
    from fedtune.cli import main
    from fedtune.runtime.monitoring import SiteMetrics

    metrics = SiteMetrics(tmp_path / "state", policy, host="127.0.0.1", port=free_port())
    port = metrics.server.server.server_port
    try:
        assert main(["wait-ready", "--port", str(port), "--timeout", "0"]) == 1
        assert f"http://127.0.0.1:{port}/readyz did not answer 200 in 0s" in capsys.readouterr().err
        metrics.set_serving(True)
        assert main(["wait-ready", "--port", str(port), "--timeout", "300"]) == 0
    finally:
        metrics.close()
    assert main(["wait-ready", "--port", str(port), "--timeout", "0"]) == 1, "nothing listens any more"


# ------------------------------------------------------------------ the real daemons, with their endpoints


def wait_until(condition, what: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    """Until ``condition`` holds; a process that exits first, or a generous deadline, fails the test."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"{what}: the process exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def answers(address: str, path: str) -> int | None:
    try:
        return status(address, path)
    except OSError:
        return None


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, drug_reviews) -> dict[str, Path]:
    """Three sites' own keys, one provisioning, each site's pinned members (in process, as the CLI does)."""
    from common.registry import load_registry, pin_members
    from fedtune.runtime.kits import provision, site_keygen
    from tests.conftest import write_csv

    root = tmp_path_factory.mktemp("deploy")
    kits = provision([site_keygen(site, root / "keys" / site) for site in SITES], ["127.0.0.1"], root / "kits", days=30)
    digest = load_registry(kits / "server" / "registry.json").digest.hex()
    for site in SITES:
        pin_members(kits / "sites" / site / "registry.json", root / "state" / site, digest)
    write_csv(root / "train.csv", drug_reviews[:12])
    write_csv(root / "test.csv", drug_reviews[500:510])
    return {"root": root, "kits": kits}


def daemon(family: ProcessFamily, argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return family.start([sys.executable, "-m", "fedtune.cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                            env=os.environ | {"FLWR_TELEMETRY_ENABLED": "0"})


def stop(family: ProcessFamily, proc: subprocess.Popen) -> None:
    """SIGTERM, as a service manager stops it; the daemon stops everything it started."""
    family.snapshot()
    if proc.poll() is None:
        proc.terminate()
    family.wait(proc, 120)


@pytest.mark.process
def test_a_site_daemon_serves_its_metrics_health_and_readiness(deployment: dict[str, Path],
                                                               started_processes: ProcessFamily) -> None:
    root, port = deployment["root"], free_port()
    address = f"127.0.0.1:{port}"
    argv = ["client", "start", "--kit", str(deployment["kits"] / "sites" / "site-a"),
            "--keys", str(root / "keys" / "site-a"), "--data", str(root / "train.csv"),
            "--state", str(root / "state" / "site-a"), "--superlink", f"127.0.0.1:{free_port()}",
            "--labels", "negative,neutral,positive", "--max-epsilon", "5", "--metrics-port", str(port)]
    proc = daemon(started_processes, argv, root / "site-a.log")
    try:  # as systemd's ExecStartPost checks it
        started_processes.snapshot()
        check = subprocess.run([sys.executable, "-m", "fedtune.cli", "wait-ready", "--port", str(port), "--timeout",
                                "300"], capture_output=True, text=True, timeout=400)
        assert check.returncode == 0, check.stderr
        assert answers(address, "/readyz") == 200 and answers(address, "/healthz") == 200
        samples = scrape(address)
        assert samples[("fedtune_site_epsilon_left", ())] == 5 and samples[("fedtune_site_serving", ())] == 1
    finally:
        stop(started_processes, proc)
    assert not port_in_use("127.0.0.1", port) and described(started_processes.alive()) == []
    assert "on http://127.0.0.1:" in (root / "site-a.log").read_text()


@pytest.mark.process
def test_the_coordinator_is_ready_once_its_superlink_answers(deployment: dict[str, Path], tmp_path: Path,
                                                             started_processes: ProcessFamily) -> None:
    root, port, superlink = deployment["root"], free_port(), free_port()
    address = f"127.0.0.1:{port}"
    argv = ["server", "start", "--kit", str(deployment["kits"] / "server"), "--state", str(tmp_path / "state"),
            "--port", str(superlink), "--test-data", str(root / "test.csv"),
            "--labels", "negative,neutral,positive", "--metrics-port", str(port),
            "--mlflow", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    proc = daemon(started_processes, argv, tmp_path / "server.log")
    try:
        wait_until(lambda: answers(address, "/readyz") == 200, "the SuperLink's health check", proc)
        assert answers(address, "/healthz") == 200
        assert scrape(address)[("fedtune_coordinator_rounds_total", ())] == 0
    finally:
        stop(started_processes, proc)
    assert not port_in_use("127.0.0.1", port) and not port_in_use("127.0.0.1", superlink)
    assert described(started_processes.alive()) == []
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("fedtune").experiment_id])
    assert run.info.status == "FAILED", "an interrupted run is closed as such"
    assert run.data.params["federation.secure-aggregation"] == "True"
    assert "INFO mlflow" not in (tmp_path / "server.log").read_text()


def test_the_metrics_and_tracking_flags_reach_the_commands() -> None:
    from fedtune.cli import build_parser

    parse = build_parser()[0].parse_args
    site = parse(["client", "start", "--kit", "k", "--keys", "k", "--data", "d", "--state", "s", "--superlink", "h:1",
                  "--labels", "a,b", "--metrics-port", "9101", "--metrics-host", "0.0.0.0"])
    assert (site.metrics_port, site.metrics_host) == (9101, "0.0.0.0")
    server = parse(["server", "start", "--kit", "k", "--state", "s", "--metrics-port", "9100",
                    "--mlflow", "http://mlflow:5000", "--tensorboard", "tb"])
    assert (server.metrics_port, server.metrics_host, server.mlflow, server.tensorboard) == (
        9100, "127.0.0.1", "http://mlflow:5000", Path("tb"))
    simulate = parse(["simulate", "--out", "o"])
    assert (simulate.mlflow, simulate.tensorboard) == (None, None) and not hasattr(simulate, "metrics_port")
