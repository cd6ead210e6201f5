"""The files a run writes, as typed records, written and read here only.

Under the run's out-dir (the coordinator's ``--state``/run, or a simulation's ``--out``)::

    run.json                         RunInfo: what the run is (task, labels, aggregation, DP, budget, floor)
    metrics.jsonl                    MetricsLine: one line per round (round 0 = the initial adapter)
    privacy.json                     PrivacyFile: each site's latest PrivacyReport
    baselines.json                   BaselinePoint curves of `fedtune simulate --baselines`
    checkpoints/round-NNNN/round.json  RoundInfo: the checkpoint's checksums, lineage and metrics line

The JSON keys are the fields' names. Readers skip keys they do not know (a file from a newer version)
and give fields an older version did not write their defaults; a damaged file raises
:class:`RunFileError` naming the file, the line and the field. Light: no torch, no Flower.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from common.files import write_json
from common.privacy_audit import AUDIT_FIELDS
from common.typed import BadInput, ConfigError, from_mapping, snake

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
PRIVACY_FILE = "privacy.json"
BASELINES_FILE = "baselines.json"
ROUND_FILE = "round.json"
DAMAGED = "the run directory is damaged: resume from an earlier checkpoint or start a new --out/--state"
R = TypeVar("R")


class RunFileError(BadInput):
    """A file a run wrote is missing, unreadable or lacks a field: the run directory is damaged."""


@dataclass(frozen=True)
class PrivacyReport:
    """What a site says about its privacy, in the clear: ε spent and δ, and the budget they count against.

    Nothing else: the noise multiplier, the sampling rate and the step count would pin the site's
    number of records, which is not released.
    """

    site: str
    dp: bool
    epsilon: float | None = None
    """ε spent in total so far (rounded up), under add/remove-one neighbouring of the privacy unit."""
    delta: float | None = None
    budget: float | None = None
    accountant: str | None = None
    unit: str | None = None
    """Whom ε protects: "record", or the column naming a person ("patient_id")."""
    resent: bool = False
    """This reply resends an update the site released earlier for the same round and adapter: no new ε was
    spent, so ε may stay flat (after a round the site trained, it must rise: server/ledger_watch.py)."""
    audited_epsilon: float | None = None
    """The site's privacy audit of this run so far (client/canaries.py): a lower bound on its ε at 95 %, from
    gradient canaries only it knows; None without an audit. Canaries are synthetic: this and the counts below
    say nothing about records."""
    audit_canaries: int | None = None
    audit_guesses: int | None = None
    audit_correct: int | None = None
    own_noise_epsilon: float | None = None
    """Distributed DP (privacy.dp-mode = distributed): ε of the site's own noise share alone, what is left if secure
    aggregation or its assumption of honest sites fails (``epsilon`` is against the coordinator, given both); None
    when the site took no distributed step (its ε is then all its own noise)."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def released_audit(self) -> dict[str, Any] | None:
        """The site's privacy audit as it released it (``AuditResult.report``), or None without one."""
        return {key: getattr(self, key) for key in AUDIT_FIELDS} if self.audited_epsilon is not None else None


@dataclass(frozen=True)
class Failure:
    """A site that did not contribute to a round, and why: one entry of a metrics line's ``failures``."""

    site: str
    kind: str
    detail: str
    stage: str = ""
    """The exchange it failed at, when that is not the training exchange."""

    def as_dict(self) -> dict[str, str]:
        return {key: value for key, value in dataclasses.asdict(self).items() if value or key != "stage"}


@dataclass(frozen=True)
class SecureRoundDetails:
    """What a secure round publishes about itself (a metrics line's ``secure_aggregation``)."""

    survivors: list[str]
    dropped: list[str]
    total_weight: int
    clamped_elements: int
    mean_clipped: bool
    """The mean's L2 norm was beyond what honest inputs reach (a hostile input) and was scaled down to it."""
    error_bound: float
    """Largest error the fixed-point sum can add to any value of the mean update."""
    modulus_bits: int
    value_bits: int
    neighbours: int
    threshold: int
    all_pairs: bool
    upload_bytes: int
    exchange_seconds: dict[str, float]
    """Wall time of each exchange (identify, train, share, mask, confirm, unmask) as the coordinator waited."""


