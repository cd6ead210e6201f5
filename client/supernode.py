"""Flower's SuperNode with short waits: ``python -m client.supernode [flower-supernode arguments]``.

Flower 1.42's SuperNode sleeps a fixed 3 s after each pull from the coordinator that brought no
message, and 0.5 s between looks at its own memory while it waits for the executor's reply; in secure
aggregation's lock-step stages nearly all of that is paid at every exchange. Here, in that one module
only, the idle pull waits ``FEDTUNE_SUPERNODE_POLL_S`` (default 0.2 s) and the local looks 20 ms, and
content that has not arrived yet is retried sooner (common.flower_internals); the SuperNode is
otherwise Flower's own. An idle pull is one small HTTPS request: the coordinator sees at most five
per second per connected site while nothing happens.
"""

from __future__ import annotations

import os
import sys

from common.flower_internals import short_object_pull_backoff, shorten_sleeps

POLL_ENV = "FEDTUNE_SUPERNODE_POLL_S"
DEFAULT_POLL_S = 0.2
IDLE_PULL_S, LOCAL_WAIT_S = 3.0, 0.5
"""Flower 1.42's two waits in ``start_client_internal``: after an empty pull; between looks at its own state."""


def main() -> int:
    short_object_pull_backoff()  # checks the Flower version first
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    poll_s = float(os.environ.get(POLL_ENV, DEFAULT_POLL_S))
    shorten_sleeps(start_client_internal, {IDLE_PULL_S: poll_s, LOCAL_WAIT_S: min(poll_s, 0.02)})
    sys.argv[0] = "flower-supernode"
    return flower_supernode()


if __name__ == "__main__":
    sys.exit(main())
