"""Flower's SuperNode with short waits: ``python -m fedtune.runtime.supernode [flower-supernode arguments]``.

Flower 1.42's SuperNode sleeps a fixed 3 s after each pull from the coordinator that brought no
message, and 0.5 s between looks at its own memory while it waits for the executor's reply; in secure
aggregation's lock-step stages nearly all of that is paid at every exchange. Here, in that one module
only, the idle pull waits ``FEDTUNE_SUPERNODE_POLL_S`` (default 0.2 s) and the local looks 20 ms, and
content that has not arrived yet is retried sooner (common.flower_internals); the SuperNode is
otherwise Flower's own. An idle pull is one small HTTPS request: the coordinator sees at most five
per second per connected site while nothing happens.

One Flower bug is mended here: a message that arrives for a run the coordinator no longer runs (its
SuperLink restarted, say) is ignored, but the task made for it stays pending, and an executor that
claims it would wait for content that never comes. Such a task is finished as failed at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from common.flower_internals import short_object_pull_backoff, shorten_sleeps

POLL_ENV = "FEDTUNE_SUPERNODE_POLL_S"
DEFAULT_POLL_S = 0.2
IDLE_PULL_S, LOCAL_WAIT_S = 3.0, 0.5
"""Flower 1.42's two waits in ``start_client_internal``: after an empty pull; between looks at its own state."""


def finish_orphaned_tasks(module: ModuleType) -> None:
    """Wrap ``module._pull_and_store_message``: a task it created but left unfinished while returning None
    (its message was ignored: the run is not running) is finished as failed."""
    from flwr.common.constant import Status, SubStatus

    pull_and_store: Callable[..., int | None] = module._pull_and_store_message

    def mended(**kwargs: Any) -> int | None:
        state = kwargs["state"]
        unfinished = [Status.PENDING, Status.STARTING]
        before = {task.task_id for task in state.get_tasks(statuses=unfinished)}
        run_id = pull_and_store(**kwargs)
        if run_id is None:
            for task in state.get_tasks(statuses=unfinished):
                if task.task_id not in before:
                    state.finish_task(task.task_id, sub_status=SubStatus.FAILED,
                                      details="its message was ignored: the run is not running")
        return run_id

    module._pull_and_store_message = mended  # type: ignore[attr-defined]


def main() -> int:
    short_object_pull_backoff()  # checks the Flower version first
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    poll_s = float(os.environ.get(POLL_ENV, DEFAULT_POLL_S))
    shorten_sleeps(start_client_internal, {IDLE_PULL_S: poll_s, LOCAL_WAIT_S: min(poll_s, 0.02)})
    finish_orphaned_tasks(start_client_internal)
    sys.argv[0] = "flower-supernode"
    return flower_supernode()


if __name__ == "__main__":
    sys.exit(main())
