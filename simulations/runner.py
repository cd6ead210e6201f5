"""Run a federation on Flower's simulation engine, and stop everything it started.

We start our own ``flower-superlink --simulation`` on a free loopback port (never Flower's
shared default), submit the app, follow the run until Flower reports it finished, and print
each round as the ServerApp writes it. Whatever happens — success, failure, Ctrl-C, SIGTERM —
the SuperLink and every process below it (flwr-simulation, Ray) are stopped.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.config import ConfigError
from common.run_files import METRICS_FILE, MetricsLine
from fedtune.runtime.control import Control, wait_healthy
from fedtune.runtime.processes import ManagedProcess, console_script, flower_env, free_port, terminate_as_interrupt

START_TIMEOUT_S = 60.0


def run_simulation(run_config: dict[str, Any], *, sites: int, out_dir: Path,
                   on_round: Callable[[MetricsLine], None], cpus_per_site: int = 1) -> dict[str, Any]:
    """Run the fedtune app on ``sites`` virtual SuperNodes; returns Flower's final run record.

    Each site's Ray actor reserves ``cpus_per_site`` cores (and torch uses as many threads), so with 1
    as many sites train at once as the machine has cores. ``on_round`` gets each new metrics.jsonl
    line as the ServerApp writes it.
    """
    if cpus_per_site < 1:
        raise ConfigError(f"--cpus-per-site must be at least 1, got {cpus_per_site}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if not run_config.get("resume-from"):
        (out_dir / METRICS_FILE).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="fedtune-flwr-") as flwr_home, terminate_as_interrupt():
        port = free_port()
        control = Control(Path(flwr_home), f"127.0.0.1:{port}")
        superlink = ManagedProcess(
            [console_script("flower-superlink"), "--simulation", "--insecure", "--host", "127.0.0.1",
             "--port", str(port), "--isolation", "subprocess", "--disable-runtime-dependency-installation"],
            flower_env(Path(flwr_home)), out_dir / "superlink.log")
        try:
            superlink.start()
            wait_healthy(superlink, f"http://127.0.0.1:{port}/health", START_TIMEOUT_S)
            return control.run_to_end(run_config, out_dir, on_round, out_dir / "flower.log", superlink,
                                      f"num-supernodes={sites} client-resources-num-cpus={cpus_per_site}")
        finally:
            superlink.stop()
