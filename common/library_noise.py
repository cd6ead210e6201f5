"""Library warnings that say nothing about the user's run, silenced where a process starts (never at import).

Each entry names the one warning it silences by category, the start of its message and the module
that raises it; any other warning still shows. Entry points call it: the command line (fedtune.cli), and
through :func:`start_process_log` the site's executor (fedtune.runtime.executor), the ServerApp's main and
the ClientApp's lifespan.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class LibraryNoise:
    category: type[Warning]
    message: str
    """A regular expression the start of the warning's message matches."""
    module: str
    """The module that raises it, as a regular expression."""
    why: str
    """Why it says nothing about the user's run, and why its cause is not fixed here."""


LIBRARY_NOISE = (
    LibraryNoise(FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils\Z",
                 "peft 0.21 reads this transformers 5 property itself whenever it wraps a model "
                 "(peft_model.py); our code calls neither"),
    LibraryNoise(UserWarning, r"Optimal order is the largest alpha", r"opacus\.accountants\.analysis\.rdp\Z",
                 "raised inside Opacus: by its search for σ at trial values far from the answer, and by the PRV "
                 "accountant when it bounds its discretisation domain with RDP. The ε and σ a site uses are "
                 "unchanged by more RDP orders (checked up to order 8192, which silences it at 8× the time)"),
    LibraryNoise(RuntimeWarning, r"divide by zero encountered in log", r"opacus\.accountants\.analysis\.prv\.prvs\Z",
                 "the PRV of a full-batch step (q = 1) computes log(1 − q) = −inf on purpose; ε stays finite"),
)


def silence_library_noise() -> None:
    """Ignore exactly the warnings in :data:`LIBRARY_NOISE` in this process (idempotent)."""
    for noise in LIBRARY_NOISE:
        warnings.filterwarnings("ignore", message=noise.message, category=noise.category, module=noise.module)
    # bitsandbytes (QLoRA) suggests a "kernels" package on import, which would fetch code from a model hub: never here.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def start_process_log(fmt: str = "%(asctime)s %(levelname)s %(name)s: %(message)s") -> None:
    """What every process fedtune's code runs in does first: its log lines (INFO and up, to stderr, which
    Flower's processes send to their log files) and no library noise."""
    logging.basicConfig(level=logging.INFO, format=fmt)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # else one line per poll of the SuperLink
    silence_library_noise()
