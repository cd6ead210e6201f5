"""The one mapping-to-dataclass parser: every key checked, every value converted to its field's type, and
every error says where, which key, what it must be and what it got."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from common.typed import ConfigError, from_mapping, snake


@dataclass(frozen=True)
class Inner:
    size: int
    ratio: float = 0.5


@dataclass(frozen=True)
class Outer:
    name: str
    mode: Literal["fast", "safe", "slow"] = "safe"
    switch: bool = False
    labels: tuple[str, ...] = ()
    limit: int | None = None
    where: Path = Path(".")
    inner: Inner = field(default_factory=lambda: Inner(1))
    scores: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")


def test_values_are_converted_to_their_fields_types():
    parsed = from_mapping(Outer, {"name": "x", "mode": "fast", "switch": True, "labels": "a, b,", "limit": 3,
                                  "where": "/tmp/x", "inner": {"size": 2, "ratio": 1}, "scores": {"f1": 1}}, "test")
    assert parsed == Outer("x", "fast", True, ("a", "b"), 3, Path("/tmp/x"), Inner(2, 1.0), {"f1": 1.0})
    assert isinstance(parsed.inner.ratio, float) and isinstance(parsed.scores["f1"], float)
    assert from_mapping(Outer, {"name": "x", "labels": ["a", "b"]}, "test").labels == ("a", "b")


def test_text_values_are_parsed_where_a_mapping_holds_only_text():
    parsed = from_mapping(Outer, {"name": "x", "limit": "4", "inner": {"size": "2", "ratio": "0.25"}}, "node config",
                          text_values=True)
    assert parsed.limit == 4 and parsed.inner == Inner(2, 0.25)
    assert from_mapping(Outer, {"name": "x", "limit": ""}, "node config", text_values=True).limit is None
    with pytest.raises(ConfigError, match="node config: limit must be a whole number, got 'four'"):
        from_mapping(Outer, {"name": "x", "limit": "four"}, "node config", text_values=True)


@pytest.mark.parametrize("values, message", [
    ({"name": "x", "nmae": "y"}, "test: unknown setting(s): nmae (did you mean name?); known: name, mode,"),
    ({}, "test: 'name' is missing"),
    ({"name": "x", "inner": {}}, "test: 'inner.size' is missing"),
    ({"name": "x", "inner": {"size": 1, "szie": 2}}, "unknown setting(s): inner.szie (did you mean inner.size?)"),
    ({"name": 3}, "test: name must be a string, got 3"),
    ({"name": "x", "switch": "yes"}, "test: switch must be true or false, got 'yes'"),
    ({"name": "x", "limit": 2.5}, "test: limit must be a whole number, got 2.5"),
    ({"name": "x", "limit": True}, "test: limit must be a whole number, got True"),
    ({"name": "x", "inner": {"size": 1, "ratio": "half"}}, "test: inner.ratio must be a number, got 'half'"),
    ({"name": "x", "mode": "quick"}, "test: mode must be one of 'fast', 'safe' or 'slow', got 'quick'"),
    ({"name": "x", "labels": 5}, "test: labels must be a comma-separated string or a list, got 5"),
    ({"name": "x", "inner": [1]}, "test: inner must be a mapping of keys to values, got [1]"),
    ({"name": "x", "scores": {"f1": "high"}}, "test: scores.f1 must be a number, got 'high'"),
    ({"name": "x", "limit": 0}, "test: limit must be >= 1, got 0"),
])
def test_every_error_names_where_the_key_and_what_is_wrong(values, message):
    with pytest.raises(ConfigError) as info:
        from_mapping(Outer, values, "test")
    assert message in str(info.value)


def test_unknown_keys_may_be_skipped_and_keys_may_be_field_names():
    assert from_mapping(Inner, {"size": 1, "newer": True}, "f.json", key=snake, ignore_unknown=True) == Inner(1)
    with pytest.raises(ConfigError, match="f.json: unknown field"):
        from_mapping(Inner, {"size": 1, "newer": True}, "f.json", key=snake, what="field")
