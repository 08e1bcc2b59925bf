"""Small helpers shared by the federation tests."""

from __future__ import annotations

from flwr.app import Context, Message, MessageType, RecordDict

from noprop.client.app import make_client_app
from noprop.diagnostics import chain_diagnostics

READOUT_KEYS = ("accuracy", "chain_accuracy", "ensemble_accuracy", "nearest_accuracy", "block_accuracy")


def chain_numbers(model, data, mode: str = "deterministic", seed: int = 0) -> tuple:
    """Every readout of the model on data (READOUT_KEYS), as the server records them each round."""
    found = chain_diagnostics(model, data, mode, seed=seed)
    return tuple(found[k] for k in READOUT_KEYS)


class LocalGrid:
    """The two Grid calls the federation makes, answered by each node's ClientApp in this process (no Flower
    processes: a run is a few seconds). A node in ``gone`` is offline: it is not listed and a message to it gets
    no reply. A node in ``mute`` is listed but leaves its next n messages unanswered (a restarted SuperLink's
    database lists a client as online while it is still reconnecting); ``asked`` counts each node's queries."""

    def __init__(self, npz, num_nodes: int, run_config: dict, max_blocks: int = 0,
                 node_ids: list[int] | None = None):
        self.app = make_client_app()
        ids = node_ids or [100 + i for i in range(num_nodes)]  # node_ids: as Flower draws them (random per run)
        self.contexts = {
            ids[i]: Context(run_id=1, node_id=ids[i], state=RecordDict(), run_config=run_config,
                            node_config={"data": f"npz:{npz}", "partition-id": i, "num-partitions": num_nodes,
                                         "threads": 1, "max-blocks": max_blocks})
            for i in range(num_nodes)}
        self.gone: set[int] = set()
        self.mute: dict[int, int] = {}
        self.asked: dict[int, int] = {}

    def get_node_ids(self) -> list[int]:
        return [n for n in self.contexts if n not in self.gone]

    def send_and_receive(self, messages, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # what the SuperLink does on push
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type == MessageType.QUERY:
                self.asked[node] = self.asked.get(node, 0) + 1
            if self.mute.get(node, 0) > 0:
                self.mute[node] -= 1
            elif node not in self.gone:
                replies.append(self.app(msg, self.contexts[node]))
        return replies
