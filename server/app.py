"""The coordinator's ServerApp: reads the run config and hands over to ``run_federation``."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmm.common.federation_config import FederationConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedmm.server.federation import run_federation
    from fedmm.server.reply_polling import ReplyPollingGrid

    logging.getLogger().setLevel(logging.INFO)
    config = FederationConfig.from_run_config(context.run_config)
    # Flower's deployment Grid looks for replies only every 3 s: poll sooner.
    run_federation(ReplyPollingGrid(grid), config)
