"""The site's task executor: one long-lived process that runs every Flower task with the site's own ClientApp.

Flower's own executor starts a fresh ``flwr-clientapp`` process per message, which installs the
coordinator's FAB and imports its code: seconds of imports per message and, worse, code written by
the coordinator running next to the site's records. This executor replaces it (the SuperNode runs
with ``--isolation process``): it loops on the SuperNode's Runtime API, claims each ClientApp task
with the shared secret, and runs it in this process with ``client.app`` as installed at the site.
torch, the tokenizer and the site's encoded data stay loaded between messages. The FAB is never
installed nor imported; the run config it carries is checked by the ClientApp like any other.

It relies on Flower internals (the Runtime API's task calls, ``run_clientapp``'s pull/push helpers),
so it runs only on the Flower version it was written for (common.flower_internals) and refuses any other.

With ``--state-dir`` it keeps what it did in the site's state (tasks, refusals by kind, the last
contact: fedtune.runtime.monitoring.SiteActivity), which the site's own metrics endpoint reports.

    python -m fedtune.runtime.executor --runtime-api-address 127.0.0.1:PORT --secret-file FILE [--state-dir STATE]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common import __version__
from common.flower_internals import FlowerVersionError, short_object_pull_backoff
from common.library_noise import start_process_log
from fedtune.runtime.monitoring import SiteActivity

if TYPE_CHECKING:
    from flwr.supercore.runtime import RuntimeHttpClient

log = logging.getLogger("fedtune.executor")


@dataclass(frozen=True)
class TaskOutcome:
    message_type: str
    ok: bool
    seconds: dict[str, float]  # pull (the task's input), run (the ClientApp), push (its reply and status)
    refusal: str | None = None
    """The failure kind the site answered with (budget-exhausted, site-policy, ...; "unreadable" for a task it
    could not read), None for an answer."""


def runtime_client(address: str, *interceptors: object, retry: bool = True) -> RuntimeHttpClient:
    """A client of the SuperNode's Runtime API (loopback HTTP; the API binds 127.0.0.1).

    Flower's retry policy answers a 401 by sending SIGINT to its own process: ``retry=False`` raises instead.
    """
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"), *interceptors],
        retry_invoker=make_simple_http_retry_invoker() if retry else None)


def claim_task(tasks: RuntimeHttpClient) -> str | None:
    """Claim the next ClientApp task: its token, or None when there is none."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType

    claimed = tasks.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP],
                                                   agentapp_fab_hashes=[]))
    return claimed.token if claimed.HasField("task") and claimed.token else None


def task_claimer(address: str, secret: bytes, retry: bool = True) -> RuntimeHttpClient:
    """The Runtime API client that claims tasks, signing each claim with the secret shared with the SuperNode."""
    from flwr.supercore.interceptors import SuperExecAuthHttpInterceptor

    return runtime_client(address, SuperExecAuthHttpInterceptor(
        master_secret=secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}), retry=retry)


