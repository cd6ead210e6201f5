"""One way to turn a mapping (run config, site policy, a JSON file) into a typed dataclass.

:func:`from_mapping` checks the keys (unknown ones, missing required ones) and converts each value to
its field's annotation (str, int, float, bool, Path, ``X | None``, tuples, lists, dicts, Literal,
nested dataclasses); the dataclass's own ``__post_init__`` then checks ranges. Every error says where
the mapping came from, which key, what it must be, and what it got.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class BadInput(ValueError):
    """Input a person must fix (config, data, model, kit); the message says what and how. The CLI maps
    every subclass to exit code 2 without importing the heavy modules that define them."""


class ConfigError(BadInput):
    """A setting is missing, has the wrong type, or is out of range."""


def kebab(name: str) -> str:
    """A field's key in settings and policies: ``max_epsilon`` → ``max-epsilon``."""
    return name.replace("_", "-")


def snake(name: str) -> str:
    """A field's key in the files a run writes: the field's own name."""
    return name


def from_mapping(cls: type[T], values: Mapping[str, Any], where: str, *, key: typing.Callable[[str], str] = kebab,
                 prefix: str = "", what: str = "setting", text_values: bool = False,
                 ignore_unknown: bool = False) -> T:
    """``cls(**values)`` with every key checked and every value converted to its field's annotation.

    ``where``: where the mapping came from, first in every error ("node config", a file's path);
    ``key``: a field's key in the mapping; ``prefix``: the keys' dotted path, for a nested mapping;
    ``what``: what a key names, in the unknown-key error; ``text_values``: values may arrive as text
    (numbers are parsed, '' is None); ``ignore_unknown``: keys no field names are skipped (files written
    by another version). Raises :class:`ConfigError`.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the value'} must be a mapping of keys to values, "
                          f"got {values!r}")
    hints = typing.get_type_hints(cls)
    fields = {key(f.name): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown and not ignore_unknown:
        guesses = [f"{name} (did you mean {prefix}{close[0]}?)" if (close := difflib.get_close_matches(name, fields, 1))
                   else name for name in unknown]
        raise ConfigError(f"{where}: unknown {what}(s): {', '.join(prefix + g for g in guesses)}; known: "
                          f"{', '.join(prefix + name for name in fields)}")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name in values:
            kwargs[field.name] = convert(values[name], hints[field.name], f"{prefix}{name}", where,
                                         key=key, text_values=text_values, ignore_unknown=ignore_unknown)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: '{prefix}{name}' is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # a record's own check (e.g. a policy's ranges)
        raise ConfigError(f"{where}: {exc}") from exc


def convert(value: Any, annotation: Any, name: str, where: str, *, key: typing.Callable[[str], str] = kebab,
            text_values: bool = False, ignore_unknown: bool = False) -> Any:
    """``value`` as ``annotation`` says, or a :class:`ConfigError` naming ``name``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)

    def wrong(expected: str) -> ConfigError:
        return ConfigError(f"{where}: {name} must be {expected}, got {value!r}")

    def each(item: Any, kind: Any, at: str) -> Any:
        return convert(item, kind, at, where, key=key, text_values=text_values, ignore_unknown=ignore_unknown)

    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        options = [kind for kind in args if kind is not type(None)]
        if value is None or (text_values and value == "" and len(options) < len(args)):
            if len(options) < len(args):
                return None
            raise wrong("set")
        if len(options) == 1:
            return each(value, options[0], name)
        for kind in options:
            try:
                return each(value, kind, name)
            except ConfigError:
                continue
        raise wrong(" or ".join(getattr(kind, "__name__", str(kind)) for kind in options))
    if origin is Literal:
        if value in args:
            return value
        quoted = [repr(choice) for choice in args]
        raise wrong(" or ".join(quoted) if len(quoted) <= 2 else f"one of {', '.join(quoted[:-1])} or {quoted[-1]}")
    if origin is tuple:
        kind = args[0] if args else Any
        if isinstance(value, str):  # settings and policies write a list as "a,b,c"
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)):
            raise wrong("a comma-separated string or a list")
        return tuple(each(item, kind, f"{name}[{n}]") for n, item in enumerate(value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise wrong("a list")
        return [each(item, args[0] if args else Any, f"{name}[{n}]") for n, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise wrong("a mapping")
        kind = args[1] if args else Any
        return {str(k): each(item, kind, f"{name}.{k}") for k, item in value.items()}
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        return from_mapping(annotation, value, where, key=key, prefix=f"{name}.", text_values=text_values,
                            ignore_unknown=ignore_unknown)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise wrong("true or false")
    if annotation in (int, float):  # an int is a float's value too; a bool is neither
        what, accepted = ("a whole number", int) if annotation is int else ("a number", (int, float))
        if text_values and isinstance(value, str):
            try:
                return annotation(value)
            except ValueError:
                raise wrong(what) from None
        if isinstance(value, accepted) and not isinstance(value, bool):
            return annotation(value)
        raise wrong(what)
    if annotation is str:
        if isinstance(value, str):
            return value
        raise wrong("a string")
    if annotation is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise wrong("a path")
    raise TypeError(f"from_mapping cannot convert to {annotation!r} ({name})")  # a programming error, not input
