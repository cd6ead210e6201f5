"""Flower's daemons (SuperLink, SuperNode) as processes we start, watch, and always stop.

Each daemon runs in a session of its own; every process below it (flwr-simulation, Ray,
flwr-clientapp, ...) is remembered while it runs, so all of them can be stopped even after
they are re-parented. SIGINT and SIGTERM both become KeyboardInterrupt inside
:func:`terminate_as_interrupt`, so a ``finally`` cleans up for Ctrl-C and for a service stop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import psutil  # loaded when a process is tracked: the commands that start none stay light


def console_script(name: str) -> str:
    """A console script of the interpreter running us (the project venv), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Flower's processes start each other by name (flower-superexec, flwr-simulation, ...): our
    interpreter's scripts go first on PATH, so an un-activated venv works (`make demo`)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return os.environ | {"PATH": path, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
                         "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """Whether a server listens there (SO_REUSEADDR, as servers bind: old TIME_WAIT connections don't count)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


class ManagedProcess:
    """One daemon and everything it starts."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.command, self.env, self.log_path = command, env, log_path
        self.process: subprocess.Popen | None = None
        self.seen: dict[int, psutil.Process] = {}

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)

    def wait(self, timeout: float) -> int:
        """The daemon's exit code, once it stops by itself within ``timeout`` (subprocess.TimeoutExpired if not)."""
        if self.process is None:
            raise RuntimeError("the process was never started")
        return self.process.wait(timeout=timeout)

    def exited(self) -> int | None:
        """The exit code once the daemon itself has stopped, else None."""
        return None if self.process is None else self.process.poll()

    def track(self) -> None:
        """Remember the daemon's descendants now, so they can be stopped even if re-parented later."""
        if self.process is None:
            return
        import psutil

        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the daemon's session and every descendant seen; SIGKILL what is left after ``timeout``."""
        if self.process is None:
            return
        self.track()
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        import psutil

        victims = [p for p in self.seen.values() if p.is_running()]
        for proc in victims:
            _signal(proc, signal.SIGTERM)
        _, alive = psutil.wait_procs(victims, timeout=timeout)
        for proc in alive:
            _signal(proc, signal.SIGKILL)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=timeout)
        self.process = None


def _signal(proc: psutil.Process, sig: int) -> None:
    import psutil

    try:
        proc.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM both raise KeyboardInterrupt here.

    SIGINT is set explicitly: a process started in the background inherits it ignored.
    """
    def handler(signum, frame):
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
