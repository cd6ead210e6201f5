"""The ServerApp: wiring only. The round loop lives in server/federation.py."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunSettings
from common.flower_internals import short_object_pull_backoff
from common.library_noise import silence_library_noise
from server.federation import run_federation

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
logging.getLogger("httpx").setLevel(logging.WARNING)  # else one line per poll of the SuperLink
short_object_pull_backoff()  # the sites' replies are read as soon as their content arrives
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    silence_library_noise()
    settings = RunSettings.from_flat(context.run_config)
    final = run_federation(grid, settings)
    logging.getLogger("fedtune.server").info("final adapter: %s", final)
