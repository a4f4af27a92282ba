"""A trial whose effective config an earlier trial already measured is answered from its record.

Effective config: the trial's resolved config (runner, model, device, workload, seed, SLO,
constraints and knobs) without the knobs that have no effect given the others (`applies_when` in
runners/knobs.py: quant_scheme at quant_bits=16, sparsity_kind at sparsity=0, ...). Two trials with
the same effective config build and measure the same stack, so the second would only add a noise
draw, and the front would pick whichever draw the noise favoured. Instead it copies the earlier
trial's values, constraints and result attrs without launching a runner, and `same_as` names it.

Only COMPLETE trials measured in this study count as sources (not FAIL or RUNNING ones, not trials
a warm start copied from another study); with several workers, those finished when the trial
starts. A repeat uses budget like any finished trial (so a sampler that keeps proposing repeats
still ends), but no device time.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from runners.contract import TrialConfig
from runners.knobs import effective_knobs, inert_knobs, runner_knobs
from tuner import record
from tuner.space import Space
from tuner.storage import trial_handle
from tuner.tell import tell_values

# Fields of a stored TrialConfig that name the trial, not what it measures.
_OWN_FIELDS = ("artifact_dir", "trial_number")
# The attrs of the source that describe its measurement (copied); the rest describe the trial itself.
COPIED_ATTRS = (record.OUTCOME, *record.RESULT_SECTIONS, record.INFEASIBLE_REASON, record.STOPPED_EARLY,
                *record.WINDOW_FLAGS, record.ARTIFACT_DIR)
_CONSTRAINT_PREFIX = "constraints:"  # Optuna's key for a named `set_constraint` value


@dataclass(frozen=True)
class Repeat:
    source: FrozenTrial  # the earlier trial measured with the same effective config
    why: str  # e.g. "quant_scheme has no effect at quant_bits=16", or "identical config"


def effective_config(config: dict[str, Any], table: dict[str, Any]) -> dict[str, Any]:
    """A stored TrialConfig dict reduced to what decides the measurement."""
    out = {k: v for k, v in config.items() if k not in _OWN_FIELDS}
    out["knobs"] = effective_knobs(table, config.get("knobs") or {})
    return out


def find_repeat(study: optuna.Study, space: Space, config: TrialConfig) -> Repeat | None:
    """The earliest finished trial of `study` whose effective config equals `config`'s, or None."""
    table = runner_knobs(space.runner, space.model)
    mine = _plain(dataclasses.asdict(config))
    wanted = effective_config(mine, table)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        stored = record.CONFIG.get(trial)
        if trial.number == config.trial_number or not stored or record.CARRIED_OVER.get(trial):
            continue
        if effective_config(_plain(stored), table) == wanted:
            return Repeat(trial, _why(table, mine["knobs"], stored.get("knobs") or {}))
    return None


def params_key(table: dict[str, Any], fixed: dict[str, Any], params: dict[str, Any]) -> tuple[Any, ...]:
    """`params` reduced to the knobs that matter given the others and `fixed` (the space's fixed
    knobs): two points of a space with the same key measure the same stack (the sampler's view)."""
    inert = inert_knobs(table, {**fixed, **params})
    return tuple(sorted((k, round(v, 9) if isinstance(v, float) else v) for k, v in params.items() if k not in inert))


def _plain(config: dict[str, Any]) -> dict[str, Any]:
    """As stored (JSON: tuples become lists), so a live config and a stored one compare alike."""
    return json.loads(json.dumps(config, default=str))


def _why(table: dict[str, Any], mine: dict[str, Any], theirs: dict[str, Any]) -> str:
    """Which inert knobs make the two configs one: each knob whose value differs, and why it is inert."""
    inert = inert_knobs(table, mine)
    differing = [k for k in sorted({*mine, *theirs}) if mine.get(k) != theirs.get(k)]
    reasons = list(dict.fromkeys(inert[k] for k in differing if k in inert))
    return "; ".join(reasons) or "identical config"


def tell_repeat(study: optuna.Study, trial: optuna.Trial, repeat: Repeat, wall_s: float) -> None:
    """Record the source's measurement on `trial` and tell Optuna the source's values."""
    source = repeat.source
    for attr in COPIED_ATTRS:
        if attr.recorded(source):
            attr.put(trial, attr.get(source))
    record.WALL_S.put(trial, wall_s)
    record.SAME_AS.put(trial, {"trial": source.number, "why": repeat.why})
    for key, value in source.system_attrs.items():
        if key.startswith(_CONSTRAINT_PREFIX):
            trial.set_constraint(key[len(_CONSTRAINT_PREFIX):], value)
    plain = source.system_attrs.get(record.CONSTRAINT_LIST_KEY)
    if plain is not None:
        trial_handle(study, trial).set_system_attr(record.CONSTRAINT_LIST_KEY, list(plain))
    tell_values(study, trial, list(source.values))
