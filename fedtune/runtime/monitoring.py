"""Prometheus metrics and health endpoints of the coordinator and of each site daemon (``--metrics-port``).

One small HTTP server per process, bound to 127.0.0.1 unless ``--metrics-host`` says otherwise:
``/metrics`` (Prometheus text format), ``/healthz`` (200 while the process lives) and ``/readyz``
(200 once it serves: the coordinator's SuperLink answers its health check; the site's SuperNode and
executor run). It is bound before any process starts, so a port in use is refused at once.

The coordinator's metrics come from the metrics.jsonl lines the CLI follows (a :class:`Tracker`
like MLflow's). A site's come from its own disk, read at each scrape: its privacy ledger (ε spent
and left, rounds trained; the ledger is verified against the site's audit log as the ClientApp
does, and a broken one shows as ``fedtune_site_ledger_valid 0``) and the activity file its
executor keeps (tasks, refusals by kind, last contact). Nothing of it reaches the coordinator.
prometheus_client is imported only when asked for.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from common.config import BadInput
from common.files import write_json
from common.run_files import MetricsLine
from fedtune.runtime.tracking import OPS_EXTRA, round_scalars

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from client.policy import SitePolicy

ACTIVITY_FILE = "site-activity.json"
"""In the site's state dir: what its executor did (tasks, refusals by kind, last task), for the site's exporter."""
ROUND_BUCKETS_S = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
EXCHANGE_BUCKETS_S = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class MonitoringError(BadInput):
    """The metrics endpoint cannot be served as asked (port in use, package absent)."""


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:
        raise MonitoringError(f"--metrics-port needs prometheus-client: {OPS_EXTRA}") from exc
    return prometheus_client


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would fill the terminal."""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` of one process, served from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], bool], *, host: str, port: int) -> None:
        metrics_app = _prometheus().make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            path = environ.get("PATH_INFO", "")
            if path in ("/healthz", "/readyz"):
                ok = path == "/healthz" or _safely(ready)
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
                return [b"ok\n" if ok else b"not ready\n"]
            return metrics_app(environ, start_response)

        try:
            self.server = make_server(host, port, app, _ThreadingServer, handler_class=_QuietHandler)
        except (OSError, OverflowError) as exc:  # in use, no such address; a port beyond 65535
            why = getattr(exc, "strerror", None) or exc
            raise MonitoringError(f"--metrics-port {port} on {host}: cannot listen there ({why}); stop what holds it "
                                  "or choose another --metrics-port (and --metrics-host)") from exc
        self.address = f"{host}:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="fedtune-metrics", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def _safely(ready: Callable[[], bool]) -> bool:
    try:
        return bool(ready())
    except Exception:  # a probe that fails means not ready, never a crashed endpoint
        return False


def wait_ready(host: str, port: int, timeout: float) -> bool:
    """Whether ``http://HOST:PORT/readyz`` answers 200 within ``timeout`` seconds (``fedtune wait-ready``: the
    health check of a service manager, e.g. systemd's ExecStartPost)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=5) as answer:
                if answer.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or 503: not ready yet
        if time.monotonic() > deadline:
            return False
        time.sleep(1.0)


def superlink_ready(url: str, verify: str | bool) -> Callable[[], bool]:
    """Whether the SuperLink answers its health check (as ``server start`` waits for it)."""
    def ready() -> bool:
        import httpx

        try:
            return httpx.get(url, timeout=2.0, verify=verify).is_success
        except httpx.HTTPError:
            return False
    return ready


class CoordinatorMetrics:
    """The coordinator's Prometheus metrics, fed by each metrics.jsonl line (a Tracker), served until closed."""

    def __init__(self, *, host: str, port: int, ready: Callable[[], bool]) -> None:
        prom = _prometheus()
        self.registry = registry = prom.CollectorRegistry()
        prefix = "fedtune_coordinator"
        self.rounds = prom.Counter(f"{prefix}_rounds", "rounds completed (checkpointed or not) since start",
                                   registry=registry)
        self.last_round = prom.Gauge(f"{prefix}_last_round", "the number of the last completed round",
                                     registry=registry)
        self.last_round_time = prom.Gauge(f"{prefix}_last_round_timestamp_seconds",
                                          "when the last round completed (Unix time)", registry=registry)
        self.round_seconds = prom.Histogram(f"{prefix}_round_seconds", "wall time of each round",
                                            buckets=ROUND_BUCKETS_S, registry=registry)
        self.exchange_seconds = prom.Histogram(f"{prefix}_exchange_seconds",
                                               "wall time of each exchange of a secure round (identify, train, "
                                               "share, mask, confirm, unmask)", ["exchange"],
                                               buckets=EXCHANGE_BUCKETS_S, registry=registry)
        self.failures = prom.Counter(f"{prefix}_site_failures", "sites that did not contribute to a round, by "
                                     "kind (timeout, error, budget-exhausted, site-policy, ...)", ["kind"],
                                     registry=registry)
        self.contributors = prom.Gauge(f"{prefix}_sites_contributing", "sites whose update is in the last round",
                                       registry=registry)
        self.model_updated = prom.Gauge(f"{prefix}_last_round_model_updated",
                                        "1 if the last round changed the model (enough sites contributed)",
                                        registry=registry)
        self.test_score = prom.Gauge(f"{prefix}_test_score", "the global model on the coordinator's test split",
                                     ["metric"], registry=registry)
        self.epsilon = prom.Gauge(f"{prefix}_site_epsilon", "ε each site reported having spent", ["site"],
                                  registry=registry)
        self.server = MetricsServer(registry, ready, host=host, port=port)

    def log_settings(self, settings: Mapping[str, Any]) -> None:
        """Settings are no time series (they are in MLflow and the run's run.json)."""

    def log_round(self, line: MetricsLine) -> None:
        scalars = round_scalars(line)
        for name, value in scalars.items():
            section, _, key = name.partition("/")
            if section == "server":
                self.test_score.labels(key).set(value)
            elif section == "epsilon":
                self.epsilon.labels(key).set(value)
            elif section == "failures" and key != "total":
                self.failures.labels(key).inc(value)
            elif name.startswith("secure_aggregation/exchange_seconds/"):
                self.exchange_seconds.labels(name.rsplit("/", 1)[1]).observe(value)
        if line.round == 0:  # the initial model's evaluation, no round
            return
        self.rounds.inc()
        self.last_round.set(line.round)
        self.last_round_time.set_to_current_time()
        self.contributors.set(scalars.get("contributors", 0.0))
        self.model_updated.set(scalars.get("model_updated", 0.0))
        if "duration_s" in scalars:
            self.round_seconds.observe(scalars["duration_s"])

    def log_outputs(self, run_dir: Path) -> None:
        """Artifacts are MLflow's."""

    def close(self, succeeded: bool) -> None:
        self.server.stop()


@dataclass(frozen=True)
class SiteActivity:
    """What the site's executor did, kept in ``STATE/site-activity.json`` (read and written only here)."""

    tasks: int = 0
    refusals: dict[str, int] = field(default_factory=dict)
    """Tasks the site answered with a refusal or failure, by kind (budget-exhausted, site-policy, ...)."""
    last_task: float | None = None
    """When the last message from the coordinator was answered (Unix time): the last contact."""

    @classmethod
    def read(cls, state_dir: Path) -> SiteActivity:
        path = state_dir / ACTIVITY_FILE
        if not path.is_file():
            return cls()
        saved = json.loads(path.read_text())
        return cls(int(saved["tasks"]), {str(k): int(v) for k, v in saved["refusals"].items()}, saved["last_task"])

    def record(self, state_dir: Path, refusal: str | None) -> SiteActivity:
        """This activity with one more task (refused with ``refusal``, or answered), written durably."""
        refusals = self.refusals | ({refusal: self.refusals.get(refusal, 0) + 1} if refusal else {})
        updated = SiteActivity(self.tasks + 1, refusals, time.time())
        write_json(state_dir / ACTIVITY_FILE, asdict(updated))
        return updated


@dataclass(frozen=True)
class LedgerView:
    """The site's privacy ledger as its exporter reports it."""

    valid: bool
    spent: float
    budget: float
    rounds: int


def read_ledger(state_dir: Path, policy: SitePolicy) -> LedgerView:
    """ε spent, the budget it is bound to (the site's ceiling ``policy.max_epsilon`` until a run binds one) and
    rounds trained, from the site's own ledger opened and verified as the ClientApp opens it."""
    from client.privacy import LEDGER_FILE, LedgerError, PrivacyLedger
    from common.config import PrivacySettings

    path = state_dir / LEDGER_FILE
    if not path.exists():
        return LedgerView(True, 0.0, policy.max_epsilon, 0)
    try:
        saved = json.loads(path.read_text())
        bound = saved.get("budget") or {"epsilon": policy.max_epsilon, "delta": PrivacySettings.delta}
        ledger = PrivacyLedger(path, PrivacySettings(epsilon=bound["epsilon"], delta=bound["delta"],
                                                     accountant=saved["accountant"]))
        return LedgerView(True, ledger.spent(), ledger.settings.epsilon, len(ledger.rounds))
    except (LedgerError, OSError, ValueError, KeyError, TypeError):
        return LedgerView(False, float("nan"), policy.max_epsilon, 0)


class SiteCollector:
    """A site's metrics, read from its state dir at each scrape."""

    def __init__(self, state_dir: Path, policy: SitePolicy, serving: Callable[[], bool]) -> None:
        self.state_dir, self.policy, self.serving = state_dir, policy, serving

    def describe(self) -> list[Metric]:
        return []  # read at scrape time only: the ledger is not opened at registration

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ledger = read_ledger(self.state_dir, self.policy)
        activity = SiteActivity.read(self.state_dir)
        yield GaugeMetricFamily("fedtune_site_ledger_valid", "1 if the site's privacy ledger verifies against its "
                                "audit log (0: restore both from backup; the site refuses to train)",
                                value=float(ledger.valid))
        yield GaugeMetricFamily("fedtune_site_epsilon_spent", "ε this site has spent, all runs together",
                                value=ledger.spent)
        yield GaugeMetricFamily("fedtune_site_epsilon_budget", "the ε budget the ledger is bound to",
                                value=ledger.budget)
        yield GaugeMetricFamily("fedtune_site_epsilon_left", "ε this site may still spend",
                                value=max(0.0, ledger.budget - ledger.spent))
        yield CounterMetricFamily("fedtune_site_rounds_trained", "rounds this site trained (charged to its ledger)",
                                  value=ledger.rounds)
        yield CounterMetricFamily("fedtune_site_tasks", "messages from the coordinator this site answered",
                                  value=activity.tasks)
        refusals = CounterMetricFamily("fedtune_site_refusals", "messages this site refused or failed, by kind",
                                       labels=["kind"])
        for kind, count in sorted(activity.refusals.items()):
            refusals.add_metric([kind], count)
        yield refusals
        if activity.last_task is not None:
            yield GaugeMetricFamily("fedtune_site_last_contact_timestamp_seconds", "when the site last answered a "
                                    "message from the coordinator (Unix time)", value=activity.last_task)
        yield GaugeMetricFamily("fedtune_site_serving", "1 while the SuperNode and the site's executor run",
                                value=float(self.serving()))


class SiteMetrics:
    """The site daemon's exporter; the daemon says when it serves (:meth:`set_serving`)."""

    def __init__(self, state_dir: Path, policy: SitePolicy, *, host: str, port: int) -> None:
        prom = _prometheus()
        self._serving, self._primed = False, False
        self.state_dir, self.policy = state_dir, policy
        self.registry = prom.CollectorRegistry()
        self.registry.register(SiteCollector(state_dir, policy, lambda: self._serving))
        self.server = MetricsServer(self.registry, lambda: self._serving, host=host, port=port)

    def set_serving(self, serving: bool) -> None:
        if serving and not self._primed:  # the ledger's accountant loads now, not in the first scrape after /readyz
            read_ledger(self.state_dir, self.policy)  # (torch and opacus: seconds, more than a scrape may take)
            self._primed = True
        self._serving = serving

    def close(self) -> None:
        self.server.stop()
