"""The Flower internals fedtune patches or calls still have the shape it relies on.

fedtune runs on one Flower release (common.flower_internals.FLOWER_VERSION) and refuses any other,
at the start of every command that runs Flower. When that release is raised, this file says which
internal changed, by name: the SuperNode's fixed waits it shortens, the object-pull backoff it
tunes, the NodeState calls that mend orphaned tasks, and the Runtime API its site executor speaks.
Flower's public API (flwr.app, flwr.clientapp, flwr.serverapp) is not pinned here.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import inspect
import textwrap
import time
from importlib.metadata import version
from types import ModuleType
from typing import Any

import pytest

import fedtune.cli
from common import flower_internals
from common.flower_internals import FLOWER_VERSION, FlowerVersionError, check_flower_version
from fedtune.runtime.supernode import IDLE_PULL_S, LOCAL_WAIT_S


def resolve(symbol: str) -> Any:
    """``flwr.a.b.name`` as ``from flwr.a.b import name`` finds it (then ``.method``...), or a failure naming it."""
    parts = symbol.split(".")
    found: Any = importlib.import_module(parts[0])
    for depth, part in enumerate(parts[1:], start=2):
        if not hasattr(found, part) and inspect.ismodule(found):
            with contextlib.suppress(ImportError):
                importlib.import_module(".".join(parts[:depth]))
        assert hasattr(found, part), f"{symbol}: flwr {version('flwr')} has no {'.'.join(parts[:depth])}"
        found = getattr(found, part)
    return found


CALLED = {  # what fedtune calls -> the parameters it passes (by name; positional ones in order)
    "flwr.supercore.runtime.RuntimeHttpClient.from_server_address":
        ("server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"),
    "flwr.supercore.runtime.RuntimeHttpClient.AcquireTask": ("self", "request"),
    "flwr.supercore.interceptors.RuntimeVersionHttpInterceptor": ("component_name",),
    "flwr.supercore.interceptors.SuperExecAuthHttpInterceptor": ("master_secret", "protected_methods"),
    "flwr.supercore.interceptors.RuntimeTokenHttpInterceptor": ("token",),
    "flwr.supercore.retry.make_simple_http_retry_invoker": (),
    "flwr.supercore.heartbeat.HeartbeatSender": ("heartbeat_fn",),
    "flwr.supercore.heartbeat.make_task_heartbeat_fn_http": ("client",),
    "flwr.supernode.runtime.run_clientapp.pull_task_input": ("client",),
    "flwr.supernode.runtime.run_clientapp.push_message": ("client", "message", "context"),
    "flwr.supernode.runtime.run_clientapp.push_task_output": ("client", "context", "sub_status", "details"),
    "flwr.app.error.Error": ("code", "reason"),
    "flwr.supernode.cli.flower_supernode": (),
    "flwr.supernode.start_client_internal._pull_and_store_message":
        ("state", "object_store", "node_config", "receive", "get_run", "get_fab", "pull_object",
         "confirm_message_received", "trusted_entities"),
    "flwr.supernode.nodestate.NodeState.get_tasks": ("self", "statuses"),
    "flwr.supernode.nodestate.NodeState.finish_task": ("self", "task_id", "sub_status", "details"),
    "flwr.common.config.flatten_dict": ("raw_dict",),
    "flwr.common.config.unflatten_dict": ("flat_dict",),
}
CONSTANTS = {  # what fedtune reads -> the value it was written against
    "flwr.supercore.version.package_version": FLOWER_VERSION,
    "flwr.supercore.constant.TaskType.CLIENT_APP": "flwr-clientapp",
    "flwr.common.constant.Status.PENDING": "pending",
    "flwr.common.constant.Status.STARTING": "starting",
    "flwr.common.constant.SubStatus.COMPLETED": "completed",
    "flwr.common.constant.SubStatus.FAILED": "failed",
    "flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION": 2,
}
FIELDS = {  # protobuf messages fedtune builds or reads -> the fields it uses
    "flwr.proto.runtime_pb2.AcquireTaskRequest": ("supported_task_types", "agentapp_fab_hashes"),
    "flwr.proto.runtime_pb2.AcquireTaskResponse": ("task", "token"),
    "flwr.proto.task_pb2.Task": ("task_id",),
}


@pytest.mark.parametrize("symbol", sorted(CALLED))
def test_what_fedtune_calls_takes_the_arguments_it_passes(symbol: str) -> None:
    parameters = list(inspect.signature(resolve(symbol)).parameters.values())
    names = [parameter.name for parameter in parameters]
    passed = CALLED[symbol]
    missing = [name for name in passed if name not in names]
    assert not missing, f"{symbol}: no parameter {missing} any more; it takes {names}"
    assert names[: len(passed)] == list(passed) or all(
        parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD) for parameter in parameters
        if parameter.name in passed), f"{symbol}: its parameters moved: {names}"
    required = [p.name for p in parameters if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                and p.name not in passed]
    assert not required, f"{symbol}: now requires {required}, which fedtune does not pass"


@pytest.mark.parametrize("symbol", sorted(CONSTANTS))
def test_the_constants_fedtune_uses_keep_their_values(symbol: str) -> None:
    assert resolve(symbol) == CONSTANTS[symbol], f"{symbol} is now {resolve(symbol)!r}, not {CONSTANTS[symbol]!r}"


@pytest.mark.parametrize("symbol", sorted(FIELDS))
def test_the_protobuf_fields_fedtune_uses_are_there(symbol: str) -> None:
    fields = resolve(symbol).DESCRIPTOR.fields_by_name
    missing = [name for name in FIELDS[symbol] if name not in fields]
    assert not missing, f"{symbol}: no field {missing} any more; it has {sorted(fields)}"


def test_the_executor_signs_the_method_acquire_task_calls() -> None:
    """fedtune.runtime.executor protects "/flwr.proto.Runtime/AcquireTask" with the SuperNode's shared secret."""
    source = inspect.getsource(resolve("flwr.supercore.runtime.RuntimeHttpClient.AcquireTask"))
    assert 'rpc_method="/flwr.proto.Runtime/AcquireTask"' in source, \
        f"flwr.supercore.runtime.RuntimeHttpClient.AcquireTask calls another RPC method now:\n{source}"
    assert resolve("flwr.proto.runtime_pb2.AcquireTaskResponse").DESCRIPTOR.fields_by_name["task"].message_type, \
        "flwr.proto.runtime_pb2.AcquireTaskResponse.task is no message field: HasField('task') fails"
    assert "fab_version" in inspect.signature(resolve("flwr.supercore.run.Run")).parameters, \
        "flwr.supercore.run.Run: no fab_version (the executor compares it with the site's fedtune)"


