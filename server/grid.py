"""The ServerApp's Grid with prompt replies: Flower 1.39's gRPC/HTTP Grid sleeps 3 s between pulls in
send_and_receive, so a reply that arrived just after a pull waited up to 3 s; this one pulls every 0.2 s with the
Grid's own push_messages / pull_messages. Everything else is the wrapped Grid's."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

PULL_INTERVAL_S = 0.2


class PromptGrid(Grid):
    """A Grid that delegates to `grid` and polls for replies every `interval` seconds."""

    def __init__(self, grid: Grid, interval: float = PULL_INTERVAL_S):
        self.grid = grid
        self.interval = interval
        self.pushed_at = 0.0  # wall clock of the last push, and of each reply's arrival (metrics: the timeline)
        self.arrived_at: dict[str, float] = {}

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every message has its reply or timeout seconds have passed (None: no limit)."""
        self.pushed_at, self.arrived_at = time.time(), {}
        pending = set(self.grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            self.arrived_at.update({m.metadata.reply_to_message_id: time.time() for m in got})
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (end is not None and time.monotonic() >= end):
                break
            time.sleep(self.interval if end is None else max(0.0, min(self.interval, end - time.monotonic())))
        return replies

    def __getattr__(self, name: str):  # anything else a Grid implementation has
        return getattr(self.grid, name)
