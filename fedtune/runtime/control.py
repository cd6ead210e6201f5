"""Driving a SuperLink with Flower's own CLI: connection config, submitting the app, following a run.

``flwr run`` exits 0 even when the run fails, so a run is followed with ``flwr ls`` until Flower
reports it finished, and only ``finished:completed`` counts as success. Round progress comes
from the metrics.jsonl the ServerApp writes.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomli_w

from common.run_files import MetricsLine, read_metrics
from fedtune.runtime.processes import ManagedProcess, console_script, flower_env
from fedtune.runtime.project import RunFailed, project_dir

CONNECTION = "fedtune"
log = logging.getLogger("fedtune.control")
POLL_S = 2.0


class Control:
    """``flwr`` commands against one SuperLink, with a private FLWR_HOME holding the connection."""

    def __init__(self, flwr_home: Path, address: str, root_certificates: Path | None = None) -> None:
        self.home = flwr_home
        self.home.mkdir(parents=True, exist_ok=True)
        tls = f'root-certificates = "{root_certificates.resolve()}"\n' if root_certificates else "insecure = true\n"
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n{tls}')

    def env(self) -> dict[str, str]:
        return flower_env(self.home)

    def flwr(self, *args: str) -> dict[str, Any]:
        """Run a ``flwr`` command with ``--format json``; its parsed answer."""
        done = subprocess.run([console_script("flwr"), *args, "--format", "json"], env=self.env(),
                              capture_output=True, text=True, timeout=120, cwd=self.home)
        start = done.stdout.find("{")
        try:
            return json.loads(done.stdout[start:]) if start >= 0 else {"success": False, "error-message": done.stderr}
        except json.JSONDecodeError:
            return {"success": False, "error-message": done.stdout[-2000:] + done.stderr[-2000:]}

    def submit(self, run_config: dict[str, Any], federation_config: str | None = None) -> str:
        """Submit the fedtune app with these run-config values; the run id."""
        from flwr.common.config import unflatten_dict

        # One TOML file: repeated --run-config "a.b=1" "a.c=2" flags would replace table a, not merge it.
        overrides = self.home / "run-config.toml"
        overrides.write_text(tomli_w.dumps(unflatten_dict(run_config)))
        extra = ["--federation-config", federation_config] if federation_config else []
        submitted = self.flwr("run", str(project_dir()), CONNECTION, "--run-config", str(overrides), *extra)
        if not submitted.get("success"):
            raise RunFailed(f"flwr run refused the app: {submitted.get('error-message', submitted)}")
        return str(submitted["run-id"])

    def stream_log(self, run_id: str, path: Path) -> ManagedProcess:
        follower = ManagedProcess([console_script("flwr"), "log", run_id, CONNECTION, "--stream"], self.env(), path)
        follower.start()
        return follower

    def run_to_end(self, run_config: dict[str, Any], out_dir: Path, on_round: Callable[[MetricsLine], None],
                   log_path: Path, superlink: ManagedProcess, federation_config: str | None = None) -> dict[str, Any]:
        """Submit the app to the running ``superlink``, stream Flower's log of the run to ``log_path`` and
        follow the run to its end (the log's follower stopped whatever happens); Flower's final run record."""
        run_id = self.submit(run_config, federation_config)
        log.info("submitted run %s", run_id)
        follower = self.stream_log(run_id, log_path)
        try:
            return self.follow(run_id, out_dir, on_round, log_path, (superlink,))
        finally:
            follower.stop()

    def follow(self, run_id: str, out_dir: Path, on_round: Callable[[MetricsLine], None], log_path: Path,
               daemons: tuple[ManagedProcess, ...] = ()) -> dict[str, Any]:
        """Report the new lines of ``out_dir``'s metrics.jsonl until Flower says the run finished; its final
        record."""
        reported = len(read_metrics(out_dir))  # a resumed run appends; report only what is new
        while True:
            time.sleep(POLL_S)
            for daemon in daemons:
                daemon.track()
                if daemon.exited() is not None:
                    raise RunFailed(f"{daemon.command[0]} exited with {daemon.exited()}; see {daemon.log_path}",
                                    daemon.log_path)
            runs = self.flwr("ls", CONNECTION, "--run-id", run_id).get("runs") or []
            status = runs[0].get("status", "") if runs else ""
            lines = read_metrics(out_dir, start=reported)  # complete lines: a half-written one waits
            for line in lines:
                on_round(line)
            reported += len(lines)
            if status.startswith("finished"):
                if status != "finished:completed":
                    raise RunFailed(f"the run ended as {status!r}; see {log_path}", log_path)
                return runs[0]


def wait_healthy(daemon: ManagedProcess, url: str, timeout: float, verify: str | bool = True) -> None:
    """Until ``url`` answers; a daemon that exits first, or silence past ``timeout``, is an error."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.exited() is not None:
            raise RunFailed(f"{Path(daemon.command[0]).name} exited with {daemon.exited()}; see {daemon.log_path}",
                            daemon.log_path)
        try:
            if httpx.get(url, timeout=1.0, verify=verify).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RunFailed(f"{Path(daemon.command[0]).name} did not answer at {url} in {timeout:.0f}s; see {daemon.log_path}",
                    daemon.log_path)

