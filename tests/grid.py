"""Flower's Grid as the round loop uses it, answering every message at once in this process (no Flower engine)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

from flwr.app import Message


class InstantGrid:
    """push_messages / pull_messages / get_node_ids / run; a subclass says how a node answers a message."""

    def __init__(self, nodes: list[int], run_id: int) -> None:
        self.nodes = sorted(nodes)
        self.run = SimpleNamespace(run_id=run_id)
        self._ids = itertools.count(1)
        self._replies: dict[str, Message] = {}

    def answer(self, message: Message) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            mid = f"m{next(self._ids)}"
            reply = self.answer(message)
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            self._replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self._replies.pop(i) for i in ids if i in self._replies]
