"""A fresh battery of hostile inputs through the real CLI, and a kill -9 torture of the tuner.

Inputs: >= 400 malformed cases generated from a seed (not the tests' cases: these mutate the
bundled spaces with seeded `random` generators), each run as `python -m tuner ...` in its own
empty folder with a 10 s limit; the child's peak RSS is read from `wait4`. A case passes when
it exits 2 with one line naming the key (or flag, or file), prints no traceback, creates
nothing, and stays within the time and memory limits.

Kills: a study of the real GLM runner (glm-tiny on CPU) is started and kill -9'ed again and
again, at random moments and right after a trial's child appears. 2 s after each kill no child
of it may be alive and the journal must load; at the end the study is run to completion and
its counted trials must equal its budget exactly.

    nice python -m benchmarks.hostile_battery --cases 420 --kills 30 --json /tmp/battery.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
TIME_LIMIT_S = 10.0
RSS_LIMIT_MIB = 500.0
AS_LIMIT = 4 << 30  # a safety net so a runaway case cannot take the machine down; the limit checked is RSS


@dataclass
class Case:
    kind: str
    argv: list[str]  # after `python -m tuner`; SPACE is replaced by the case's space file
    expect: str  # the key, flag or file the one error line must name ("a|b": either)
    space: str | None = None  # YAML text of the space file, if the case writes one
    setup: str = ""  # a special file to make: fifo | dir | big | devzero_link | binary


@dataclass
class Result:
    kind: str
    expect: str
    ok: bool
    exit: int | None
    wall_s: float
    rss_mib: float
    problems: list[str] = field(default_factory=list)
    stderr: str = ""


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
    from tuner.space import _NULL_OK

    return len(path) == 1 or path[0] == "fixed" or "choices" in path or tuple(path) in _NULL_OK


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


def _setup(case: Case, folder: Path) -> list[str]:
    argv = list(case.argv)
    space = folder / "s.yaml"
    if case.space is not None:
        space.write_text(case.space)
    elif case.setup == "fifo":
        os.mkfifo(space)
    elif case.setup == "dir":
        space.mkdir()
    elif case.setup == "big":
        space.write_text("description: " + "x" * (2 << 20) + "\n")
    elif case.setup == "devzero_link":
        space.symlink_to("/dev/zero")
    elif case.setup == "binary":
        space.write_bytes(bytes(random.Random(len(str(folder))).randrange(256) for _ in range(512)) + b"\xff\xfe")
    argv = [str(space) if a == "SPACE" else a for a in argv]
    special = folder / "special"
    special.mkdir()
    fifo = special / "fifo.journal"
    os.mkfifo(fifo)
    return [a.replace("FIFO", str(fifo)).replace("DIR", str(special)) if a.startswith(("FIFO", "DIR")) else a
            for a in argv]


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


def run_case(case: Case) -> Result:
    with tempfile.TemporaryDirectory(prefix="battery-") as tmp:
        folder = Path(tmp)
        argv = _setup(case, folder)
        before = _tree(folder)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "tuner", *argv], cwd=folder, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_limit_memory)
        status, usage, timed_out = _wait(proc, started)
        wall = time.monotonic() - started
        out, err = proc.stdout.read().decode("utf-8", "replace"), proc.stderr.read().decode("utf-8", "replace")
        proc.stdout.close()
        proc.stderr.close()
        code = None if timed_out else os.waitstatus_to_exitcode(status)
        rss = usage.ru_maxrss / 1024 if usage else float("nan")
        problems = []
        if timed_out:
            problems.append(f"ran past {TIME_LIMIT_S} s")
        if code != 2:
            problems.append(f"exit {code}")
        if "Traceback" in err or "Traceback" in out:
            problems.append("traceback")
        if err.count("\n") != 1:
            problems.append(f"{err.count(chr(10))} stderr lines")
        if not any(name in err for name in case.expect.split("|")):
            problems.append(f"does not name {case.expect!r}")
        if rss > RSS_LIMIT_MIB:
            problems.append(f"RSS {rss:.0f} MiB")
        created = _tree(folder) - before
        if created:
            problems.append(f"created {sorted(created)[:3]}")
        if (folder / "PWNED").exists():
            problems.append("a tag ran code")
        return Result(case.kind, case.expect, not problems, code, round(wall, 3), round(rss, 1), problems,
                      err.strip()[-300:])


def _wait(proc: subprocess.Popen, started: float) -> tuple[int, Any, bool]:
    """wait4 for the child's own rusage (peak RSS), killing it at the time limit."""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return status, usage, False
        if time.monotonic() - started > TIME_LIMIT_S:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            return status, usage, True
        time.sleep(0.02)


def run_inputs(seed: int, count: int, jobs: int) -> dict[str, Any]:
    cases = generate(seed, count)
    started = time.time()
    with ThreadPoolExecutor(jobs) as pool:
        results = list(pool.map(run_case, cases))
    failed = [asdict(r) for r in results if not r.ok]
    return {
        "cases": len(results), "passed": sum(r.ok for r in results), "seed": seed,
        "kinds": dict(Counter(r.kind.split(":")[0] + ":" + r.kind.split(":")[1] for r in results)),
        "exit_2": sum(r.exit == 2 for r in results),
        "tracebacks": sum("traceback" in r.problems for r in results),
        "created": sum(any(p.startswith("created") for p in r.problems) for r in results),
        "key_named": sum(not any(p.startswith("does not name") for p in r.problems) for r in results),
        "max_wall_s": max(r.wall_s for r in results), "max_rss_mib": max(r.rss_mib for r in results),
        "wall_s": round(time.time() - started, 1), "failed": failed[:40],
    }