def _sleeps(module: ModuleType) -> dict[str, list[float]]:
    """Each top-level function of ``module`` -> the constant seconds of its ``time.sleep(...)`` calls."""
    found: dict[str, list[float]] = {}
    for function in ast.parse(inspect.getsource(module)).body:
        if isinstance(function, ast.FunctionDef):
            for call in ast.walk(function):
                if (isinstance(call, ast.Call) and ast.unparse(call.func) == "time.sleep" and call.args
                        and isinstance(call.args[0], ast.Constant)):
                    found.setdefault(function.name, []).append(float(call.args[0].value))
    return found


def test_the_supernode_still_waits_the_fixed_times_we_shorten() -> None:
    """fedtune.runtime.supernode replaces ``time`` in this module only, and maps Flower's 3 s and 0.5 s to its own."""
    module = resolve("flwr.supernode.start_client_internal")
    symbol = "flwr.supernode.start_client_internal"
    assert isinstance(module, ModuleType), f"{symbol} is no module any more: the sleeps cannot be patched in it"
    assert module.time is time, f"{symbol}.time is not the time module: it sleeps another way (`from time import`?)"
    sleeps = _sleeps(module)
    assert IDLE_PULL_S in sleeps.get("start_client_internal", []), \
        f"{symbol}.start_client_internal no longer sleeps {IDLE_PULL_S} s after an empty pull: {sleeps}"
    assert LOCAL_WAIT_S in sleeps.get("_push_messages", []), \
        f"{symbol}._push_messages no longer sleeps {LOCAL_WAIT_S} s waiting for a reply: {sleeps}"
    elsewhere = {name: seconds for name, seconds in sleeps.items()
                 if name not in ("start_client_internal", "_push_messages")
                 and {IDLE_PULL_S, LOCAL_WAIT_S} & set(seconds)}
    assert not elsewhere, f"{symbol}: these waits would be shortened too: {elsewhere}"
    started = resolve("flwr.supernode.cli.flower_supernode").__globals__["start_client_internal"]
    assert started.__globals__ is vars(module), \
        f"flwr.supernode.cli.flower_supernode starts a SuperNode that is not {symbol}.start_client_internal"


