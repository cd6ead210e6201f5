"""The site's deployment runtime: a SuperNode with short waits and the site's own task executor.

The executor claims tasks with a secret it shares with its SuperNode; another local process
without it claims nothing. The Flower internals it relies on are version-checked.
"""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path

import httpx
import pytest

from common import flower_internals
from common.flower_internals import FlowerVersionError, ShortSleeps, check_flower_version, shorten_sleeps
from fedtune.runtime.executor import claim_task, runtime_client, task_claimer, task_heartbeat
from fedtune.runtime.processes import ManagedProcess, flower_env, free_port, port_in_use


def test_flowers_fixed_waits_are_shortened_in_that_module_only() -> None:
    module = types.ModuleType("probe")
    module.time = time  # type: ignore[attr-defined]
    shorten_sleeps(module, {3.0: 0.05})
    started = time.monotonic()
    module.time.sleep(3.0)  # type: ignore[attr-defined]
    assert time.monotonic() - started < 3.0  # not Flower's 3 s (however busy the machine, 50 ms is well below)
    started = time.monotonic()
    module.time.sleep(0.3)  # type: ignore[attr-defined]  # a wait we did not name is Flower's own
    assert time.monotonic() - started >= 0.3
    assert isinstance(module.time, ShortSleeps) and module.time.monotonic() > 0  # type: ignore[attr-defined]
    assert time.sleep is not module.time.sleep  # type: ignore[attr-defined]  # nobody else's time changed
    for bad in ({3.0: 0.0}, {0.5: 1.0}):
        with pytest.raises(ValueError, match="between 1 ms and Flower's own"):
            shorten_sleeps(module, bad)


def test_another_flower_release_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    check_flower_version()
    monkeypatch.setattr(flower_internals, "FLOWER_VERSION", "0.0.1")
    with pytest.raises(FlowerVersionError, match="needs flwr 0.0.1"):
        check_flower_version()


@pytest.fixture()
def supernode(tmp_path: Path):
    """A real SuperNode under process isolation (its SuperLink unreachable: no task ever arrives)."""
    secret = tmp_path / "executor.secret"
    secret.write_bytes(os.urandom(32))
    port = free_port()
    node = ManagedProcess(
        [sys.executable, "-m", "fedtune.runtime.supernode", "--superlink", f"127.0.0.1:{free_port()}", "--insecure",
         "--isolation", "process", "--superexec-auth-secret-file", str(secret), "--host", "127.0.0.1",
         "--port", str(port)], flower_env(tmp_path / "flwr"), tmp_path / "supernode.log")
    node.start()
    try:
        deadline = time.monotonic() + 600  # a safety net: the wait is for the port
        while not port_in_use("127.0.0.1", port):
            assert node.exited() is None and time.monotonic() < deadline, (tmp_path / "supernode.log").read_text()
            time.sleep(0.2)
        yield f"127.0.0.1:{port}", secret.read_bytes()
    finally:
        node.stop()


@pytest.mark.process
def test_only_the_holder_of_the_sites_secret_can_claim_its_tasks(supernode) -> None:
    address, secret = supernode
    assert claim_task(task_claimer(address, secret)) is None  # authorised; nothing to run yet
    for intruder in (task_claimer(address, os.urandom(32), retry=False), runtime_client(address, retry=False)):
        with pytest.raises(httpx.HTTPStatusError) as refused:
            claim_task(intruder)
        assert refused.value.response.status_code in (401, 403)


