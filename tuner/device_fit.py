"""Fit a space to its device before the first trial: values the device can never run are
removed from the searched choices (one printed line each), so no budget goes to them.

The runner answers which values are impossible (`runners.capabilities`). For a CPU device it
answers here (no torch needed); for `auto`/CUDA a child process describes the device. A study
that would have nothing left to run is refused (exit 2), before anything is created.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

from runners.capabilities import cpu_facts, from_json, impossible_values
from runners.registry import refused_up_front
from tuner.errors import UsageError
from tuner.search import grid_points
from tuner.space import Space, validate

# Seconds a device description may take (a CUDA context start is the slow part).
DESCRIBE_TIMEOUT_S = 120.0
# The most restricted device: every value some device cannot run. A space that uses none of
# them fits every device and needs no description (no child process).
_NOTHING = dataclasses.replace(cpu_facts(), packages={})


def device_table(runner: str, device: str, python: str = sys.executable) -> tuple[str, dict[str, dict[Any, str]]]:
    """The device `device` resolves to (`auto` -> cuda:0 or cpu) and knob -> {value: reason}
    of what it cannot run, from the runner's capability table."""
    if device == "cpu":
        return "cpu", impossible_values(runner, cpu_facts())
    from tuner.launcher import _child_env

    try:
        done = subprocess.run([python, "-m", "runners.capabilities", runner, device], capture_output=True,
                              text=True, timeout=DESCRIBE_TIMEOUT_S, env=_child_env(), check=False)
    except subprocess.TimeoutExpired:
        raise UsageError(f"device {device}: describing it took over {DESCRIBE_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        last = [line for line in done.stderr.splitlines() if line.strip()]
        raise UsageError(f"device {device} could not be described: {last[-1] if last else 'no output'}")
    facts, table = from_json(done.stdout.strip().splitlines()[-1])
    return (f"{facts.device} ({facts.name})" if facts.cuda else facts.device), table


def might_not_fit(space: Space) -> bool:
    """Whether any searched choice or fixed value is one that some device cannot run."""
    worst = impossible_values(space.runner, _NOTHING)
    for knob, values in worst.items():
        param = space.params.get(knob)
        if param is not None and param.type == "categorical" and any(_in(c, values) for c in param.choices):
            return True
        if knob in space.fixed and _in(space.fixed[knob], values):
            return True
    return False


def _in(value: Any, values: dict[Any, str]) -> bool:
    # True == 1 in Python: a bool knob and an int knob must not match each other's values.
    return any(value == v and type(value) is type(v) for v in values)


def _reason(value: Any, values: dict[Any, str]) -> str:
    return next(why for v, why in values.items() if value == v and type(value) is type(v))


def fit_space(space: Space, table: dict[str, dict[Any, str]], say: Callable[[str], None],
              device: str | None = None) -> Space:
    """The space without the impossible choices; UsageError if a fixed value or a whole knob is
    impossible (every trial would be infeasible)."""
    device = device or space.device
    raw = dict(space.raw)
    params = {name: dict(spec) for name, spec in (raw.get("params") or {}).items()}
    for knob, values in table.items():
        if knob in space.fixed and _in(space.fixed[knob], values):
            raise UsageError(f"{space.source}: fixed.{knob}: {space.fixed[knob]!r} cannot run on {device}: "
                             f"{_reason(space.fixed[knob], values)} (--keep-infeasible runs it anyway)")
        param = space.params.get(knob)
        if param is None or param.type != "categorical":
            continue
        kept = [c for c in param.choices if not _in(c, values)]
        if not kept:
            raise UsageError(f"{space.source}: params.{knob}: no choice can run on {device} "
                             f"({'; '.join(_reason(c, values) for c in param.choices)}); nothing is left to "
                             f"search (--keep-infeasible runs them anyway)")
        for choice in param.choices:
            if not _in(choice, values):
                continue
            say(f"device {device}: {knob}={choice!r} removed from the space: {_reason(choice, values)}")
        if len(kept) < len(param.choices):
            params[knob]["choices"] = kept
    raw["params"] = params
    return validate(raw, source=space.source, default_study=space.study)


def fit_to_device(space: Space, keep_infeasible: bool, say: Callable[[str], None],
                  table: Callable[[str, str], tuple[str, dict[str, dict[Any, str]]]] = device_table) -> Space:
    """The space to search on its device (unchanged with `keep_infeasible` or when it fits any)."""
    if keep_infeasible:
        return space
    if might_not_fit(space):
        device, impossible = table(space.runner, space.device)
        space = fit_space(space, impossible, say, device)
    announce_refused(space, say)
    return space


def refused_points(space: Space, points: list[dict[str, Any]]) -> list[str]:
    """For each point (params), why its runner refuses it together with `fixed` on any device ('' if not)."""
    return [refused_up_front(space.runner, space.model, {**space.fixed, **point}) for point in points]


def announce_refused(space: Space, say: Callable[[str], None]) -> None:
    """One line per reason for the points of a finite space its runner refuses up front;
    UsageError when every point is refused (nothing could run)."""
    points = grid_points(space)  # finite spaces only (a product of at most 20k points)
    if not points:
        return
    reasons = [r for r in refused_points(space, points) if r]
    if len(reasons) == len(points):
        raise UsageError(f"{space.source}: every one of the {len(points)} configurations is refused by runner "
                         f"{space.runner} on any device, so nothing could run: {reasons[0]}")
    for reason, count in Counter(reasons).items():
        say(f"{count} of {len(points)} configurations are refused by runner {space.runner} on any device "
            f"(sampler auto never asks for one; another sampler's trial that does is told infeasible without "
            f"running): {reason}")
