"""The demo's data: a bank consortium on BANKING77 (Casanueva et al., 2020, CC BY 4.0).

The data set is not shipped with fedtune; the demo reads the user's copy and writes the subset it
uses (the most frequent intents, as ``text,label`` CSVs) under its output directory.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from common.data import DataError, write_records

SOURCE = "https://github.com/PolyAI-LDN/task-specific-datasets (banking_data/train.csv, test.csv)"


def prepare_bank_data(folder: Path, out: Path, intents: int) -> tuple[str, str, int]:
    """(train CSV, test CSV, number of intents) for the ``intents`` most frequent intents of BANKING77."""
    files = {split: folder / f"{split}.csv" for split in ("train", "test")}
    if not all(path.is_file() for path in files.values()):
        raise DataError(f"the demo needs BANKING77 in {folder} (train.csv and test.csv with columns text,category); "
                        f"get it from {SOURCE} and pass --banking77 DIR")
    rows = {}
    for split, path in files.items():
        with open(path, encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not {"text", "category"} <= set(reader.fieldnames or []):
                raise DataError(f"{path}: expected columns text,category (BANKING77's own), found {reader.fieldnames}")
            rows[split] = [{"text": row["text"], "label": row["category"]} for row in reader]
    if not 2 <= intents <= 77:
        raise DataError(f"--intents must be in [2, 77], got {intents}")
    counts = Counter(row["label"] for row in rows["train"])
    kept = {label for label, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:intents]}
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(write_records(out / f"{split}.csv", [row for row in rows[split] if row["label"] in kept]))
             for split in ("train", "test")]
    return paths[0], paths[1], intents
