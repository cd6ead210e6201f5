"""Experiment tracking of a run, outside Flower: ``--mlflow URI`` and ``--tensorboard DIR``.

The CLI process follows the ServerApp's metrics.jsonl line by line (``on_round``); a
:class:`RunTracker` hands each line to every backend asked for: the run's settings once, each
round's scalars at step = round, and at the end the run's outputs (final adapter with its signed
passport; MLflow only). Backends are opened, and so checked, before any process starts: a bad URI
or an unwritable directory stops the command with a clear error, never mid-run. MLflow and
TensorBoard are imported only when asked for, and their loggers are kept out of the terminal.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from common.config import BadInput
from common.run_files import MetricsLine

log = logging.getLogger("fedtune.tracking")
EXPERIMENT = "fedtune"
"""The MLflow experiment runs go to (MLflow's own MLFLOW_EXPERIMENT_NAME chooses another)."""
OPS_EXTRA = "pip install -e '.[ops]'"
PROBE_RETRIES, PROBE_TIMEOUT_S = "0", "10"
"""While the MLflow server is first asked: no retries with back-off (minutes), so a wrong URI fails at once."""


class TrackingError(BadInput):
    """A tracker cannot be opened: its package is absent, its URI or directory unusable."""


class Tracker(Protocol):
    """One place a run is recorded. A failing backend call raises; the run itself never depends on it."""

    def log_settings(self, settings: Mapping[str, Any]) -> None: ...

    def log_round(self, line: MetricsLine) -> None: ...

    def log_outputs(self, run_dir: Path) -> None: ...

    def close(self, succeeded: bool) -> None: ...


def round_scalars(line: MetricsLine) -> dict[str, float]:
    """Every number a metrics line holds, by name: nested sections joined with "/" (server/accuracy,
    secure_aggregation/exchange_seconds/train, epsilon/SITE), booleans as 0/1, lists of names as their
    length (secure_aggregation/survivors), failures counted in all and by kind (failures/KIND). The round
    itself is the step, and text (aggregation, checkpoint) is no scalar."""
    scalars: dict[str, float] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, bool):
            scalars[prefix] = float(value)
        elif isinstance(value, int | float):
            if math.isfinite(value):
                scalars[prefix] = float(value)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                walk(f"{prefix}/{key}" if prefix else str(key), item)
        elif isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
            scalars[prefix] = float(len(value))

    if line.round == 0:  # the initial adapter: its scores, no round was played
        walk("server", line.server)
        return {_metric_name(name): value for name, value in scalars.items()}
    fields = dataclasses.asdict(line)
    walk("", {key: value for key, value in fields.items() if key not in ("round", "failures")})
    kinds = Counter(failure.kind for failure in line.failures)
    scalars["failures/total"] = float(sum(kinds.values()))
    scalars |= {f"failures/{kind}": float(count) for kind, count in sorted(kinds.items())}
    return {_metric_name(name): value for name, value in scalars.items()}


def _metric_name(name: str) -> str:
    """What MLflow and TensorBoard both accept: letters, digits, _ - . / and space (a site's name may hold more)."""
    return re.sub(r"[^\w\-./ ]", "_", name)


def final_adapter(run_dir: Path) -> Path:
    return run_dir / "final" / "adapter"


class RunTracker:
    """Every backend asked for (none: nothing is recorded and nothing imported); used as a context manager,
    a run that raises is closed as failed. A backend that fails mid-run is reported and dropped: the run
    itself never depends on its tracking."""

    def __init__(self, trackers: list[Tracker]) -> None:
        self.trackers = trackers

    def __enter__(self) -> RunTracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.close(succeeded=kind is None)

    def _each(self, action: Callable[[Tracker], None], what: str) -> None:
        for tracker in list(self.trackers):
            try:
                action(tracker)
            except Exception as exc:  # MLflow's many kinds (server gone, disk full): the run goes on without it
                log.warning("%s could not record %s (%s: %s); the run goes on without it", type(tracker).__name__,
                            what, type(exc).__name__, _first_line(exc))
                self.trackers.remove(tracker)

    def log_settings(self, settings: Mapping[str, Any]) -> None:
        self._each(lambda tracker: tracker.log_settings(settings), "the settings")

    def log_round(self, line: MetricsLine) -> None:
        self._each(lambda tracker: tracker.log_round(line), f"round {line.round}")

    def log_outputs(self, run_dir: Path) -> None:
        self._each(lambda tracker: tracker.log_outputs(run_dir), "the final adapter")

    def close(self, succeeded: bool) -> None:
        self._each(lambda tracker: tracker.close(succeeded), "the run's end")


def open_trackers(*, mlflow_uri: str | None, tensorboard_dir: Path | None, run_name: str,
                  openers: Sequence[Callable[[], Tracker]] = ()) -> RunTracker:
    """The backends asked for, opened now (before the run starts): ``openers`` first (a metrics endpoint binds
    its port), MLflow last (it creates a run). TrackingError (or the opener's BadInput) says what is wrong,
    and whatever was already opened is closed again."""
    chosen = list(openers)
    if tensorboard_dir:
        chosen.append(lambda: TensorBoardTracker(tensorboard_dir / run_name))
    if mlflow_uri:
        chosen.append(lambda: MlflowTracker(mlflow_uri, run_name))
    opened: list[Tracker] = []
    try:
        for open_one in chosen:
            opened.append(open_one())
    except BaseException:
        RunTracker(opened).close(succeeded=False)
        raise
    return RunTracker(opened)


@contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """The libraries' warnings stay out of the user's terminal (their loggers are quietened once, for good)."""
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextmanager
def _probing() -> Iterator[None]:
    """MLflow's HTTP client without its retries (up to minutes of back-off) while the server is first asked."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": PROBE_RETRIES, "MLFLOW_HTTP_REQUEST_TIMEOUT": PROBE_TIMEOUT_S}
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({name: value for name, value in names.items() if saved[name] is None})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)


MLFLOW_LOGGERS = ("mlflow", "alembic", "sqlalchemy", "urllib3")


class MlflowTracker:
    """One MLflow run in experiment ``fedtune`` (created on first use; with a ``sqlite:///`` store its
    artifacts go to ``mlartifacts/`` beside the database, not into the working directory)."""

    def __init__(self, uri: str, run_name: str) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                from mlflow import MlflowClient  # sets its loggers' levels: quietened after it, below
            except ImportError as exc:
                raise TrackingError(f"--mlflow needs MLflow: {OPS_EXTRA}") from exc
        with _quiet(*MLFLOW_LOGGERS):
            with _probing():
                try:
                    self.client = MlflowClient(tracking_uri=uri)
                    experiment_id = self._experiment(uri, os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
                    self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
                except Exception as exc:  # MLflow raises many kinds (bad scheme, no server, no database)
                    raise TrackingError(
                        f"--mlflow {uri}: cannot open a run there ({type(exc).__name__}: {_first_line(exc)}). Give a "
                        "running tracking server (http://HOST:PORT) or a local store (sqlite:///PATH/mlflow.db)"
                    ) from exc

    def _experiment(self, uri: str, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
        return str(self.client.create_experiment(name, artifact_location=location))

    def log_settings(self, settings: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(str(key), str(value)) for key, value in sorted(settings.items())]
        with _quiet(*MLFLOW_LOGGERS):
            for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log_round(self, line: MetricsLine) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, line.round) for name, value in round_scalars(line).items()]
        with _quiet(*MLFLOW_LOGGERS):
            for start in range(0, len(metrics), 1000):
                self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def log_outputs(self, run_dir: Path) -> None:
        """The final adapter (with its signed passport inside) under ``adapter/``, the passport also at the top,
        and the run's records (run.json, metrics.jsonl, privacy.json, audit.jsonl) under ``run/``."""
        adapter = final_adapter(run_dir)
        with _quiet(*MLFLOW_LOGGERS):
            if adapter.is_dir():
                self.client.log_artifacts(self.run_id, str(adapter), "adapter")
            if (adapter / "passport.json").is_file():
                self.client.log_artifact(self.run_id, str(adapter / "passport.json"))
            for name in ("run.json", "metrics.jsonl", "privacy.json", "audit.jsonl"):
                if (run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(run_dir / name), "run")

    def close(self, succeeded: bool) -> None:
        with _quiet(*MLFLOW_LOGGERS):
            self.client.set_terminated(self.run_id, "FINISHED" if succeeded else "FAILED")


TENSORBOARD_LOGGERS = ("tensorboard", "absl")


class TensorBoardTracker:
    """Event files in ``directory`` (one directory per run), the same scalars as MLflow at step = round; the
    settings as one text summary. TensorBoard's own writer (no TensorFlow, no torch)."""

    def __init__(self, directory: Path) -> None:
        with _quiet(*TENSORBOARD_LOGGERS):
            try:
                from tensorboard.summary.writer.event_file_writer import EventFileWriter
            except ImportError as exc:
                raise TrackingError(f"--tensorboard needs TensorBoard: {OPS_EXTRA}") from exc
            try:
                directory.mkdir(parents=True, exist_ok=True)
                self.writer = EventFileWriter(str(directory))
            except OSError as exc:
                raise TrackingError(f"--tensorboard {directory.parent}: cannot write there ({exc})") from exc

    def _write(self, step: int, values: list[Any]) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary

        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        self.writer.flush()

    def log_settings(self, settings: Mapping[str, Any]) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        table = "\n".join(f"| {key} | {value} |" for key, value in sorted(settings.items()))
        self._write(0, list(text_pb("settings", f"| setting | value |\n|---|---|\n{table}").value))

    def log_round(self, line: MetricsLine) -> None:
        from tensorboard.compat.proto.summary_pb2 import Summary

        self._write(line.round, [Summary.Value(tag=name, simple_value=value)
                                         for name, value in round_scalars(line).items()])

    def log_outputs(self, run_dir: Path) -> None:
        """Event files hold scalars; the final adapter and passport are MLflow's (or the run directory's)."""

    def close(self, succeeded: bool) -> None:
        self.writer.close()


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]
