"""Run the federated personalization on Flower's simulation engine (Ray) from Python or the
console script: `fineprune simulate --task digits --clients 4 --out DIR`."""
from __future__ import annotations

import json
import os
from pathlib import Path

from common.federation import merged_config


def simulate(overrides: dict, backend_cpus: float = 1.0, verbose: bool = False) -> dict:
    """Returns the report dict (also written to <out-dir>/report.json)."""
    try:
        import ray  # noqa: F401  (Flower's simulation engine runs on it)
    except ImportError:
        raise ValueError("fineprune simulate needs Flower's simulation engine (Ray): "
                         "pip install -e '.[simulation]'") from None
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.client_app import app as client_app
    from server.server_app import run_server

    cfg = merged_config({}, overrides)  # fail fast on bad keys, before Ray starts
    out = Path(cfg["out-dir"]).expanduser().resolve()
    overrides = dict(overrides, **{"out-dir": str(out)})
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context):
        run_server(grid, dict(context.run_config), overrides)

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg["num-clients"],
                   backend_config={"client_resources": {"num_cpus": backend_cpus, "num_gpus": 0.0},
                                   "init_args": {"logging_level": "error", "log_to_driver": verbose}},
                   verbose_logging=verbose)
    path = out / "report.json"
    if not path.exists():
        raise RuntimeError(f"the simulation ended without writing {path}; see the log above")
    return json.loads(path.read_text())
