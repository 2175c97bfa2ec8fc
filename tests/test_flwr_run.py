"""`flwr run .` through a real local SuperLink (simulation), stopped by PID afterwards."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Real `flwr run` processes (a SuperLink, SuperNodes, a federation each): .ci/run's slow stage.
pytestmark = pytest.mark.slow


def _superlinks_of(flwr_home: Path) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmd and str(flwr_home) in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def flwr_env(tmp_path: Path):
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("FEDSCAN_DATA", None)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    yield env
    for pid in _superlinks_of(home):
        os.kill(pid, 9)


def _flwr_run(runs: Path, env: dict, *extra: str) -> tuple[Path, str]:
    """`flwr run .` of 2 rounds of the small paper_cnn on the embedded default, with
    ``extra`` overrides; the run folder it announced, and its output."""
    small = " ".join(["dataset.image_size=32 dataset.size=32 dataset.per_class=24", *extra])
    cmd = [
        "flwr",
        "run",
        ".",
        "--stream",
        "--run-config",
        f"runs-dir='{runs}' num-rounds=2 model='paper_cnn' overrides='{small}'",
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    text = out.stdout + out.stderr
    match = re.search(r"fedscan: results in (\S+)", text)
    assert match, text[-3000:]
    return Path(match.group(1)), text


def test_flwr_run_out_of_the_box(tmp_path: Path, flwr_env):
    runs = tmp_path / "runs"
    run, _ = _flwr_run(runs, flwr_env)
    assert run.parent == runs
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert len(rounds[-1]["sites"]["train"]) == 2  # the default local federation: 2 SuperNodes
    assert _superlinks_of(Path(flwr_env["FLWR_HOME"]))  # it outlives the CLI; the fixture stops it


def test_a_failed_run_gives_a_failing_exit_status_through_fedscan(tmp_path: Path, flwr_env):
    """flwr's CLI exits 0 for a run whose ServerApp fails; ``fedscan flwr-run`` exits 1."""
    cmd = [
        sys.executable,
        "-m",
        "fedscan",
        "flwr-run",
        ".",
        "--stream",
        "--run-config",
        f"runs-dir='{tmp_path / 'runs'}' overrides='train.epochs=0'",  # refused by the server
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=flwr_env, capture_output=True, text=True, timeout=400)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text[-3000:]
    assert re.search(r"fedscan: run \d+ status finished:failed", text), text[-3000:]


def test_flwr_run_with_secure_aggregation(tmp_path: Path, flwr_env):
    """`flwr run .` (the local SuperLink, 2 SuperNodes) with SecAgg+ from the run config:
    every round ran the protocol; with 2 sites each site's secrets go to both."""
    run, text = _flwr_run(tmp_path / "runs", flwr_env, "secure_aggregation=secaggplus")
    assert text.count("Secure aggregation completed.") == 2, text[-3000:]
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert len(rounds[-1]["sites"]["train"]) == 2
