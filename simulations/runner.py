"""Run a federation on Flower's simulation engine, and stop everything it started.

We start our own ``flower-superlink --simulation`` on a free loopback port (never Flower's
shared default), submit the app with ``flwr run``, follow the run's status with ``flwr ls``
(``flwr run`` exits 0 even when the run fails) and print each round as the ServerApp writes
it. Whatever happens — success, failure, Ctrl-C, SIGTERM — the SuperLink and every process
below it (flwr-simulation, Ray) are stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psutil
import tomli_w
from flwr.common.config import unflatten_dict

CONNECTION = "fedtune-sim"
START_TIMEOUT_S = 60.0
POLL_S = 2.0


class SimulationError(RuntimeError):
    """The simulated federation did not complete; ``log_path`` holds Flower's log of the run, if any."""

    def __init__(self, message: str, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


def project_dir() -> Path:
    """The Flower app directory (holds pyproject.toml with [tool.flwr.app])."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise SimulationError(f"no pyproject.toml in {root}: install fedtune from its source tree (pip install -e .)")
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalSuperLink:
    """A simulation SuperLink on 127.0.0.1 that remembers every process below it, to stop them all."""

    def __init__(self, workdir: Path, log_path: Path) -> None:
        self.port = free_port()
        self.flwr_home = workdir
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self.seen: dict[int, psutil.Process] = {}
        (workdir / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def env(self) -> dict[str, str]:
        # Flower's processes start each other by name (flower-superexec, flwr-simulation): put our
        # interpreter's scripts first on PATH, so an un-activated venv works (`make demo`).
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        return os.environ | {"PATH": path, "FLWR_HOME": str(self.flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                             "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}

    def start(self) -> None:
        command = [
            _tool("flower-superlink"), "--simulation", "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
            "--isolation", "subprocess", "--disable-runtime-dependency-installation",
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SimulationError(f"flower-superlink exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SimulationError(f"flower-superlink did not answer on port {self.port} in {START_TIMEOUT_S:.0f}s")

    def track(self) -> None:
        """Remember the SuperLink's descendants now, so they can be stopped even if re-parented later."""
        if self.process is None:
            return
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def stop(self) -> None:
        if self.process is None:
            return
        self.track()
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        victims = [p for p in self.seen.values() if p.is_running()]
        for proc in victims:
            _signal(proc, signal.SIGTERM)
        _, alive = psutil.wait_procs(victims, timeout=10)
        for proc in alive:
            _signal(proc, signal.SIGKILL)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None

    def flwr(self, *args: str) -> dict[str, Any]:
        """Run a ``flwr`` CLI command with ``--format json``; its parsed answer."""
        done = subprocess.run([_tool("flwr"), *args, "--format", "json"], env=self.env(), capture_output=True,
                              text=True, timeout=120, cwd=self.flwr_home)
        start = done.stdout.find("{")
        try:
            return json.loads(done.stdout[start:]) if start >= 0 else {}
        except json.JSONDecodeError:
            return {"success": False, "error-message": done.stdout[-2000:] + done.stderr[-2000:]}


def _tool(name: str) -> str:
    """A console script of the interpreter running us (the project venv)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM both raise KeyboardInterrupt, so the cleanup in ``finally`` runs for both.

    SIGINT is set explicitly: a process started in the background inherits it ignored.
    """
    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_simulation(run_config: dict[str, Any], *, sites: int, out_dir: Path,
                   on_round: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Run the fedtune app on ``sites`` virtual SuperNodes; returns Flower's final run record.

    ``on_round`` gets each metrics.jsonl line as the ServerApp writes it.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    federation = f"num-supernodes={sites} client-resources-num-cpus=2"
    with tempfile.TemporaryDirectory(prefix="fedtune-flwr-") as flwr_home, _terminate_as_interrupt():
        link = LocalSuperLink(Path(flwr_home), out_dir / "superlink.log")
        # One TOML file: repeated --run-config "a.b=1" "a.c=2" flags would replace table a, not merge it.
        overrides = Path(flwr_home) / "run-config.toml"
        overrides.write_text(tomli_w.dumps(unflatten_dict(run_config)))
        log_follower: subprocess.Popen | None = None
        try:
            link.start()
            submitted = link.flwr("run", str(project_dir()), CONNECTION, "--run-config", str(overrides),
                                   "--federation-config", federation)
            if not submitted.get("success"):
                raise SimulationError(f"flwr run refused the app: {submitted.get('error-message', submitted)}")
            run_id = str(submitted["run-id"])
            with open(out_dir / "flower.log", "wb") as log:
                log_follower = subprocess.Popen([_tool("flwr"), "log", run_id, CONNECTION, "--stream"], env=link.env(),
                                                stdout=log, stderr=subprocess.STDOUT, cwd=flwr_home,
                                                start_new_session=True)
            return _follow(link, run_id, metrics_path, on_round, out_dir / "flower.log")
        finally:
            if log_follower is not None:
                os.killpg(log_follower.pid, signal.SIGTERM)
                log_follower.wait(timeout=10)
            link.stop()


def _complete_lines(path: Path) -> list[str]:
    """Lines the ServerApp has finished writing (a half-written last line waits for the next poll)."""
    if not path.exists():
        return []
    text = path.read_text()
    return text[: text.rfind("\n") + 1].splitlines()


def _follow(link: LocalSuperLink, run_id: str, metrics_path: Path,
            on_round: Callable[[dict[str, Any]], None], log_path: Path) -> dict[str, Any]:
    reported = 0
    while True:
        time.sleep(POLL_S)
        link.track()
        runs = link.flwr("ls", CONNECTION, "--run-id", run_id).get("runs") or []
        status = runs[0].get("status", "") if runs else ""
        lines = _complete_lines(metrics_path)
        for line in lines[reported:]:
            on_round(json.loads(line))
        reported = len(lines)
        if status.startswith("finished"):
            if status != "finished:completed":
                raise SimulationError(f"the run ended as {status!r}; see {log_path}", log_path)
            return runs[0]
