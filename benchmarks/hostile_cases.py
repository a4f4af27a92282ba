"""The hostile inputs of `benchmarks/hostile_battery.py`: malformed spaces, files and flags generated
from a seed by mutating the bundled spaces (not the tests' cases)."""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Case:
    kind: str
    argv: list[str]  # after `python -m tuner`; SPACE is replaced by the case's space file
    expect: str  # the key, flag or file the one error line must name ("a|b": either)
    space: str | None = None  # YAML text of the space file, if the case writes one
    setup: str = ""  # a special file to make: fifo | dir | big | devzero_link | binary


# ---------------------------------------------------------------- generating cases


def bundled() -> list[tuple[str, dict[str, Any]]]:
    return [(p.stem, yaml.safe_load(p.read_text())) for p in sorted((ROOT / "search_spaces").glob("*.yaml"))]


def key_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += key_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += key_paths(item, (*prefix, i))
    return out


def dotted(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def put(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return data


def nullable(path: tuple[Any, ...]) -> bool:
    from tuner.space import NULLABLE_KEYS

    return len(path) == 1 or path[0] == "fixed" or "choices" in path or tuple(path) in NULLABLE_KEYS


def never_meant(rng: random.Random, depth_cap: int) -> tuple[str, Any]:
    """A value no key can mean, and its family name."""
    family = rng.choice(["nan", "inf", "huge_float", "huge_int", "deep", "nul", "long_string", "int_key"])
    if family == "nan":
        return family, float("nan")
    if family == "inf":
        return family, rng.choice([1, -1]) * float("inf")
    if family == "huge_float":
        return family, rng.choice([1, -1]) * 10.0 ** rng.uniform(12.5, 300)
    if family == "huge_int":
        return family, rng.choice([1, -1]) * rng.randrange(10**13, 10**80)
    if family == "deep":
        value: Any = rng.randrange(5)
        for _ in range(rng.randrange(depth_cap + 2, depth_cap + 60)):
            value = [value] if rng.random() < 0.5 else {"k": value}
        return family, value
    if family == "nul":
        return family, "x" * rng.randrange(5) + "\x00" + "y" * rng.randrange(5)
    if family == "long_string":
        return family, "".join(rng.choice("abcé漢\u202e") for _ in range(rng.randrange(4097, 20000)))
    return family, {rng.randrange(-9, 9): "an int key"}


# Keys (dotted, under any bundled space that has them) with a value that is wrong there.
KEY_SPECIFIC: list[tuple[tuple[str, ...], list[Any]]] = [
    (("workload", "rate_rps"), [0, -3, "fast", 1e-7, 5e6, [1]]),
    (("workload", "requests"), [0, -1, 10**6, 2.5, "many"]),
    (("workload", "output_tokens"), [0, -8, 10**6, {"dist": "uniform", "low": -4, "high": 8},
                                     {"dist": "lognormal", "mean": 500, "sigma": 3}, {"dist": ["x"]}]),
    (("workload", "prompt_tokens"), [0, 10**7, {"dist": "normal", "mean": 10, "std": -1},
                                     {"dist": "uniform", "low": 9, "high": 3}]),
    (("workload", "arrival"), ["poison", 7, ["poisson"]]),
    (("workload", "warmup_requests"), [-1, 10**6]),
    (("search", "trials"), [0, -5, 10**7, "ten", True]),
    (("search", "seed"), [-1, 2**32, 2**33 + 7]),
    (("search", "sampler"), ["bogus", 3, {"a": 1}]),
    (("search", "trial_timeout_s"), [0, -1, 1e9]),
    (("search", "timeout_min"), [0, -2, 1e7]),
    (("model", "preset"), ["glm-huge", 4, ["glm-tiny"]]),
    (("model", "seed"), [-3, 2**32]),
    (("model", "num_layers"), [0, 10**5]),
    (("device",), ["tpu", "cuda:x", 0]),
    (("runner",), ["glm-fly", None, 1]),
    (("study",), ["../escaped", "/abs/x", "..", "a\x01b", "x" * 101, "sp ace", "ümlaut"]),
    (("objectives",), [[], "throughput", [{"metric": "speed"}], [{"metric": ["x"]}]]),
    (("constraints",), [[{"metric": "kl_divergence"}], [{"metric": "kl_divergence", "max": "low"}]]),
]


def mutation_cases(rng: random.Random, n: int) -> list[Case]:
    from tuner.space import MAX_DEPTH

    spaces = bundled()
    cases = []
    while len(cases) < n:
        name, base = rng.choice(spaces)
        if rng.random() < 0.3:
            path, values = rng.choice(KEY_SPECIFIC)
            if path[0] in ("workload", "search", "model") and path[0] not in base:
                continue
            value, family = rng.choice(values), "wrong_for_key"
            if path == ("runner",) and value is None:
                continue  # a null runner is the default runner
            data = put(base, path, value) if len(path) > 1 else {**base, path[0]: value}
            if path[0] in ("workload", "search", "model"):
                data[path[0]] = {**base[path[0]], path[1]: value}
        else:
            path = rng.choice(key_paths(base))
            if rng.random() < 0.15 and not nullable(path):
                family, value = "null", None
            else:
                family, value = never_meant(rng, MAX_DEPTH)
            data = put(base, path, value)
        text = yaml.dump(data, allow_unicode=True, sort_keys=False)
        cases.append(Case(f"key:{family}", ["--space", "SPACE"], dotted(path), space=text))
    return cases


def alias_bomb(rng: random.Random) -> str:
    width, depth = rng.randrange(3, 12), rng.randrange(4, 10)
    lines = [f"b0: &b0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, depth + 1):
        lines.append(f"b{level}: &b{level} [{', '.join([f'*b{level - 1}'] * width)}]")
    key = rng.choice(["description", "objectives", "fixed", "workload"])
    return "\n".join(lines) + f"\n{key}: *b{depth}\nobjectives: [{{metric: throughput_tok_s}}]\n"


def file_cases(rng: random.Random, n: int) -> list[Case]:
    tags = ["!!python/object/apply:os.system ['touch PWNED']", "!!python/name:os.system", "!!python/module:os",
            "!vault abc", "!!binary aGVsbG8=", "!!timestamp 2026-12-01"]
    cases = []
    while len(cases) < n:
        kind = rng.choice(["bomb", "tag", "fifo", "devzero", "devzero_link", "dir", "big", "binary", "empty",
                           "toplist", "dupkey", "unclosed", "intkey", "recursive"])
        text = None
        if kind == "bomb":
            text = alias_bomb(rng)
        elif kind == "tag":
            text = f"study: t\n{rng.choice(['description', 'device', 'runner'])}: {rng.choice(tags)}\n" \
                   "objectives: [{metric: throughput_tok_s}]\n"
        elif kind == "toplist":
            text = "- study: x\n- objectives: []\n"
        elif kind == "dupkey":
            text = "study: a\nstudy: b\nobjectives: [{metric: throughput_tok_s}]\n"
        elif kind == "unclosed":
            text = "study: a\nworkload: {rate_rps: 5\nobjectives: [{metric: throughput_tok_s}]\n"
        elif kind == "intkey":
            text = f"study: a\n{rng.randrange(100)}: x\nobjectives: [{{metric: throughput_tok_s}}]\n"
        elif kind == "recursive":
            text = "study: a\nfixed: &r {batch_size: 2, loop: *r}\nobjectives: [{metric: throughput_tok_s}]\n"
        elif kind == "empty":
            text = rng.choice(["", "   \n", "# only a comment\n"])
        if kind == "devzero":
            cases.append(Case("file:devzero", ["--space", "/dev/zero"], "/dev/zero"))
        else:
            cases.append(Case(f"file:{kind}", ["--space", "SPACE"], "s.yaml", space=text,
                              setup=kind if text is None else ""))
    return cases


def flag_cases(rng: random.Random, n: int) -> list[Case]:
    def bad_name() -> str:
        pool = ["../", "/", "..", "\x01", "\x7f", " ", "é", "*", "$(id)", ";", "\\", "x" * 120]
        while True:
            name = "".join(rng.choice(pool + ["a", "b", "1"]) for _ in range(rng.randrange(1, 6)))
            from tuner.space import study_name_problem

            if study_name_problem(name):
                return name

    cases = []
    while len(cases) < n:
        kind = rng.choice(["study", "report_study", "worker_study", "storage", "out", "trials", "seed",
                           "timeout", "device"])
        base = ["--space", "batch_quant"]
        if kind == "study":
            cases.append(Case("flag:study", [*base, "--study", bad_name()], "--study"))
        elif kind == "report_study":
            cases.append(Case("flag:report_study", ["report", "--study", bad_name()], "--study"))
        elif kind == "worker_study":
            cases.append(Case("flag:worker_study", ["worker", "--study", bad_name()], "--study"))
        elif kind == "storage":
            value = rng.choice(["sqlite:///", "sqlite:///:memory:", "/dev/full", "/dev/null", "FIFO", "DIR",
                                "mysql://u@h/db", "postgresql+psycopg://u:pw@localhost/db",
                                "postgresql://u@h:port/db", "redis://x", "/proc/version", "sqlite:////etc/hostname",
                                "/etc/hostname", "DIR/" + "n" * 300 + ".journal"])
            cases.append(Case("flag:storage", [*base, "--storage", value], "--storage"))
        elif kind == "out":
            value = rng.choice(["/dev/full", "/dev/null/x", "/proc/version/sub", "n" * 300, "/etc/hostname"])
            cases.append(Case("flag:out", [*base, "--out", value], "--out"))
        elif kind == "trials":
            value = rng.choice(["0", "-3", str(10**7), "2.5", "lots", str(10**30)])
            cases.append(Case("flag:trials", [*base, "--trials", value],
                              "search.trials" if value.lstrip("-").isdigit() else "--trials"))
        elif kind == "seed":
            value = rng.choice(["-1", str(2**32), str(2**32 + rng.randrange(10**6)), "x"])
            cases.append(Case("flag:seed", [*base, "--seed", value], "search.seed" if value != "x" else "--seed"))
        elif kind == "timeout":
            value = rng.choice(["nan", "inf", "-inf", "-1", "0", "1e30"])
            cases.append(Case("flag:timeout_min", [*base, "--timeout-min", value], "search.timeout_min|--timeout-min"))
        else:
            value = rng.choice(["tpu", "cuda:", "cuda:-1", "gpu0", "cpu "])
            cases.append(Case("flag:device", [*base, "--device", value], "device"))
    return cases


def generate(seed: int, count: int) -> list[Case]:
    rng = random.Random(seed)
    cases = mutation_cases(rng, count * 55 // 100) + file_cases(rng, count * 20 // 100)
    cases += flag_cases(rng, count - len(cases))
    rng.shuffle(cases)
    return cases


# ---------------------------------------------------------------- running one case
