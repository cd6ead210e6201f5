"""How long a command that does not talk to Flower takes, as a multiple of a bare ``cryptography`` import.

    python -m simulations.benchmarks.cli_startup [--repeats 5]

Each command runs in a fresh interpreter, interleaved with the baseline
(``python -c "import cryptography.hazmat.primitives.asymmetric.ed25519"``) so that both see the same load;
the ratio is of the medians. Target: ≤ 3×. On a busy machine the ratio holds better than the seconds, and the
ratio of CPU time (the interpreter's own user + system time, which waiting for a core does not add to) better
than the ratio of wall time.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ["-c", "import cryptography.hazmat.primitives.asymmetric.ed25519"]
COMMANDS = {
    "passport verify": ["-m", "fedtune.cli", "passport", "verify", "/no/such/dir", "--key", "/no/such.pub"],
    "site members": ["-m", "fedtune.cli", "site", "members", "/no/such/registry.json"],
    "--help": ["-m", "fedtune.cli", "--help"],
}


def child_cpu_seconds() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def seconds(args: list[str], cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one run of ``python ARGS``."""
    started, cpu = time.perf_counter(), child_cpu_seconds()
    subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, check=False)
    return time.perf_counter() - started, child_cpu_seconds() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (and of the baseline)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:  # the baseline runs outside the project
        baseline: list[tuple[float, float]] = []
        commands: dict[str, list[tuple[float, float]]] = {name: [] for name in COMMANDS}
        seconds(BASELINE, Path(scratch))  # warm the file cache once for both
        for command in COMMANDS.values():
            seconds(command, ROOT)
        for _ in range(args.repeats):
            for name, command in COMMANDS.items():
                baseline.append(seconds(BASELINE, Path(scratch)))
                commands[name].append(seconds(command, ROOT))
    bare_wall, bare_cpu = (statistics.median(runs) for runs in zip(*baseline, strict=True))
    print(f"bare `import cryptography...ed25519`: median {bare_wall:.3f} s wall, {bare_cpu:.3f} s CPU of "
          f"{len(baseline)}")
    for name, runs in commands.items():
        wall, cpu = (statistics.median(taken) for taken in zip(*runs, strict=True))
        print(f"fedtune {name:<16} median {wall:.3f} s wall, {cpu:.3f} s CPU of {len(runs)}: {wall / bare_wall:.1f}× "
              f"(CPU {cpu / bare_cpu:.1f}×) the bare import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
