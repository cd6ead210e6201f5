"""The processes a test started and every process below them, recorded while they run.

A leak check looks only at these, never at the whole machine: another job's Flower processes on
the same machine are not the test's. Descendants are recorded at every wait (a SuperLink, a
SuperNode, a ServerApp that a ``fedtune`` command starts in a session of its own), so they are
still known after they are re-parented; psutil's create time guards against reused pids.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence

import psutil

SNAPSHOT_S = 0.2
"""How often a wait records the family's new descendants."""


class ProcessFamily:
    """Commands a test starts, and everything below them."""

    def __init__(self) -> None:
        self.seen: dict[int, psutil.Process] = {}

    def start(self, command: Sequence[str], **popen) -> subprocess.Popen:
        proc = subprocess.Popen(command, **popen)
        try:
            self.seen[proc.pid] = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:  # already gone: nothing below it to record
            pass
        return proc

    def snapshot(self) -> None:
        """Record the descendants of every member still running."""
        for member in list(self.seen.values()):
            try:
                for child in member.children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            except psutil.NoSuchProcess:
                pass

    def wait(self, proc: subprocess.Popen, timeout: float) -> int:
        """``proc``'s exit code, recording its descendants while it runs (TimeoutExpired past ``timeout``)."""
        deadline = time.monotonic() + timeout
        while (code := proc.poll()) is None:
            self.snapshot()
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(proc.args, timeout)
            time.sleep(SNAPSHOT_S)
        return code

    def run(self, command: Sequence[str], timeout: float) -> subprocess.CompletedProcess:
        """Like ``subprocess.run(command, capture_output=True, text=True, timeout=timeout)``, recording descendants."""
        proc = self.start(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                stdout, stderr = proc.communicate(timeout=SNAPSHOT_S)
                return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
            except subprocess.TimeoutExpired:
                self.snapshot()
                if time.monotonic() > deadline:
                    self.signal_tree(proc, signal.SIGKILL)
                    proc.communicate()
                    raise

    def signal_tree(self, proc: subprocess.Popen, sig: int, timeout: float = 60.0) -> None:
        """Signal ``proc`` and every descendant it had (SIGKILL: a crash, nothing gets to clean up); wait for them."""
        self.snapshot()
        try:
            tree = [self.seen[proc.pid], *self.seen[proc.pid].children(recursive=True)]
        except (KeyError, psutil.NoSuchProcess):
            return
        for member in tree:
            try:
                member.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=timeout)

    def alive(self) -> list[psutil.Process]:
        """Members still running (a zombie has stopped: only its parent has not collected it yet)."""
        self.snapshot()
        running = []
        for member in self.seen.values():
            try:
                if member.is_running() and member.status() != psutil.STATUS_ZOMBIE:
                    running.append(member)
            except psutil.NoSuchProcess:
                pass
        return running

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every member still running, SIGKILL what is left after ``timeout``: a test's cleanup."""
        members = self.alive()
        for member in members:
            try:
                member.terminate()
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(members, timeout=timeout)
        for member in left:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=timeout)


def described(processes: list[psutil.Process]) -> list[str]:
    """pid and command line of each, for an assertion's message."""
    lines = []
    for proc in processes:
        try:
            lines.append(f"{proc.pid}: {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            lines.append(f"{proc.pid}: (gone)")
    return lines
