"""The noprop-fl ServerApp: reads the run config and runs the federation: block ownership for NoProp-DT
(server/rounds.py), FedAvg of the one network for the other methods (server/fedavg.py)."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from noprop.federation import FederationConfig
from noprop.server.fedavg import run_fedavg
from noprop.server.rounds import main_loop


def make_server_app(overrides: dict | None = None) -> ServerApp:
    """The ServerApp; overrides stand in for run config where Flower passes none (simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = FederationConfig.from_run_config({**dict(context.run_config), **(overrides or {})})
        run = main_loop if cfg.owns_blocks else run_fedavg  # NoProp-DT owns blocks; the others are one network
        run(grid, cfg, log=lambda line: print(line, flush=True))

    return app


app = make_server_app()
