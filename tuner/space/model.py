"""`model:` and `device:`: a preset or checkpoint folder (or a replay table), its dtype, seed
and positions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runners.knobs import DTYPES
from runners.registry import SEED_MAX
from tuner.space.checks import MAX_FILE_BYTES, SpaceError, no_unknown_keys, typed_key

MODEL_KEYS = {"preset", "path", "dtype", "seed", "num_layers", "arch"}
REPLAY_MODEL_KEYS = {"table", "recorded_with"}  # runner: replay


def _check_device(device: str, source: str) -> None:
    if device in ("auto", "cpu", "cuda"):
        return
    if device.startswith("cuda:") and device[5:].isdigit():
        return
    raise SpaceError(source, "device", f"must be auto, cpu, cuda or cuda:K, got {device!r}")


def _model(model: dict[str, Any], source: str) -> dict[str, Any]:
    no_unknown_keys(model, MODEL_KEYS, source, "model")
    if "preset" in model and "path" in model:
        raise SpaceError(source, "model.preset", "give either `model.preset` or `model.path`, not both")
    out = dict(model)
    if "path" in model:
        typed_key(model, "path", str, source, "model", "")
    else:
        from runners.presets import PRESETS  # torch-free table of preset shapes

        preset = typed_key(model, "preset", str, source, "model", "glm-tiny")
        if preset not in PRESETS:
            raise SpaceError(source, "model.preset", f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
        out["preset"] = preset
    dtype = typed_key(model, "dtype", str, source, "model", None)
    if dtype is not None and dtype not in DTYPES:
        raise SpaceError(source, "model.dtype", f"must be one of {list(DTYPES)}, got {dtype!r}")
    for key, low, high in (("seed", 0, SEED_MAX), ("num_layers", 1, 1000)):
        value = typed_key(model, key, int, source, "model", None)
        if value is not None and not low <= value <= high:
            raise SpaceError(source, f"model.{key}", f"must be in [{low}, {high}], got {value}")
    return out


def model_positions(model: dict[str, Any]) -> int | None:
    """The model's maximum positions (prompt + output), from its preset or its config.json."""
    from runners.presets import PRESETS  # torch-free table of preset shapes

    if "table" in model:  # runner replay: no model, no positions
        return None
    if "path" not in model:
        return int(PRESETS[model.get("preset", "glm-tiny")]["max_position_embeddings"])
    config = Path(model["path"]) / "config.json"
    try:
        if config.is_file() and config.stat().st_size <= MAX_FILE_BYTES:
            value = json.loads(config.read_text()).get("max_position_embeddings")
            return int(value) if isinstance(value, int) and value > 0 else None
    except (OSError, ValueError, AttributeError):
        pass
    return None  # a hub name or an unreadable folder: the runner will say


def _replay_model(model: dict[str, Any], source: str) -> dict[str, Any]:
    """`model: {table: FILE}`; a relative FILE is found beside the space file, else from here."""
    from runners.replay import TableError, load_table

    no_unknown_keys(model, REPLAY_MODEL_KEYS, source, "model")
    table = typed_key(model, "table", str, source, "model", None)
    if not table:
        raise SpaceError(source, "model.table", "runner replay needs the recorded table: model: {table: FILE.csv}")
    path = Path(table)
    beside = Path(source).parent / path
    if not path.is_absolute() and not path.exists() and beside.exists():
        path = beside
    try:
        load_table(path)
    except TableError as exc:
        raise SpaceError(source, "model.table", str(exc)) from None
    out = {"table": str(path.resolve())}
    recorded = typed_key(model, "recorded_with", str, source, "model", None)
    if recorded:
        from runners.registry import known_runners, runner_spec

        if recorded not in known_runners() or runner_spec(recorded).model == "table":
            runners = [r for r in known_runners() if runner_spec(r).model != "table"]
            raise SpaceError(source, "model.recorded_with",
                             f"{recorded!r} is not a runner a table can be recorded with ({', '.join(runners)})")
        out["recorded_with"] = recorded
    return out
