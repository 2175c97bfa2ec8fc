"""Faults a federation must survive, end to end on the embedded synthetic default:
a poisoned (x100) update against robust strategies, and a coordinator killed
after round k that resumes at k+1 and loses nothing.

(A site killed mid-round on real processes is in ``test_deployment.py``; NaN,
shape and name rejects are in ``test_strategies.py``.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message

from fedscan.simulations.federated import run_federated
from tests.conftest import SIM_BASE as SMALL

ROOT = Path(__file__).resolve().parents[1]
ATTACKER = 0
FACTOR = 100.0

# Five sites, EfficientNet-Lite0 features mode: learns the synthetic task in three rounds.
BASE = [
    "dataset=synthetic",
    "dataset.per_class=150",
    "model.mode=features",
    "train.lr=0.01",
    "federation.num_sites=5",
    "federation.min_nodes=5",
    "federation.rounds=3",
    "federation.local_epochs=2",
    "federation.fraction_evaluate=0",
    "federation.evaluate_every=3",
]


pytestmark = pytest.mark.usefixtures("_no_real_data")


def scaled_update_mod(msg: Message, context, call_next) -> Message:
    """A malicious site: sends global + FACTOR x (its honest update - global)."""
    reply = call_next(msg, context)
    is_train = msg.metadata.message_type == "train"  # MessageType.TRAIN; Ray cannot pickle it
    if not is_train or reply.has_error():
        return reply
    if int(context.node_config.get("partition-id", -1)) != ATTACKER:
        return reply
    sent = msg.content["arrays"].to_torch_state_dict()
    got = reply.content["arrays"].to_torch_state_dict()
    poisoned = {
        k: sent[k] + FACTOR * (v - sent[k]) if v.is_floating_point() else v for k, v in got.items()
    }
    reply.content["arrays"] = ArrayRecord(poisoned)
    return reply


def _accuracy(run: Path) -> float:
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    return rounds[-1]["global"]["test_grouped"]["accuracy"]


@pytest.mark.slow
def test_robust_strategies_hold_against_a_scaled_update(tmp_path: Path) -> None:
    """Each strategy with and without the attacker; 120 test images (0.8 points each)."""
    acc = {}
    for name in ("fedavg", "fedmedian", "fedtrimmedavg"):
        for attacked in (False, True):
            run = run_federated(
                [*BASE, f"strategy={name}", f"runs_dir={tmp_path / name / str(attacked)}"],
                client_mods=[scaled_update_mod] if attacked else [],
            )
            acc[name, attacked] = _accuracy(run)
    pairs = {n: (acc[n, False], acc[n, True]) for n, _ in acc}
    print(f"test accuracy clean -> attacked x{FACTOR:g}: {pairs}")
    assert acc["fedavg", False] >= 0.85  # the clean federation learns the task
    assert acc["fedavg", True] < acc["fedavg", False] - 0.1  # the attack breaks plain averaging
    for name in ("fedmedian", "fedtrimmedavg"):  # ... and not the robust aggregators:
        # within 2 points of their own clean run and of the clean FedAvg run
        assert acc[name, True] >= acc[name, False] - 0.02, (name, acc)
        assert acc[name, True] >= acc["fedavg", False] - 0.02, (name, acc)


def _latest_round(runs: Path) -> int:
    for ckpt in runs.glob("*/last.pt"):
        try:
            return int(torch.load(ckpt, weights_only=False)["round"])
        except Exception:  # being replaced right now
            return 0
    return 0


@pytest.mark.slow
def test_coordinator_killed_after_round_k_resumes_at_k_plus_1(tmp_path: Path) -> None:
    small = [*SMALL, "federation.rounds=4"]
    reference = run_federated([*small, f"runs_dir={tmp_path / 'reference'}"])

    runs = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "FEDSCAN_DATA"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedscan", "simulate", *small, f"runs_dir={runs}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while _latest_round(runs) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and its Ray workers, no cleanup
    proc.wait(timeout=30)
    (run_dir,) = [p for p in runs.iterdir() if not p.name.startswith(".")]  # not .mlflow
    killed_at = int(torch.load(run_dir / "last.pt", weights_only=False)["round"])
    assert 2 <= killed_at < 4, "the kill must land after round 2 and before the last round"
    before = json.loads((run_dir / "metrics.json").read_text())["rounds"]

    resumed = run_federated([*small, f"runs_dir={runs}", f"federation.resume={run_dir}"])
    assert resumed == run_dir
    after = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in after] == [1, 2, 3, 4]
    for old, new in zip(before[:killed_at], after[:killed_at], strict=True):
        assert old["global"] == new["global"] and old["sites"] == new["sites"]  # nothing lost
    a = torch.load(reference / "last.pt", weights_only=False)
    b = torch.load(run_dir / "last.pt", weights_only=False)
    assert a["round"] == b["round"] == 4
    for k in a["arrays"]:  # the same model as a run that was never interrupted
        torch.testing.assert_close(a["arrays"][k], b["arrays"][k], rtol=0, atol=1e-6)
