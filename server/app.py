"""The noprop-fl ServerApp: reads the run config and runs the federation (server/run.py): block ownership for
NoProp-DT, FedAvg of the one network for the other methods."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.app_utils import start_parent_process_monitor

from noprop.federation import FederationConfig
from noprop.server.grid import PromptGrid
from noprop.server.run import run_federation


def end_with_superexec() -> None:
    """Flower starts flwr-serverapp in a session of its own and without --parent-pid, so when noprop-server is
    killed (SIGKILL: no cleanup) and its SuperLink and SuperExec go, the ServerApp would live on and keep writing
    OUT while a restarted server resumes there. Flower's own parent monitor (SIGINT once the parent is gone, then
    Flower's graceful exit) ends it with its SuperExec instead."""
    if Path(sys.argv[0]).name == "flwr-serverapp" and os.getppid() != 1:
        parent = os.getppid()
        start_parent_process_monitor(parent)

        def force_exit() -> None:  # Flower's graceful exit can hang on a SuperLink that is gone: 10 s, then out
            while os.getppid() == parent:
                time.sleep(0.5)
            time.sleep(10.0)
            os._exit(1)

        threading.Thread(target=force_exit, daemon=True).start()


def make_server_app(overrides: dict | None = None) -> ServerApp:
    """The ServerApp; overrides stand in for run config where Flower passes none (simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        end_with_superexec()
        cfg = FederationConfig.from_run_config({**dict(context.run_config), **(overrides or {})})
        run_federation(PromptGrid(grid, cfg.reply_poll_s), cfg, log=lambda line: print(line, flush=True))

    return app


app = make_server_app()