def test_the_supernode_looks_up_the_pull_we_wrap_by_name_with_keywords() -> None:
    """fedtune.runtime.supernode.finish_orphaned_tasks replaces ``_pull_and_store_message`` in the module and reads
    ``kwargs["state"]``: the SuperNode must call it by its module name, with keyword arguments only."""
    module = resolve("flwr.supernode.start_client_internal")
    function = resolve("flwr.supernode.start_client_internal.start_client_internal")
    calls = [call for call in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(function))))
             if isinstance(call, ast.Call) and ast.unparse(call.func) == "_pull_and_store_message"]
    symbol = "flwr.supernode.start_client_internal._pull_and_store_message"
    assert calls, f"{symbol} is no longer called by name from start_client_internal"
    assert all(not call.args and "state" in {keyword.arg for keyword in call.keywords} for call in calls), \
        f"{symbol} is called with positional arguments or without state=: {[ast.unparse(c) for c in calls]}"
    assert inspect.signature(module._pull_and_store_message).return_annotation in ("int | None", int | None), \
        f"{symbol} no longer returns a run id or None"


@pytest.mark.parametrize("symbol", ["flwr.supercore.inflatable.inflatable_utils.pull_objects",
                                    "flwr.supercore.inflatable.inflatable_utils.pull_and_inflate_object_from_tree"])
def test_the_object_pull_backoff_we_shorten_is_flowers_default(symbol: str) -> None:
    """common.flower_internals.short_object_pull_backoff rewrites these keyword defaults (1 s doubling to 10 s,
    500 tries); it has run in this process if a test before started a site, so its own values count too."""
    defaults = resolve(symbol).__kwdefaults__ or {}
    ours = dict(zip(("initial_backoff", "backoff_cap"), flower_internals.OBJECT_PULL_BACKOFF_S, strict=True),
                max_tries_per_object=flower_internals.OBJECT_PULL_TRIES)
    theirs = {"initial_backoff": 1, "backoff_cap": 10, "max_tries_per_object": 500}
    for name in theirs:
        assert name in defaults, f"{symbol}: no keyword-only {name!r} with a default any more: {defaults}"
        assert defaults[name] in (theirs[name], ours[name]), f"{symbol}: {name} defaults to {defaults[name]} now"


def test_another_flower_release_is_refused_with_the_command_that_fixes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    check_flower_version()  # the installed one
    monkeypatch.setattr("flwr.supercore.version.package_version", "1.43.0")
    with pytest.raises(FlowerVersionError) as refused:
        check_flower_version()
    assert "needs flwr 1.42.0" in str(refused.value) and "found 1.43.0" in str(refused.value)
    assert f"pip install 'flwr[simulation]=={FLOWER_VERSION}'" in str(refused.value)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every option of ``parser`` and of its subcommands."""
    found = [action for action in parser._actions if action.option_strings]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += [option for sub in action.choices.values() for option in _options(sub)]
    return found


@pytest.mark.parametrize("installed", ["1.43.0", FLOWER_VERSION])
@pytest.mark.parametrize("command", ["simulate", "demo", "server start", "client start"])
def test_a_command_that_runs_flower_checks_the_release_before_it_starts_anything(
        command: str, installed: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    parser, handlers = fedtune.cli.build_parser()
    for option in _options(parser):
        option.required = False  # the command's own checks come after the release's
    ran: list[str] = []
    monkeypatch.setattr(fedtune.cli, "build_parser", lambda **_: (parser, {
        name: (lambda args, name=name: ran.append(name)) for name in handlers}))
    monkeypatch.setattr("flwr.supercore.version.package_version", installed)
    code = fedtune.cli.main(command.split())
    if installed == FLOWER_VERSION:
        assert (code, ran) == (0, [command.split()[0]])
    else:
        assert (code, ran) == (fedtune.cli.EXIT_BAD_INPUT, []), f"`fedtune {command}` ran on flwr {installed}"
        assert f"pip install 'flwr[simulation]=={FLOWER_VERSION}'" in capsys.readouterr().err
