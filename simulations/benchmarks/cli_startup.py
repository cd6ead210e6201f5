"""How long a command that does not talk to Flower takes, as a multiple of a bare ``cryptography`` import.

    python -m simulations.benchmarks.cli_startup [--repeats 5]

Each command runs in a fresh interpreter, interleaved with the baseline
(``python -c "import cryptography.hazmat.primitives.asymmetric.ed25519"``) so that both see the same load;
the ratio is of the medians. Target: ≤ 3×. On a busy machine the ratio holds better than the seconds.
"""

from __future__ import annotations

import argparse
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


def wall_seconds(args: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, check=False)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (and of the baseline)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:  # the baseline runs outside the project
        baseline: list[float] = []
        commands: dict[str, list[float]] = {name: [] for name in COMMANDS}
        wall_seconds(BASELINE, Path(scratch))  # warm the file cache once for both
        for command in COMMANDS.values():
            wall_seconds(command, ROOT)
        for _ in range(args.repeats):
            for name, command in COMMANDS.items():
                baseline.append(wall_seconds(BASELINE, Path(scratch)))
                commands[name].append(wall_seconds(command, ROOT))
    bare = statistics.median(baseline)
    print(f"bare `import cryptography...ed25519`: median {bare:.3f} s of {len(baseline)}")
    for name, seconds in commands.items():
        took = statistics.median(seconds)
        print(f"fedtune {name:<16} median {took:.3f} s of {len(seconds)}: {took / bare:.1f}× the bare import")
    return 0


if __name__ == "__main__":
    sys.exit(main())