def task_heartbeat(beats: RuntimeHttpClient) -> Callable[[], bool]:
    """Flower's task heartbeat for a process that outlives its tasks (``beats``: a client with ``retry=False``).

    Flower's own beat is made for a process per task: a refused beat (the task's token already revoked, as it is
    the moment the task's output is pushed, or a restarted SuperNode) raises in the heartbeat thread or sends
    SIGINT to the process, which here would stop the site's executor, mid-round. This beat answers False instead,
    which HeartbeatSender retries with backoff until the task ends."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            return bool(beats.SendTaskHeartbeat(request).success)
        except httpx.HTTPError:
            return False

    return beat


class SiteExecutor:
    """Claims ClientApp tasks from one SuperNode and runs them, one at a time, in this process."""

    POLL_S = (0.02, 0.25)
    """Look for the next task 20 ms after the last one (a lock-step round's next stage comes within a second),
    backing off to 0.25 s while the site is idle."""

    def __init__(self, runtime_api_address: str, secret: bytes, state_dir: Path | None = None) -> None:
        short_object_pull_backoff()  # checks the Flower version first
        import client.app  # the site's installed ClientApp, imported once (torch, transformers, peft with it)

        self.app = client.app.app
        self.address = runtime_api_address
        self.tasks = task_claimer(runtime_api_address, secret)
        self.state_dir = state_dir
        self.activity = SiteActivity.read(state_dir) if state_dir else None

    def serve(self) -> None:
        """Run tasks until the process is stopped."""
        fastest, slowest = self.POLL_S
        poll = fastest
        while True:
            token = claim_task(self.tasks)
            if token is None:
                time.sleep(poll)
                poll = min(slowest, poll * 1.5)
            else:
                outcome = self.run_task(token)
                if self.state_dir is not None and self.activity is not None:
                    self.activity = self.activity.record(self.state_dir, outcome.refusal)
                poll = fastest

    def run_task(self, token: str) -> TaskOutcome:
        """What ``flwr-clientapp`` does for one task, minus installing and importing the FAB."""
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.heartbeat import HeartbeatSender
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        from common.records import unpack_failure

        clock = [time.monotonic()]
        seconds: dict[str, float] = {}

        def lap(phase: str) -> None:
            clock.append(time.monotonic())
            seconds[phase] = round(clock[-1] - clock[-2], 3)

        task = runtime_client(self.address, RuntimeTokenHttpInterceptor(token))
        beats = runtime_client(self.address, RuntimeTokenHttpInterceptor(token), retry=False)
        heartbeat = HeartbeatSender(task_heartbeat(beats))
        heartbeat.start()
        message_type, context, status, details = "?", None, SubStatus.FAILED, "the task could not be read"
        refusal: str | None = "unreadable"
        try:
            message, context, run, _fab = pull_task_input(task)  # the FAB is not installed: its code never runs
            message_type = message.metadata.message_type
            if run.fab_version != __version__:
                log.warning("the coordinator's app is fedtune %s, this site runs %s: the site's own code answers",
                            run.fab_version, __version__)
            lap("pull")
            try:
                reply = self.app(message=message, context=context)
                status, details = SubStatus.COMPLETED, ""
            except Exception as exc:  # the ClientApp answers its own failures: reaching here is a bug
                log.exception("the ClientApp raised on %s", message_type)
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="the site's ClientApp "
                                      "failed (see the site's executor log)"), reply_to=message)
                details = f"{type(exc).__name__}"
            lap("run")
            failure = None if reply.has_error() else unpack_failure(reply.content)
            refusal = "internal" if reply.has_error() else failure.kind if failure else None
            push_message(task, reply, context)
        except Exception:  # one broken task must not stop the site
            log.exception("task %s could not be completed", message_type)
        finally:
            heartbeat.stop()  # before the output: pushing it revokes the token the beats carry
            beats.close()
            push_task_output(task, context, status, details)
            task.close()
            lap("push")
        outcome = TaskOutcome(message_type, status == SubStatus.COMPLETED, seconds, refusal)
        log.info("task %s %s in %.2fs %s", message_type, "done" if outcome.ok else "FAILED",
                 clock[-1] - clock[0], json.dumps(seconds))
        return outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedtune.runtime.executor", description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API (host:port)")
    parser.add_argument("--secret-file", type=Path, required=True,
                        help="the secret shared with the SuperNode (--superexec-auth-secret-file)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="the site's state dir: keep the site's activity there for its metrics endpoint")
    args = parser.parse_args(argv)
    start_process_log()
    try:
        executor = SiteExecutor(args.runtime_api_address, args.secret_file.read_bytes(), args.state_dir)
    except (FlowerVersionError, OSError) as exc:
        print(f"fedtune site executor: {exc}", file=sys.stderr)
        return 2
    log.info("ready: running ClientApp tasks from %s in this process", args.runtime_api_address)
    try:
        executor.serve()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
