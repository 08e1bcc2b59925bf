"""A federation with a rogue node, on Flower's simulation engine: the real noprop ServerApp, and a ClientApp that
is noprop's own wrapped so that the node holding partition 0 tampers each train reply it sends, one way per
round (TAMPERS). tests/test_faults.py runs its federation in process (make_rogue_client_app over LocalGrid, the
real run loop); as a script it runs on Flower's simulation engine (Ray lives and dies with this process):

    python tests/rogue_sim.py OUT NPZ VARIANT

VARIANT (VARIANTS) picks the aggregation and the ownership: under median with rotate the rogue owns its block
alone; under mean with replicate (and a learned embedding) each block has a second, honest owner, and the
mean would follow a reply that got through. Each tampered reply is recorded in OUT/rogue.jsonl (round, node id,
what was done) for the test to match against the server's metrics.jsonl, and every node's train message and
reply (arrays and example count) in OUT/traffic/, for the test to rebuild the honest nodes' aggregate.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

TAMPERS = ("foreign-block", "stale-round", "huge-count", "out-of-range")
ROGUE_PARTITION = 0
NUM_NODES = 3
T = 3
SETTINGS = {"T": T, "channels": "8,16,16", "hidden": 64, "batch-size": 32, "lr": 3e-3, "dropout": 0.0,
            "local-epochs": 3, "eval-limit": 0, "client-threads": 1, "num-rounds": len(TAMPERS),
            "min-nodes": NUM_NODES, "head-steps": 0}  # no server-side head fit: the aggregate is the whole model
VARIANTS = {
    "median-rotate": {"aggregation": "median", "policy": "rotate"},
    "mean-replicate": {"aggregation": "mean", "policy": "replicate", "replicas": 2, "embedding": "learned:8"},
}


def tamper(arrays: dict[str, np.ndarray], metrics: dict, kind: str, rnd: int, blocks: list[int]) -> None:
    """Spoil one train reply in place, the way a poisoned or buggy node would."""
    if kind == "foreign-block":  # also send a block it was not given (its own block's tensors, renamed): another
        # block of the chain, or one past its end when it holds them all (replicate may give the fastest node all)
        own, foreign = blocks[0], next((t for t in range(1, T + 1) if t not in blocks), T + 1)
        for key in [k for k in arrays if k.startswith(f"blocks.{own}.")]:
            arrays[key.replace(f"blocks.{own}.", f"blocks.{foreign}.", 1)] = arrays[key].copy()
    elif kind == "stale-round":  # replay an answer to the previous round
        metrics["round"] = rnd - 1
    elif kind == "huge-count":  # buy weight in the mean
        metrics["num-examples"] = 10**9
    elif kind == "out-of-range":  # a scaled head (model replacement / boosting)
        key = next(k for k in arrays if k.startswith("head.") and k.endswith("weight"))
        arrays[key] = (arrays[key] * 1e4 + 1e3).astype(arrays[key].dtype)
    else:
        raise ValueError(kind)


def make_rogue_client_app(overrides: dict, log_path: Path):
    from flwr.app import Message, MetricRecord
    from flwr.clientapp import ClientApp

    from noprop.client.app import make_client_app
    from noprop.io import append_jsonl
    from noprop.records import arrays_to_record, record_to_arrays

    honest = make_client_app(overrides)
    app = ClientApp()

    @app.query()
    def query(msg: Message, context):
        return honest(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context):
        return honest(msg, context)

    traffic = log_path.parent / "traffic"
    traffic.mkdir(parents=True, exist_ok=True)

    def record(name: str, arrays: dict[str, np.ndarray], num_examples: int) -> None:
        np.savez(traffic / f"{name}.npz", **arrays, **{"~num-examples": np.asarray(num_examples)})

    @app.train()
    def train(msg: Message, context):
        config = msg.content["config"]
        rnd, blocks = int(config["round"]), [int(b) for b in config["blocks"]]
        node = int(context.node_id)
        record(f"r{rnd}-n{node}-in", record_to_arrays(msg.content["arrays"]), 0)
        reply = honest(msg, context)
        arrays = record_to_arrays(reply.content["arrays"])
        metrics = dict(reply.content["metrics"])
        if int(context.node_config["partition-id"]) == ROGUE_PARTITION:
            kind = TAMPERS[(rnd - 1) % len(TAMPERS)]
            tamper(arrays, metrics, kind, rnd, blocks)
            reply.content["arrays"] = arrays_to_record(arrays)
            reply.content["metrics"] = MetricRecord(metrics)
            append_jsonl(log_path, {"round": rnd, "node": node, "tamper": kind})
            print(f"rogue node {node}: round {rnd}: {kind}", flush=True)
        record(f"r{rnd}-n{node}-out", arrays, int(metrics["num-examples"]))
        return reply

    return app


def main(out: str, npz: str, variant: str) -> int:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    from noprop.ops.flower import apply_flower_env

    apply_flower_env(out_dir / ".flower" / "flwr-home")  # before flwr and Ray are imported
    from flwr.simulation import run_simulation

    from noprop.ops.sim import _shutdown_ray, backend_config
    from noprop.server.app import make_server_app

    overrides = {**SETTINGS, **VARIANTS[variant], "out": str(out_dir), "dataset": f"npz:{npz}"}
    try:
        run_simulation(server_app=make_server_app(overrides),
                       client_app=make_rogue_client_app(overrides, out_dir / "rogue.jsonl"),
                       num_supernodes=NUM_NODES, backend_config=backend_config(2, 1.0))
    finally:
        _shutdown_ray()
    return 0 if (out_dir / "DONE.json").exists() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3]))