# ---------------------------------------------------------------- kill -9 torture


def _torture_space(path: Path, trials: int) -> None:
    path.write_text(yaml.safe_dump({
        "study": "torture", "runner": "glm-infer", "model": {"preset": "glm-tiny"}, "device": "cpu",
        "workload": {"arrival": "poisson", "rate_rps": 200, "requests": 6, "warmup_requests": 1,
                     "prompt_tokens": 8, "output_tokens": 4, "eval_sequences": 2, "eval_tokens": 16},
        "params": {"batch_size": {"type": "int", "low": 1, "high": 8}},
        "objectives": [{"metric": "throughput_tok_s", "direction": "maximize"}],
        "search": {"sampler": "random", "trials": trials, "seed": 3, "trial_timeout_s": 300},
    }))


def _children_of(pid: int) -> list[int]:
    """Trial children started by tuner `pid` (their environment names it), alive or not reaped."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            if b"runners.child" not in cmd:
                continue
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"AUTOGLM_TUNE_PARENT_PID={pid}".encode() in env and state != "Z":
            found.append(int(entry.name))
    return found


def _counted(journal: Path) -> tuple[int, int, list[str]]:
    """(counted trials, RUNNING trials, states) read with plain Optuna (no repair)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from tuner.study import counted_trials

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="torture", storage=JournalStorage(JournalFileBackend(str(journal))))
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    return counted_trials(study), states.count("RUNNING"), states


def run_kills(seed: int, kills: int, trials: int) -> dict[str, Any]:
    rng = random.Random(seed + 1)
    folder = Path(tempfile.mkdtemp(prefix="torture-"))
    space = folder / "torture.yaml"
    _torture_space(space, trials)
    journal = folder / "optuna.journal"
    command = [sys.executable, "-m", "tuner", "--space", str(space), "--storage", str(journal),
               "--out", str(folder / "out"), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log, orphans, unreadable, moments = [], 0, 0, Counter()
    started = time.time()
    budget, killed, i = trials, 0, 0
    while killed < kills:
        i += 1
        tuner = subprocess.Popen([*command, "--trials", str(budget)], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True)
        moment = rng.choice(["child_start", "child_start", "child_start", "random", "random_long"])
        seen: list[int] = []
        wait_s = {"child_start": 60.0, "random": rng.uniform(0.2, 12.0), "random_long": rng.uniform(15.0, 60.0)}
        deadline = time.monotonic() + wait_s[moment]  # long waits let trials complete between kills
        while time.monotonic() < deadline and tuner.poll() is None:
            seen = _children_of(tuner.pid) or seen
            if moment == "child_start" and seen:
                time.sleep(rng.uniform(0.0, 0.3))
                break
            time.sleep(0.01)
        finished = tuner.poll() is not None
        if not finished:
            os.kill(tuner.pid, signal.SIGKILL)
            killed += 1
        tuner.wait()
        moments[moment if not finished else "finished_first"] += 1
        time.sleep(2.0)
        alive = _children_of(tuner.pid)
        orphans += len(alive)
        for pid in alive:  # clean up what the check found, so later rounds are not skewed
            os.kill(pid, signal.SIGKILL)
        try:
            counted, running, _ = _counted(journal) if journal.exists() else (0, 0, [])
        except Exception as exc:  # noqa: BLE001 - an unreadable journal is what this measures
            unreadable += 1
            counted, running = -1, -1
            log.append({"kill": i, "journal_error": repr(exc)[:200]})
        log.append({"kill": i, "moment": moment, "finished": finished, "child_seen": bool(seen), "orphans": alive,
                    "counted": counted, "running_left": running, "budget": budget})
        budget = max(budget, counted + 2)  # a raised --trials (the study's total): always work left to kill
    final = subprocess.run([*command, "--trials", str(budget)], env=env, capture_output=True, text=True,
                           timeout=1800)
    counted, running, states = _counted(journal)
    return {"kills": killed, "rounds": i,
            "moments": dict(moments), "orphans_after_2s": orphans, "journal_unreadable": unreadable,
            "final_exit": final.returncode, "budget": budget, "counted": counted, "running_left": running,
            "states": dict(Counter(states)), "budget_exact": counted == budget and running == 0,
            "wall_s": round(time.time() - started, 1), "folder": str(folder), "log": log}


def machine() -> str:
    return f"{socket.gethostname()} ({platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=420)
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--trials", type=int, default=6, help="first budget of the tortured study (raised as it fills)")
    p.add_argument("--seed", type=int, default=20261201)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", help="write the whole summary here")
    args = p.parse_args(argv)
    summary: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine()}
    if args.cases:
        summary["inputs"] = run_inputs(args.seed, args.cases, args.jobs)
        print(json.dumps({k: v for k, v in summary["inputs"].items() if k != "failed"}, indent=1), flush=True)
        for failure in summary["inputs"]["failed"][:10]:
            print("FAILED", failure["kind"], failure["expect"], failure["problems"], failure["stderr"][-160:])
    if args.kills:
        summary["kills"] = run_kills(args.seed, args.kills, args.trials)
        print(json.dumps({k: v for k, v in summary["kills"].items() if k != "log"}, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    inputs_ok = not args.cases or summary["inputs"]["passed"] == summary["inputs"]["cases"]
    kills = summary.get("kills")
    kills_ok = not kills or (kills["orphans_after_2s"] == 0 and kills["journal_unreadable"] == 0
                             and kills["budget_exact"])
    return 0 if inputs_ok and kills_ok else 1


if __name__ == "__main__":
    sys.exit(main())
