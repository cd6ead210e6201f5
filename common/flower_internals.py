"""The few Flower internals fedtune tunes, in one place, for the one Flower release they were read in.

Flower 1.42's deployment runtime waits on fixed timers that a lock-step protocol pays at every
exchange: a SuperNode sleeps 3 s after a pull that brought nothing and 0.5 s while it waits for a
reply, and a component that sees a message before its content has arrived retries the content after
1 s, then 2 s, 4 s... These helpers shorten those waits in our own processes (the SuperNode we
launch, the site executor, the ServerApp). Each checks the Flower version first and refuses another, and
``fedtune`` checks it before a command that runs Flower starts anything. tests/test_flower_contract.py
names the internal that changed when the pinned release is raised.
"""

from __future__ import annotations

import time
from types import ModuleType

from common.config import BadInput

FLOWER_VERSION = "1.42.0"

OBJECT_PULL_BACKOFF_S = (0.02, 1.0)
"""First retry and cap when a message's content is not there yet (Flower: 1 s and 10 s)."""
OBJECT_PULL_TRIES = 20_000
"""Retries per object at the shorter backoff: still hours of patience, as Flower's 500 tries at 10 s."""


class FlowerVersionError(BadInput):
    """The installed Flower is not the release these internals were read in."""


def check_flower_version() -> None:
    """Refuse any Flower but the release these internals were read in (tests/test_flower_contract.py pins them),
    with the command that installs it."""
    from flwr.supercore.version import package_version

    if package_version != FLOWER_VERSION:
        raise FlowerVersionError(f"fedtune needs flwr {FLOWER_VERSION} (it patches and calls Flower internals read "
                                 f"in that release), found {package_version}. Install it in this environment: "
                                 f"pip install 'flwr[simulation]=={FLOWER_VERSION}' (or, from fedtune's source "
                                 "tree, pip install -c constraints.txt -e .)")


class ShortSleeps:
    """The ``time`` module as one module sees it, with ``sleep(Flower's wait)`` replaced by ours."""

    def __init__(self, waits: dict[float, float]) -> None:
        if not all(0.001 <= ours <= theirs for theirs, ours in waits.items()):
            raise ValueError(f"each wait must be shortened to between 1 ms and Flower's own, got {waits}")
        self.waits = waits

    def sleep(self, seconds: float) -> None:
        time.sleep(self.waits.get(seconds, seconds))

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def shorten_sleeps(module: ModuleType, waits: dict[float, float]) -> None:
    """In ``module`` only, each ``time.sleep(theirs)`` with ``theirs`` in ``waits`` sleeps ``waits[theirs]``."""
    module.time = ShortSleeps(waits)  # type: ignore[attr-defined]


def short_object_pull_backoff() -> None:
    """Retry a message's not-yet-arrived content after 20 ms (doubling to 1 s) instead of 1 s (to 10 s)."""
    check_flower_version()
    from flwr.supercore.inflatable import inflatable_utils

    initial, cap = OBJECT_PULL_BACKOFF_S
    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        assert function.__kwdefaults__ is not None
        function.__kwdefaults__.update(initial_backoff=initial, backoff_cap=cap, max_tries_per_object=OBJECT_PULL_TRIES)