@dataclass(frozen=True)
class FederatedScores:
    """The sites' evaluation of one model, from the noisy sum of their releases (common.federated_eval): a metrics
    line's ``federated_evaluation``. Scores are None where the noisy counts leave nothing to divide by."""

    model_round: int
    """The round whose model the sites scored (the one they received: the previous round's)."""
    sites: int
    """Sites whose release is in the sum."""
    examples: float
    """The noisy estimate of the examples scored, over those sites."""
    scores: dict[str, float | None]
    """Classification: accuracy, macro_f1; causal-lm: loss, exact_match, rouge_l, answer_tokens."""
    intervals: dict[str, list[float]] = field(default_factory=dict)
    """95 % interval [low, high] of each score, from the noise's known variance."""
    noise_sigma: float = 0.0
    """σ of each site's discrete Gaussian noise on each count."""
    epsilon: float = 0.0
    """ε (at the run's δ) of all the run's planned evaluations together, per unit of a site's evaluation split."""
    own_noise_epsilon: float | None = None
    """Distributed DP (each site adds a share of the noise): that ε from one site's own noise share alone, what is
    left if secure aggregation or the honesty assumption fails; None when each site adds all of the noise."""


def checkpoint_name(server_round: int) -> str:
    """The checkpoint directory of a round's model: round-NNNN."""
    return f"round-{server_round:04d}"


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint (a staging ``.tmp`` directory from a crash is ignored)."""
    rounds = (out_dir / "checkpoints").glob("round-[0-9][0-9][0-9][0-9]")
    done = sorted(p for p in rounds if (p / ROUND_FILE).exists())
    return done[-1] if done else None


@dataclass(frozen=True)
class MetricsLine:
    """One round in metrics.jsonl. Round 0 (the initial adapter) sets only ``round`` and ``server``."""

    round: int
    server: dict[str, Any]
    """The server's scores on its own test split: the task's metrics (common.config.TASK_METRICS), loss,
    examples (and a causal LM's perplexity and sample answers); {} when the coordinator holds no test data."""
    aggregation: str = ""
    contributors: int = 0
    failures: tuple[Failure, ...] = ()
    model_updated: bool = False
    secure_aggregation: SecureRoundDetails | None = None
    dp: bool | None = None
    privacy_unit: str = ""
    """Whom ε is per, as reports name it ("record", "patient_id")."""
    epsilon: dict[str, float | None] = field(default_factory=dict)
    """Each site's ε spent so far (None: a site that has not reported one)."""
    duration_s: float = 0.0
    checkpoint: str = ""
    """The checkpoint directory holding the model after this round (round-NNNN)."""
    federated_evaluation: FederatedScores | None = None
    """The sites' private evaluation of the model they received this round (round − 1's), if they evaluated."""

    def checkpointed(self) -> bool:
        """This round's model has a checkpoint of its own (with checkpoint-every K, every K-th round and the last)."""
        return self.checkpoint == checkpoint_name(self.round)

    def spent(self) -> list[float]:
        """The ε the sites have reported so far."""
        return [eps for eps in self.epsilon.values() if eps is not None]


@dataclass(frozen=True)
class RunInfo:
    """run.json: what the run is, written when it starts."""

    majority_baseline: dict[str, float]
    """What always answering the test split's most common label (answer) scores: the floor to beat."""
    aggregation: str
    dp: bool
    task: str = "classification"
    labels: tuple[str, ...] = ()
    lora: str = "ffa"
    update_values: int = 0
    sites: int = 0
    rounds: int = 0
    privacy_unit: str = "record"
    server_optimizer: str = "fedavg"
    epsilon_budget: float | None = None
    select_round: str = "last"
    """How the final adapter is chosen: "last", or "best" on the federated evaluation."""
    selected_round: int | None = None
    """With select_round "best", once the run ended: the round of the checkpoint published as final."""
    selected_because: str = ""
    """Why (the rule, the score and its interval), for the report."""


@dataclass(frozen=True)
class PrivacyFile:
    """privacy.json: each site's latest privacy report, rewritten after every round."""

    dp: bool
    sites: dict[str, PrivacyReport] = field(default_factory=dict)


@dataclass(frozen=True)
class RoundInfo:
    """round.json, in every checkpoint directory: its weights' checksum, its parent's, and its metrics line."""

    round: int
    adapter_sha256: str
    contributors: int = 0
    parent_sha256: str | None = None
    """The previous checkpoint's adapter checksum (None for round 0): the lineage."""
    server_optimizer_sha256: str | None = None
    """The saved server-optimizer state's checksum (None for FedAvg, which has none)."""
    metrics: MetricsLine | None = None
    """The round's metrics line, so a crash before it reached metrics.jsonl loses the line, not the round."""


@dataclass(frozen=True)
class BaselinePoint:
    """One round of a baseline in baselines.json (written flat: {"round": 1, "accuracy": ...})."""

    round: int
    scores: dict[str, float]


Baselines = dict[str, list[BaselinePoint]]
"""Each baseline's curve ("local", "central"), round by round."""


def parse_record(cls: type[R], values: Any, where: str) -> R:
    """``values`` (parsed JSON) as a ``cls`` record; a :class:`RunFileError` naming ``where`` and the field."""
    try:
        return from_mapping(cls, values, where, key=snake, what="field", ignore_unknown=True)
    except ConfigError as exc:
        raise RunFileError(f"{exc} — {DAMAGED}") from exc


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFileError(f"{path} is missing — {DAMAGED}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFileError(f"{path} is not readable JSON ({exc}) — {DAMAGED}") from exc


def read_record(path: Path, cls: type[R]) -> R:
    """A JSON file a run wrote, as its record type."""
    return parse_record(cls, _load(path), str(path))


def write_record(path: Path, record: Any) -> None:
    """A record as a JSON file (atomically, owner-only)."""
    write_json(path, dataclasses.asdict(record))


def read_run_info(out_dir: Path) -> RunInfo:
    return read_record(out_dir / RUN_FILE, RunInfo)


def write_run_info(out_dir: Path, info: RunInfo) -> None:
    write_record(out_dir / RUN_FILE, info)


def read_round_info(checkpoint: Path) -> RoundInfo:
    return read_record(checkpoint / ROUND_FILE, RoundInfo)


def write_round_info(checkpoint: Path, info: RoundInfo) -> None:
    write_record(checkpoint / ROUND_FILE, info)


def read_privacy(out_dir: Path) -> PrivacyFile | None:
    """privacy.json, or None before the first round wrote it."""
    path = out_dir / PRIVACY_FILE
    return read_record(path, PrivacyFile) if path.exists() else None


def write_privacy(out_dir: Path, privacy: PrivacyFile) -> None:
    write_record(out_dir / PRIVACY_FILE, privacy)


def parse_metrics_line(text: str, where: str) -> MetricsLine:
    """One line of metrics.jsonl; ``where`` names it in errors ("run/metrics.jsonl line 3")."""
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{where}: not a JSON object ({exc}) — {DAMAGED}") from exc
    return parse_record(MetricsLine, values, where)


def complete_metrics_text(out_dir: Path) -> str:
    """metrics.jsonl up to its last complete line (a line being written, or half-written by a crash, is left)."""
    path = out_dir / METRICS_FILE
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    return text[: text.rfind("\n") + 1]


def read_metrics(out_dir: Path, start: int = 0) -> list[MetricsLine]:
    """The complete lines of metrics.jsonl from line ``start`` (0-based); [] before the run wrote one."""
    path = out_dir / METRICS_FILE
    lines = complete_metrics_text(out_dir).splitlines()
    return [parse_metrics_line(text, f"{path} line {n + 1}") for n, text in enumerate(lines) if n >= start]


def append_metrics(out_dir: Path, line: MetricsLine) -> None:
    """One round's line, durably (fsynced) before the round counts as published."""
    with open(out_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(dataclasses.asdict(line), default=_jsonable) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def drop_partial_metrics_line(out_dir: Path) -> None:
    """Cut a half-written last line (a crash mid-write) so the next append starts a line of its own."""
    path = out_dir / METRICS_FILE
    if path.exists() and (text := path.read_text(encoding="utf-8")) and not text.endswith("\n"):
        path.write_text(text[: text.rfind("\n") + 1], encoding="utf-8")


def _jsonable(value: Any) -> Any:
    """A NumPy scalar as its Python value (a bool stays a bool); anything else as text."""
    if hasattr(value, "item"):
        return value.item()
    return float(value) if hasattr(value, "__float__") else str(value)


def read_baselines(out_dir: Path) -> Baselines:
    """baselines.json's curves; {} when the run measured none."""
    path = out_dir / BASELINES_FILE
    if not path.exists():
        return {}
    curves = _load(path)
    if not isinstance(curves, dict) or not all(isinstance(curve, list) for curve in curves.values()):
        raise RunFileError(f"{path}: must map each baseline to a list of rounds — {DAMAGED}")
    out: Baselines = {}
    for name, curve in curves.items():
        out[name] = []
        for n, point in enumerate(curve):
            if not isinstance(point, dict):
                raise RunFileError(f"{path}: {name}[{n}] must be a mapping, got {point!r} — {DAMAGED}")
            scores = {key: value for key, value in point.items() if key != "round"}
            out[name].append(parse_record(BaselinePoint, {"round": point.get("round"), "scores": scores}
                                          if "round" in point else {"scores": scores}, f"{path}: {name}[{n}]"))
    return out


def write_baselines(out_dir: Path, curves: Baselines) -> None:
    write_json(out_dir / BASELINES_FILE, {name: [{"round": point.round, **point.scores} for point in curve]
                                          for name, curve in curves.items()})
