"""The noprop-fl ServerApp: reads the run config and runs the federation (server/rounds.py)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from noprop.federation import FederationConfig
from noprop.server.rounds import main_loop


def make_server_app(overrides: dict | None = None) -> ServerApp:
    """The ServerApp; overrides stand in for run config where Flower passes none (simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = FederationConfig.from_run_config({**dict(context.run_config), **(overrides or {})})
        main_loop(grid, cfg, log=lambda line: print(line, flush=True))

    return app


app = make_server_app()
