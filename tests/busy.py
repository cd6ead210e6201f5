"""Run pytest while every core is busy: ``python -m tests.busy [--times N] [--hogs K] [PYTEST ARGS...]``.

Starts K busy-loop processes (default: one per core), runs pytest with the given arguments N times
(default 3), and stops exactly the hogs it started, whatever happened. Each pass's result and wall
time is printed; the exit code is the first failing pass's, else 0. ``make test-busy`` runs the
tests that start processes and servers this way: they must wait for states, never for times.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import subprocess
import sys
import time

from fedtune.runtime.processes import terminate_as_interrupt


def hog() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops its hogs
    while True:
        pass


def run_pytest(pytest_args: list[str]) -> int:
    pytest = subprocess.Popen([sys.executable, "-m", "pytest", *pytest_args])
    try:
        return pytest.wait()
    except KeyboardInterrupt:  # pytest stops what its tests started, then exits
        pytest.send_signal(signal.SIGINT)
        pytest.wait()
        raise


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--times", type=int, default=3, help="how many times pytest runs (default 3)")
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 1, help="busy loops (default: one per core)")
    args, pytest_args = parser.parse_known_args()
    if args.times < 1 or args.hogs < 0:
        parser.error("--times must be >= 1 and --hogs >= 0")
    hogs = [multiprocessing.Process(target=hog, daemon=True) for _ in range(args.hogs)]
    results = []
    with terminate_as_interrupt():  # SIGTERM, like Ctrl-C, ends in the finally that stops the hogs
        try:
            for process in hogs:
                process.start()
            for attempt in range(1, args.times + 1):
                started = time.monotonic()
                code = run_pytest(pytest_args)
                results.append((code, time.monotonic() - started))
                print(f"busy pass {attempt}/{args.times} with {args.hogs} hog(s): "
                      f"{'passed' if code == 0 else f'FAILED (exit {code})'} in {results[-1][1]:.0f}s", flush=True)
        finally:
            for process in hogs:
                if process.pid is not None:
                    process.kill()
                    process.join()
    return next((code for code, _ in results if code != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
