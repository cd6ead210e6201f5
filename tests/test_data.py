"""Data files: clear errors for bad input; deterministic, disjoint, non-IID partitions."""

import json
from pathlib import Path

import numpy as np
import pytest

from common.data import DataError, encode_labels, label_names, partition, read_records
from tests.conftest import write_csv


def test_packaged_drug_reviews_load(drug_reviews):
    assert len(drug_reviews) == 600
    assert label_names(drug_reviews) == ("negative", "neutral", "positive")
    assert len(read_records("drugreview", split="test")) == 379


def test_jsonl_and_csv_read_the_same(tmp_path: Path):
    rows = [{"text": "card never arrived", "label": "card_arrival"}, {"text": "refund, please", "label": "refund"}]
    csv_path = write_csv(tmp_path / "a.csv", rows)
    jsonl_path = tmp_path / "a.jsonl"
    jsonl_path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert read_records(str(csv_path)) == read_records(str(jsonl_path)) == rows


@pytest.mark.parametrize("name, content, fragment", [
    ("a.csv", "review,rating\nok,positive\n", "missing column(s) ['text', 'label']"),
    ("a.csv", "text,label\n\"good\",positive,extra\n", "line 2: wrong number of fields"),
    ("a.csv", "text,label\n   ,positive\n", "example 1: empty 'text'"),
    ("a.csv", "text,label\nfine,\n", "example 1: empty 'label'"),
    ("a.csv", "text,label\n", "no examples"),
    ("a.jsonl", '{"text": "x", "label": "y"}\n{"text": "x", \n', "line 2: not valid JSON"),
    ("a.jsonl", '["text", "label"]\n', "line 1: expected a JSON object"),
    ("a.txt", "text,label\nx,y\n", "unsupported file type '.txt'"),
])
def test_malformed_files_name_the_problem(tmp_path: Path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as info:
        read_records(str(path))
    assert fragment in str(info.value)


def test_non_utf8_and_missing_files(tmp_path: Path):
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncaf\xe9,ok\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_records(str(path))
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "nope.csv"))


def test_unknown_label_is_refused_with_the_fix():
    records = [{"text": "a", "label": "positive"}, {"text": "b", "label": "great"}]
    with pytest.raises(DataError) as info:
        encode_labels(records, ("negative", "positive"), "site x")
    assert "example 2: label 'great' is not one of" in str(info.value) and "data.labels" in str(info.value)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "column:condition"])
def test_partitions_are_disjoint_complete_and_seeded(drug_reviews, scheme):
    parts = partition(drug_reviews, 4, scheme, alpha=0.5, seed=3)
    flat = [i for part in parts for i in part]
    assert sorted(flat) == list(range(len(drug_reviews)))
    assert all(parts)
    assert parts == partition(drug_reviews, 4, scheme, alpha=0.5, seed=3)


def test_column_partition_keeps_each_condition_at_one_site(drug_reviews):
    parts = partition(drug_reviews, 3, "column:condition", alpha=0.5, seed=0)
    owners: dict[str, set[int]] = {}
    for site, part in enumerate(parts):
        for i in part:
            owners.setdefault(drug_reviews[i]["condition"], set()).add(site)
    assert all(len(sites) == 1 for sites in owners.values())
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) < 0.25 * len(drug_reviews)


def test_dirichlet_partition_is_non_iid(drug_reviews):
    parts = partition(drug_reviews, 3, "dirichlet", alpha=0.1, seed=0)
    labels = np.array([r["label"] for r in drug_reviews])
    mixes = [np.mean(labels[p] == "positive") for p in parts]
    assert max(mixes) - min(mixes) > 0.2


def test_partition_errors(drug_reviews):
    with pytest.raises(DataError, match="partition column 'ward'"):
        partition(drug_reviews, 3, "column:ward", alpha=0.5, seed=0)
    with pytest.raises(DataError, match="cannot split 2 examples into 3 sites"):
        partition(drug_reviews[:2], 3, "iid", alpha=0.5, seed=0)
    one_condition = [dict(r, condition="x") for r in drug_reviews[:10]]
    with pytest.raises(DataError, match="without data"):
        partition(one_condition, 2, "column:condition", alpha=0.5, seed=0)


def test_privacy_units_come_from_a_column_and_a_missing_or_empty_one_is_a_clear_error():
    from common.data import unit_indices

    rows = [{"text": "a", "label": "x", "patient": "p2"}, {"text": "b", "label": "x", "patient": "p1"},
            {"text": "c", "label": "y", "patient": "p2"}]
    assert unit_indices(rows, "patient", "f.csv").tolist() == [0, 1, 0]
    assert unit_indices(rows, "", "f.csv").tolist() == [0, 1, 2]  # record-level: each row its own unit
    with pytest.raises(DataError, match="privacy unit column 'customer' is not in the data"):
        unit_indices(rows, "customer", "f.csv")
    with pytest.raises(DataError, match="f.csv, example 2: empty privacy unit 'patient'"):
        unit_indices([rows[0], dict(rows[1], patient=" ")], "patient", "f.csv")