@pytest.mark.process
def test_a_refused_heartbeat_never_stops_the_executor(supernode) -> None:
    """A beat still in flight when its task's output is pushed carries a revoked token (a compose trial lost a
    site mid-round to this): Flower's own beat raised in its thread, after which stopping it raised and the
    executor exited; with retries on, a 401 sends SIGINT to the process. The executor's beat answers False."""
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor

    address, _ = supernode
    beats = runtime_client(address, RuntimeTokenHttpInterceptor("ab" * 128), retry=False)  # no such task
    with pytest.raises(httpx.HTTPStatusError) as refused:
        make_task_heartbeat_fn_http(beats)()
    assert refused.value.response.status_code == 401
    answers: list[bool] = []
    beat = task_heartbeat(beats)
    heartbeat = HeartbeatSender(lambda: answers.append(beat()) or answers[-1])
    heartbeat.start()
    deadline = time.monotonic() + 600  # a safety net: the wait is for a refused beat and its retry
    while len(answers) < 2:
        assert heartbeat.is_running and time.monotonic() < deadline, answers
        time.sleep(0.05)
    assert answers[:2] == [False, False] and heartbeat.is_running
    heartbeat.stop()  # the executor's next step: stopping a sender whose beats were refused does not raise
    beats.close()


def test_a_task_left_pending_for_an_ignored_message_is_finished() -> None:
    """Flower's SuperNode makes a task for a message, then ignores the message if its run is no longer
    running (RunNotRunningException) and leaves the task pending: an executor would wait on it forever."""
    from flwr.common.constant import Status, SubStatus
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from fedtune.runtime.supernode import finish_orphaned_tasks

    state = InMemoryNodeState(ObjectStoreFactory().store())
    kept = state.create_task(task_type="flwr-clientapp", run_id=1, fab_hash="f")

    def ignores_a_message(**kwargs):  # Flower's behaviour for a run that is not running
        kwargs["state"].create_task(task_type="flwr-clientapp", run_id=2, fab_hash="f")
        return None

    def stores_a_message(**kwargs):
        return kwargs["state"].create_task(task_type="flwr-clientapp", run_id=3, fab_hash="f") and 3

    module = types.ModuleType("probe")
    module._pull_and_store_message = ignores_a_message  # type: ignore[attr-defined]
    finish_orphaned_tasks(module)
    assert module._pull_and_store_message(state=state) is None  # type: ignore[attr-defined]
    pending = state.get_tasks(statuses=[Status.PENDING])
    assert [task.task_id for task in pending] == [kept]  # only the orphan was finished, as failed
    finished = state.get_tasks(statuses=[Status.FINISHED])
    assert len(finished) == 1 and finished[0].status.sub_status == SubStatus.FAILED
    module._pull_and_store_message = stores_a_message  # type: ignore[attr-defined]
    finish_orphaned_tasks(module)
    assert module._pull_and_store_message(state=state) == 3  # type: ignore[attr-defined]
    assert len(state.get_tasks(statuses=[Status.PENDING])) == 2  # a stored message's task is left alone


def test_an_existing_world_readable_secret_and_state_dir_are_made_owner_only(tmp_path: Path, caplog) -> None:
    """A state dir made 0755 and an executor secret left 0644 (by hand, an old version, a restored backup) are
    forced to 0700 / 0600 when the daemon sets up, and the fix is logged."""
    import json
    import stat

    from client.policy import SitePolicy
    from fedtune.runtime.daemon import site_processes

    kit, state = tmp_path / "kit", tmp_path / "state"
    kit.mkdir()
    (kit / "site.json").write_text(json.dumps({"site": "site-a"}))
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    (state / "executor.secret").write_bytes(b"old")
    os.chmod(state / "executor.secret", 0o644)
    files = {"ca.crt": kit / "ca.crt", "supernode.key": tmp_path / "keys" / "supernode.key"}
    site_processes(files, kit, tmp_path / "keys", tmp_path / "d.csv", state, superlink="127.0.0.1:1",
                   policy=SitePolicy(labels=("a", "b")))
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "executor.secret").stat().st_mode) == 0o600
    assert (state / "executor.secret").read_bytes() != b"old"
    assert stat.S_IMODE((tmp_path / "state.receipts").stat().st_mode) == 0o700  # beside the state, not in it
    fixed = [r.getMessage() for r in caplog.records if "readable by others than its owner" in r.getMessage()]
    assert any("0755" in line and str(state) in line for line in fixed)
    assert any("0644" in line and "executor.secret" in line for line in fixed)
