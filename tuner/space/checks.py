"""What every section check shares: the error, the bounds on a file, and the plain-value walk.

`check_plain` runs first, so the section checks after it meet only values JSON can hold.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from runners.registry import ANY_WORKLOAD

# Bounds on what a space file can mean. Anything beyond them is a typo or an attack, refused
# (exit 2) before anything is created. Extend a table to bound a new key.
MAX_FILE_BYTES = 1 << 20  # a space file is a few hundred bytes; this also bounds parse time
MAX_VALUES = 10_000  # values once YAML aliases are expanded (an alias bomb grows without bound)
MAX_DEPTH = 10  # nesting of mappings and lists
MAX_STRING = 4096
ABSURD = 1e12  # no number in a space file (ms, MiB, tokens, rates) is meant beyond this
# Keys whose value may be null: every section (read as empty), knob values (the knob decides:
# `dtype: null` is "the model's own"), the optional search limits, and the workload keys the
# runners declare nullable.
NULLABLE_KEYS = {("search", "timeout_min"), ("search", "n_startup_trials"),
                 *(("workload", k.name) for k in ANY_WORKLOAD if k.nullable)}


class SpaceError(ValueError):
    """A space file that cannot be used; the message names the file and key."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        self.source, self.key, self.problem = source, key, problem
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + problem)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_plain(data: Any, source: str) -> None:
    """Every value a plain, bounded one: string keys, no NaN/inf or absurd numbers, no dates or
    binary, no nulls where a value is needed, bounded nesting and size (aliases expanded).

    Runs first, so the checks after it meet only the kinds of values JSON can hold.
    """
    budget = [MAX_VALUES]
    _walk(data, (), 0, source, budget)


def _walk(value: Any, path: tuple[str, ...], depth: int, source: str, budget: list[int]) -> None:
    where = _where(path)
    budget[0] -= 1
    if budget[0] < 0:
        raise SpaceError(source, where, f"more than {MAX_VALUES} values (YAML aliases expanded): not a space file")
    if depth > MAX_DEPTH:
        raise SpaceError(source, where, f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise SpaceError(source, where, f"keys must be strings, got {type(key).__name__} {_short(key)}")
            _walk(item, (*path, key), depth + 1, source, budget)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _walk(item, (*path[:-1], f"{path[-1]}[{i}]") if path else (f"[{i}]",), depth + 1, source, budget)
    elif value is None:
        if not _null_ok(path):
            raise SpaceError(source, where, "must not be null (leave the key out for its default)")
    elif isinstance(value, bool):
        return
    elif isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise SpaceError(source, where, f"must be a finite number, got {value}")
        if abs(value) > ABSURD:
            raise SpaceError(source, where, f"{value:g} is beyond any meaningful value (|x| <= {ABSURD:g})")
    elif isinstance(value, str):
        if len(value) > MAX_STRING:
            raise SpaceError(source, where, f"a string longer than {MAX_STRING} characters")
        if "\x00" in value:
            raise SpaceError(source, where, "contains a NUL character")
    else:
        kind = "a date" if isinstance(value, (datetime.date, datetime.datetime)) else type(value).__name__
        raise SpaceError(source, where, f"must be a number, string, list or mapping, got {kind}")


def _where(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _null_ok(path: tuple[str, ...]) -> bool:
    head = path[0].split("[")[0] if path else ""
    return (len(path) <= 1 or head == "fixed" or (head == "params" and "choices[" in path[-1])
            or tuple(path) in NULLABLE_KEYS)


def no_unknown_keys(data: dict[str, Any], allowed: set[str], source: str, prefix: str) -> None:
    """A SpaceError naming the first key of `data` not in `allowed` (at `prefix.key`)."""
    for key in data:
        if key not in allowed:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise SpaceError(source, where, f"unknown key (allowed: {', '.join(sorted(allowed))})")


def typed_key(data: dict[str, Any], key: str, kind: type | tuple[type, ...], source: str,
              prefix: str, default: Any) -> Any:
    """`data[key]` checked to be a `kind` (a SpaceError naming `prefix.key` otherwise), or
    `default` when absent or null. The one typed read of every space (and baseline) file."""
    where = f"{prefix}.{key}" if prefix else key
    if key not in data or data[key] is None:
        return default
    value = data[key]
    if kind is float:
        kind = (int, float)
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise SpaceError(source, where, f"must be {_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise SpaceError(source, where, f"must be {_name(kind)}, got {type(value).__name__} {value!r}")
    return value


def _name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {"dict": "a mapping", "list": "a list", "str": "a string", "int": "an integer",
             "float": "a number", "bool": "true or false"}
    return " or ".join(names.get(k.__name__, k.__name__) for k in kinds)


def _positive(data: dict[str, Any], key: str, kind: type, source: str, prefix: str,
              default: Any, allow_zero: bool = False) -> Any:
    value = typed_key(data, key, kind, source, prefix, default)
    if value is not None and (value < 0 or (value == 0 and not allow_zero)):
        raise SpaceError(source, f"{prefix}.{key}", f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return value
