"""Locating and reading space files: bundled names, a bounded regular file, safe YAML with
unique keys, and the CLI overrides applied over the file's data."""

from __future__ import annotations

import os
import stat
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tuner.space.checks import MAX_DEPTH, MAX_FILE_BYTES, SpaceError, _short


def bundled_dir() -> Path:
    return Path(str(resources.files("search_spaces")))


def resolve_space_path(name_or_path: str) -> Path:
    """A path, or the name of a bundled file with or without `.yaml`."""
    path = Path(name_or_path)
    if path.exists():
        return path
    stem = path.name if path.suffix in (".yaml", ".yml") else path.name + ".yaml"
    bundled = bundled_dir() / stem
    if len(path.parts) == 1 and bundled.exists():
        return bundled
    known = ", ".join(sorted(p.name for p in bundled_dir().glob("*.yaml")))
    raise SpaceError(name_or_path, "", f"no such file, and no bundled space of that name ({known})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which plain YAML silently overwrites."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:  # `[a, b]: 1`; other non-string keys are refused by `check_plain`, by key
            raise yaml.constructor.ConstructorError(
                None, None, f"keys must be strings, got {type(key).__name__} {_short(key)}",
                key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)

_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)


def read_yaml(path: Path) -> dict[str, Any]:
    source = str(path)
    text = _read_text(path, source)
    if not text.strip():
        raise SpaceError(source, "", "file is empty")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        line = f" (line {mark.line + 1})" if mark else ""
        problem = exc.problem or "bad YAML"
        if "could not determine a constructor" in problem:
            problem = "unsafe or unknown YAML tag " + problem.split("tag")[-1].strip()
        raise SpaceError(source, "", f"{problem}{line}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "malformed YAML"
        raise SpaceError(source, "", f"malformed YAML{line}: {problem}") from None
    except (RecursionError, MemoryError):
        raise SpaceError(source, "", f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    if not isinstance(data, dict):
        raise SpaceError(source, "", "top level must be a mapping of keys")
    return data


def _read_text(path: Path, source: str) -> str:
    """The file's text; only a regular file of at most MAX_FILE_BYTES (a FIFO or /dev/zero
    would block or never end). Opened non-blocking, and checked again once open."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SpaceError(source, "", "not a regular file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        raise SpaceError(source, "", f"cannot read file ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise SpaceError(source, "", "not a regular file")
        try:
            data = handle.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise SpaceError(source, "", f"cannot read file ({exc.strerror})") from None
    if len(data) > MAX_FILE_BYTES:
        raise SpaceError(source, "", f"larger than {MAX_FILE_BYTES // 1024} KiB; a space file is a few lines")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpaceError(source, "", "not a UTF-8 text file") from None


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """CLI flags over the file: `study` and `device` at the top, the rest under `search`."""
    data = dict(data)
    search = dict(data.get("search") or {}) if isinstance(data.get("search") or {}, dict) else data["search"]
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("study", "device"):
            data[key] = value
        elif isinstance(search, dict):
            search[key] = value
    if search:
        data["search"] = search
    return data
