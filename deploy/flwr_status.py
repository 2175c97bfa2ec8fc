"""A real exit status for ``flwr run``.

flwr 1.42's CLI exits 0 when the run it started fails (the ServerApp's traceback
and "Exit Code: 700" are printed, the status is ``finished:failed``), so scripts
around a deployment cannot see a failure. The run's final status is what the
SuperLink records, and ``flwr ls --run-id ID --format json`` reports it.
``fedscan flwr-run ARGS`` runs ``flwr run ARGS``, reads the run id it prints,
asks for that status and exits with it; ``fedscan run-status ID`` asks alone.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

# exit codes: 0 finished:completed, 1 finished:failed / stopped, 3 not finished yet
EXIT = {"completed": 0, "failed": 1, "stopped": 1}
STARTED = re.compile(r"Successfully started run (\d+)")


def run_status(run_id: int, *, superlink: str | None = None, cwd: Path | None = None) -> str:
    """The SuperLink's status text of ``run_id`` (e.g. ``finished:completed``)."""
    cmd = ["flwr", "ls", *([superlink] if superlink else []), "--run-id", str(run_id)]
    out = subprocess.run(
        [*cmd, "--format", "json"], cwd=cwd, capture_output=True, text=True, check=False
    )
    try:
        doc = json.loads(out.stdout)
    except json.JSONDecodeError:
        said = (out.stdout + out.stderr)[-800:]
        raise RuntimeError(f"`{' '.join(cmd)}` gave no JSON: {said}") from None
    runs = doc.get("runs") or []
    if not doc.get("success", True) or not runs:
        raise RuntimeError(f"`{' '.join(cmd)}`: {doc.get('error-message', doc)}")
    return str(runs[0]["status"])


def exit_code(status: str) -> int:
    """0 completed, 1 failed or stopped, 3 still pending / starting / running."""
    if not status.startswith("finished"):
        return 3
    return EXIT.get(status.rsplit(":", 1)[-1], 1)


def wait_status(
    run_id: int, *, superlink: str | None = None, cwd: Path | None = None, timeout_s: float = 30
) -> str:
    """The status once the run has finished (the SuperLink sets it shortly after the
    stream ends), or the last one seen after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    status = run_status(run_id, superlink=superlink, cwd=cwd)
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(1.0)
        status = run_status(run_id, superlink=superlink, cwd=cwd)
    return status


def flwr_run(args: Sequence[str], *, cwd: Path | None = None) -> int:
    """``flwr run ARGS`` with its output passed through; exits with the run's final status.

    Without ``--stream`` the CLI returns as soon as the run is submitted; the status
    is then that of a run still going (3), as ``flwr ls`` would say.
    """
    proc = subprocess.Popen(
        ["flwr", "run", *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run_id = None
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        m = STARTED.search(line)
        if m and run_id is None:
            run_id = int(m.group(1))
    code = proc.wait()
    if run_id is None:
        print("fedscan: flwr run started no run (see above)", file=sys.stderr)
        return code or 1
    superlink = _superlink_arg(args)
    status = (
        wait_status(run_id, superlink=superlink, cwd=cwd)
        if "--stream" in args
        else (run_status(run_id, superlink=superlink, cwd=cwd))
    )
    print(f"fedscan: run {run_id} status {status}", file=sys.stderr)
    return exit_code(status)


def _superlink_arg(args: Sequence[str]) -> str | None:
    """``flwr run APP [SUPERLINK]``: the connection name when given (positional two)."""
    takes_value = {"--run-config", "--federation-config", "-c", "--format"}  # + the next word
    words, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in takes_value:
            skip = True
            continue
        if not a.startswith("-"):
            words.append(a)
    return words[1] if len(words) > 1 else None
