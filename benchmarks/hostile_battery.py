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

from benchmarks.hostile_cases import Case, generate

ROOT = Path(__file__).resolve().parent.parent
TIME_LIMIT_S = 10.0
RSS_LIMIT_MIB = 500.0
AS_LIMIT = 4 << 30  # a safety net so a runaway case cannot take the machine down; the limit checked is RSS


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
