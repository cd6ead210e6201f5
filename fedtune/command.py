"""One ``fedtune`` command, as fedtune.cli and fedtune.deploy_cli declare theirs (light: every command imports it)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A command's one-line help (all that ``fedtune --help`` needs), the function that adds its options (called
    only when it is the command run, so that importing what its options come from is its own cost), and its
    handler (an exit code; None is 0)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    description: str | None = None
    """What ``fedtune COMMAND --help`` says above the options."""
    formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter
