"""Commands that do not talk to Flower import neither Flower nor torch (they answer in a fraction of a second).

Each command runs in a fresh interpreter, on real keys and kits, and reports which heavy modules it
loaded. The time itself is measured, not asserted: `python -m simulations.benchmarks.cli_startup`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from common.privacy_audit import audit, write_audit_result
from common.registry import load_registry
from fedtune.cli import COMMANDS, FLOWER_COMMANDS, build_parser, main
from fedtune.runtime.kits import provision, read_enrolments, site_keygen

PROBE = """
import json, sys
from fedtune.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:  # --help
    code = exit.code
print(json.dumps({"code": code, "loaded": sorted(name for name in sys.modules if name in json.loads(%r))}))
"""

FLOWER_AND_TORCH = ("flwr", "httpx", "grpc", "torch", "transformers", "peft", "opacus")
HEAVY = (*FLOWER_AND_TORCH, "numpy", "psutil", "cryptography.x509")
"""What a command that reads a passport or a registry, or prints help, never loads."""

HELP = [["--help"], ["simulate", "--help"], ["demo", "--help"], ["server", "start", "--help"],
        ["client", "start", "--help"], ["site", "--help"], ["site", "keygen", "--help"], ["site", "members", "--help"],
        ["site", "pin-members", "--help"], ["provision", "--help"], ["passport", "verify", "--help"],
        ["wait-ready", "--help"], ["audit", "--help"]]
LIGHT = {  # command -> its arguments ({tmp}: a directory with two enrolled sites and their kits) and exit codes
    "passport verify": (["passport", "verify", "{tmp}/no-such-adapter", "--key", "{tmp}/no.pub"], {2}),
    "passport verify (no passport)": (["passport", "verify", "{tmp}", "--key",
                                       "{tmp}/kits/server/passport-signing.pub"], {1}),
    "site members": (["site", "members", "{tmp}/kits/server/registry.json"], {0}),
    "site pin-members": (["site", "pin-members", "--registry", "{tmp}/kits/server/registry.json", "--state",
                          "{tmp}/state", "--digest", "{digest}"], {0}),
    "site keygen": (["site", "keygen", "--site", "hospital-c", "--out", "{tmp}/keys-c"], {0}),
    "provision": (["provision", "--enrol", "{tmp}/keys-a,{tmp}/keys-b", "--server-host", "localhost", "--out",
                   "{tmp}/kits-again"], {0}),
    "provision (renew)": (["provision", "--renew", "{tmp}/kits", "--out", "{tmp}/kits-renewed"], {0}),
    "wait-ready": (["wait-ready", "--port", "9", "--timeout", "0.2"], {1}),  # nothing listens on the discard port
    "audit": (["audit", "{tmp}/audited"], {0}),
    "audit (none yet)": (["audit", "{tmp}"], {2}),
}
MAKES_KEYS = {"site keygen", "provision", "provision (renew)"}  # need X.509 and the key formats
RUN_SETTINGS = ("common.config", "client.policy")
"""Where the options of `simulate`, `server start` and `client start` come from: `fedtune` builds only the options
of the command it runs, so reading a passport, a registry or an audit loads neither."""
READS_ONLY = ["passport verify", "passport verify (no passport)", "site members", "site pin-members", "audit"]


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory) -> dict[str, str]:
    """Two sites' keys and the kits provisioned from them, made in this process."""
    tmp = tmp_path_factory.mktemp("light")
    for site in ("a", "b"):
        site_keygen(f"hospital-{site}", tmp / f"keys-{site}")
    provision(read_enrolments([tmp / "keys-a", tmp / "keys-b"]), ["localhost"], tmp / "kits")
    write_audit_result(tmp / "audited", audit([float(i) for i in range(20)], [i >= 10 for i in range(20)], 1e-5))
    return {"tmp": str(tmp), "digest": load_registry(tmp / "kits" / "server" / "registry.json").digest.hex()}


def run_command(argv: list[str], forbidden: tuple[str, ...]) -> dict:
    return run_with_stderr(argv, forbidden)[0]


def run_with_stderr(argv: list[str], forbidden: tuple[str, ...]) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", PROBE % json.dumps(forbidden), *argv], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


@pytest.mark.process
@pytest.mark.parametrize("name", sorted(LIGHT))
def test_a_command_that_does_not_talk_to_flower_loads_neither_flower_nor_torch(name: str, enrolled) -> None:
    args, codes = LIGHT[name]
    forbidden = FLOWER_AND_TORCH if name in MAKES_KEYS else HEAVY
    answer = run_command([arg.format(**enrolled) for arg in args], forbidden)
    assert answer["code"] in codes, answer
    assert answer["loaded"] == [], f"`fedtune {' '.join(args)}` imported {answer['loaded']}"


@pytest.mark.process
@pytest.mark.parametrize("argv", HELP, ids=" ".join)
def test_every_help_answers_without_flower_torch_or_numpy(argv: list[str]) -> None:
    answer = run_command(argv, HEAVY)
    assert answer == {"code": 0, "loaded": []}, f"`fedtune {' '.join(argv)}` imported {answer['loaded']}"


@pytest.mark.process
@pytest.mark.parametrize("name", READS_ONLY)
def test_a_command_that_only_reads_loads_no_other_commands_options(name: str, enrolled) -> None:
    args, codes = LIGHT[name]
    answer = run_command([arg.format(**enrolled) for arg in args], RUN_SETTINGS)
    assert answer["code"] in codes, answer
    assert answer["loaded"] == [], f"`fedtune {' '.join(args)}` imported {answer['loaded']}"


@pytest.mark.process
def test_fedtune_help_loads_no_commands_options() -> None:
    assert run_command(["--help"], RUN_SETTINGS) == {"code": 0, "loaded": []}


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 0
    return capsys.readouterr().out


def test_fedtune_help_names_every_command_with_its_one_line_help(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # each command's help on one line
    text = help_text(["--help"], capsys)
    assert "{" + ",".join(COMMANDS) + "}" in text
    for name, command in COMMANDS.items():
        assert f"{name}  " in text and command.help in text, f"`fedtune --help` lost {name!r}: {text}"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_commands_help_shows_the_options_of_the_whole_command_line(name: str, capsys) -> None:
    """`fedtune CMD --help` builds only CMD's options: the same help as CMD's in the parser of every command."""
    whole = build_parser()[0]._subparsers._group_actions[0].choices[name]  # type: ignore[union-attr]
    assert help_text([name, "--help"], capsys) == whole.format_help()


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every runnable command of ``parser`` ("site keygen", "simulate", ...)."""
    actions = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not actions:
        return [prefix.strip()]
    return [command for name, sub in actions[0].choices.items() for command in _commands(sub, f"{prefix} {name}")]


def test_every_command_either_runs_flower_or_is_checked_light_here() -> None:
    commands = _commands(build_parser()[0])
    light = {name.split(" (")[0] for name in LIGHT}
    unclassified = [command for command in commands if command.split()[0] not in FLOWER_COMMANDS
                    and command not in light]
    assert not unclassified, f"add {unclassified} to LIGHT (or to fedtune.cli.FLOWER_COMMANDS if it runs Flower)"
    assert {" ".join(argv[:-1]) for argv in HELP} >= set(commands), "add each new command's --help to HELP"


TORCH = ("torch", "transformers", "peft", "opacus")
FLOWER_REFUSALS = {  # a command that runs Flower, given bad input: its reason, before it loads any model code
    "simulate (epsilon -3)": ("privacy.epsilon must be a positive number",
                              ["simulate", "--out", "{tmp}/sim", "--epsilon", "-3"]),
    "client start (another site's keys)": (
        "is not the SuperNode key the coordinator enrolled",
        ["client", "start", "--kit", "{tmp}/kits/sites/hospital-a", "--keys", "{tmp}/keys-b", "--data",
         "{tmp}/none.csv", "--state", "{tmp}/state-a", "--superlink", "127.0.0.1:9", "--labels", "no,yes",
         "--max-epsilon", "8"]),
    "server start (missing test data)": (
        "none.csv does not exist",
        ["server", "start", "--kit", "{tmp}/kits/server", "--state", "{tmp}/coord", "--test-data", "{tmp}/none.csv",
         "--port", "9"]),
}


@pytest.mark.process
@pytest.mark.parametrize("name", sorted(FLOWER_REFUSALS))
def test_bad_input_is_refused_before_torch_loads(name: str, enrolled) -> None:
    """An IT team's typo is answered at once: the kit, keys, data and settings are checked before torch loads."""
    why, args = FLOWER_REFUSALS[name]
    answer, stderr = run_with_stderr([arg.format(**enrolled) for arg in args], TORCH)
    assert answer == {"code": 2, "loaded": []} and why in stderr, f"`fedtune {name}`: {answer}, {stderr}"


@pytest.mark.process
def test_a_flower_command_refusing_bad_input_prints_only_why(tmp_path) -> None:
    """`fedtune simulate` loads Flower (its release is checked first), then refuses a missing data file: the
    terminal shows that reason and no library warning."""
    done = subprocess.run([sys.executable, "-m", "fedtune.cli", "simulate", "--out", str(tmp_path / "run"), "--data",
                           str(tmp_path / "missing.csv"), "--test-data", str(tmp_path / "missing.csv")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1].startswith("fedtune: data file") and "missing.csv" in done.stderr, done.stderr
    assert not [line for line in done.stderr.splitlines() if "Warning" in line], done.stderr
