"""The ServerApp: wiring only. The round loop lives in server/federation.py."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunSettings
from common.flower_internals import short_object_pull_backoff
from common.library_noise import start_process_log
from server.federation import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    start_process_log()
    short_object_pull_backoff()  # the sites' replies are read as soon as their content arrives
    settings = RunSettings.from_flat(context.run_config)
    final = run_federation(grid, settings)
    logging.getLogger("fedtune.server").info("final adapter: %s", final)
