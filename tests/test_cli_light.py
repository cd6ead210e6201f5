"""Commands that do not train never import torch (they answer in well under a second)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import sys
from fedtune.cli import main
code = main(sys.argv[1:])
print("torch" in sys.modules, code)
"""


@pytest.mark.process
@pytest.mark.parametrize("args", [
    ["passport", "verify", "{tmp}/no-such-adapter", "--key", "{tmp}/no.pub"],
    ["site", "keygen", "--site", "hospital-a", "--out", "{tmp}/keys"],
    ["provision", "--enrol", "{tmp}/none.enrol.json", "--server-host", "h", "--out", "{tmp}/kits"],
    ["provision", "--renew", "{tmp}/kits", "--out", "{tmp}/renewed"],
    ["site", "members", "{tmp}/registry.json"],
    ["site", "pin-members", "--registry", "{tmp}/registry.json", "--state", "{tmp}/state", "--digest", "00"],
])
def test_a_command_that_does_not_train_never_imports_torch(tmp_path: Path, args: list[str]):
    argv = [arg.format(tmp=tmp_path) for arg in args]
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120)
    imported, code = done.stdout.splitlines()[-1].split()
    assert imported == "False", done.stderr
    assert code in ("0", "2")  # done, or bad input named on stderr
