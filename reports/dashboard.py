"""`autoglm-tune dashboard [--storage URL] [--port P]`: the Streamlit app on 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

from tuner.errors import UsageError

# app.py sits at the repository root, next to the reports package (an editable install).
APP = Path(__file__).resolve().parent.parent / "app.py"


def parser() -> argparse.ArgumentParser:
    from tuner.cli import Parser

    p = Parser(prog="autoglm-tune dashboard", description="Start the Streamlit dashboard on 127.0.0.1.")
    p.add_argument("--storage", default=None, help="default: $AUTOGLM_TUNE_STORAGE, else runs/optuna.journal")
    p.add_argument("--port", type=int, default=8501)
    return p


def command(storage_url: str, port: int) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", "127.0.0.1",
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "viewer",
            "--", "--storage", storage_url]


def main(argv: list[str]) -> int:
    from tuner.storage import DEFAULT_STORAGE, open_existing_storage

    args = parser().parse_args(argv)
    url = args.storage or os.environ.get("AUTOGLM_TUNE_STORAGE") or DEFAULT_STORAGE
    open_existing_storage(url)  # a missing journal is a usage error here, not a blank page
    if not APP.is_file():
        raise UsageError(f"dashboard: {APP} not found (run from a source checkout: pip install -e .)")
    print(f"dashboard for {url} on http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
    return serve(command(url, args.port))


def serve(cmd: list[str]) -> int:
    """Run Streamlit in its own process group and take the whole group down with us.

    `kill PID` (SIGTERM), SIGHUP and Ctrl-C all end Streamlit and anything it started;
    without this a SIGTERM to the CLI left Streamlit serving on the port.
    """
    proc = subprocess.Popen(cmd, start_new_session=True)

    def stop(signum: int, _frame: object) -> None:
        raise _Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return proc.wait()
    except (KeyboardInterrupt, _Stopped):
        _stop_group(proc)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            _stop_group(proc)


class _Stopped(Exception):
    """A termination signal arrived (raised from the handler to leave `wait`)."""


def _stop_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to Streamlit's process group; SIGKILL what is left after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
