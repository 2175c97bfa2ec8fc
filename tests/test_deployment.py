"""A real federation on loopback, as docs/how-to/coordinate.md and join-as-site.md set it
up: TLS SuperLink with SuperNode authentication, one SuperNode per site folder, ``flwr
run``, and faults.

Every process is started in its own session and stopped by PID (its process
group) at the end. Marked slow (about 3 minutes); ``.ci/run`` runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedscan.common.data.datasets.synthetic import generate
from fedscan.deploy.pki import make_dev_pki

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _text(path: Path) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", path.read_text(errors="replace")) if path.exists() else ""


class Processes:
    """Long-running Flower processes of one test, each in its own process group."""

    def __init__(self, logs: Path, env: dict[str, str]) -> None:
        self.logs, self.env, self.procs = logs, env, {}

    def start(self, name: str, *cmd: str) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        return self.procs[name]

    def log(self, name: str) -> str:
        return _text(self.logs / f"{name}.log")

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the process and its children (SuperExec, apps)
        proc.wait(timeout=30)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.kill(name)


@pytest.fixture
def loopback(tmp_path: Path) -> Iterator[tuple[Processes, Path, dict[str, str]]]:
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("FEDSCAN_DATA", None)
    (tmp_path / "logs").mkdir()
    procs = Processes(tmp_path / "logs", env)
    yield procs, tmp_path, env
    procs.stop_all()
    alive = [n for n, p in procs.procs.items() if p.poll() is None]
    assert not alive, f"still running after kill: {alive}"
    _wait_for(lambda: not _processes_mentioning(tmp_path), 20, "no process left behind")


def _processes_mentioning(path: Path) -> list[str]:
    """Command lines of live processes that mention ``path`` (this test's processes)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmd:
            found.append(cmd)
    return found


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secaggplus"])
def test_tls_federation_with_authenticated_sites_survives_a_killed_site(loopback, secure) -> None:
    """``secure``: the same run under SecAgg+ with a fourth site, site-d (4 shares, so
    every site holds a share of every other's secrets; threshold 2). In round 1 site-d
    dies at its first train message, before sharing its keys: the round goes on
    without it instead of halting at unmasking; site-c dies after it has shared its
    keys (at its third train message: setup, key sharing, masked update), so the two
    others' shares rebuild what its masks hid."""
    procs, tmp, env = loopback
    # Step 1 of the runbook: keys. Three hospitals, plus a machine nobody registered.
    pki = tmp / "pki"
    sites = ["site-a", "site-b", "site-c", *(["site-d"] if secure else [])]
    make_dev_pki(pki, sites=[*sites, "intruder", "plaintext"], hosts=["127.0.0.1"])
    sizes = {"site-a": 20, "site-b": 15, "site-c": 15, "site-d": 10, "intruder": 5}
    data = {
        site: generate(tmp / "data" / site, "brain_mri", per_class=n, size=64, seed=11 + i)
        for i, (site, n) in enumerate(sizes.items())
        if site in (*sites, "intruder")
    }
    port = _free_port()
    home = Path(env["FLWR_HOME"])
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "fedscan"\n\n[superlink.fedscan]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{pki / "ca.crt"}"\n'
    )
    # Step 2: the SuperLink, TLS and SuperNode authentication on.
    procs.start(
        "superlink",
        "flower-superlink",
        "--ssl-ca-certfile", str(pki / "ca.crt"),
        "--ssl-certfile", str(pki / "superlink.crt"),
        "--ssl-keyfile", str(pki / "superlink.key"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--database", str(tmp / "state.db"),
        "--host", "127.0.0.1",
        "--port", str(port),
    )  # fmt: skip
    _wait_for(lambda: "Uvicorn running" in procs.log("superlink"), 60, "the SuperLink")
    # Step 3: register the three hospitals' public keys.
    for site in (*sites, "plaintext"):
        out = subprocess.run(
            ["flwr", "supernode", "register", str(pki / "sites" / site / f"{site}.pub"), "fedscan"],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "registered successfully" in out.stdout, out.stdout + out.stderr
    # Step 4: one SuperNode per site, each with its own folder.
    for site in data:
        procs.start(
            site,
            "flower-supernode",
            "--root-certificates", str(pki / "ca.crt"),
            "--superlink", f"127.0.0.1:{port}",
            "--auth-supernode-private-key", str(pki / "sites" / site / f"{site}.key"),
            "--node-config", f'data-path="{data[site]}"',
            "--port", str(_free_port()),
        )  # fmt: skip
    # A registered key without TLS: the SuperLink speaks TLS only, so it never connects.
    procs.start(
        "plaintext",
        "flower-supernode",
        "--insecure",
        "--superlink", f"127.0.0.1:{port}",
        "--auth-supernode-private-key", str(pki / "sites" / "plaintext" / "plaintext.key"),
        "--node-config", f'data-path="{data["intruder"]}"',
        "--port", str(_free_port()),
        "--max-retries", "2",
        "--max-wait-time", "20",
    )  # fmt: skip
    # The unregistered key is refused at activation and the process exits.
    intruder = procs.procs["intruder"]
    _wait_for(lambda: intruder.poll() is not None, 90, "the intruder SuperNode to be refused")
    assert intruder.returncode != 0
    assert "Failed to activate SuperNode" in procs.log("intruder")
    ids = {}
    for site in sites:
        _wait_for(lambda s=site: "SuperNode ID:" in procs.log(s), 90, f"{site} to connect")
        ids[site] = int(re.search(r"SuperNode ID: (\d+)", procs.log(site)).group(1))
    listing = subprocess.run(
        ["flwr", "supernode", "list", "fedscan", "--format", "json"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    plaintext = procs.procs["plaintext"]
    _wait_for(lambda: plaintext.poll() is not None, 120, "the plaintext SuperNode to give up")
    assert plaintext.returncode != 0
    assert "SuperNode ID:" not in procs.log("plaintext")
    nodes = {int(n["node-id"]): n["status"] for n in json.loads(listing.stdout)["nodes"]}
    online = {i for i, status in nodes.items() if status == "online"}
    assert online == set(ids.values())  # neither the intruder nor the plaintext node
    assert len(nodes) == len(sites) + 1  # the sites and the registered-never-connected one

    # Step 5: submit the run; site-c dies as soon as its first training starts.
    runs = tmp / "runs"
    run_config = (
        f"dataset='synthetic' num-rounds=2 runs-dir='{runs}' "
        "overrides='model.mode=features train.lr=0.01 federation.local_epochs=3 "
        "federation.min_nodes=2 federation.round_timeout_s=240"
        + (" secure_aggregation=secaggplus secure_aggregation.num_shares=4'" if secure else "'")
    )
    run = procs.start(
        "flwr-run", "flwr", "run", str(ROOT), "fedscan", "--stream", "--run-config", run_config
    )
    if secure:  # site-d: gone at its first train message (setup), before sharing its keys
        _wait_for(
            lambda: "Receiving: train message" in procs.log("site-d"), 240, "round 1 at site-d"
        )
        procs.kill("site-d")
    messages = 3 if secure else 1
    _wait_for(
        lambda: procs.log("site-c").count("Receiving: train message") >= messages,
        240 * messages,
        "round 1 at site-c",
    )
    procs.kill("site-c")
    _wait_for(lambda: run.poll() is not None, 420, "the run to finish")
    text = procs.log("flwr-run")
    match = re.search(r"fedscan: results in (\S+)", text)
    assert match, text[-4000:]
    rounds = json.loads((Path(match.group(1)) / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:  # both rounds aggregated the two surviving sites
        assert {s["node_id"] for s in r["sites"]["train"]} == {ids["site-a"], ids["site-b"]}
    examples = {s["node_id"]: s["num-examples"] for s in rounds[0]["sites"]["train"]}
    # each site trained on its own folder (80 and 60 images, less its own validation split)
    assert examples[ids["site-a"]] > examples[ids["site-b"]] > 40
    # the two hospitals' model learned the (synthetic) task: chance is 0.25
    assert rounds[-1]["global"]["test_grouped"]["accuracy"] >= 0.8
    if secure:  # both rounds ran the protocol; round 1 rebuilt the lost site's masks
        assert text.count("Secure aggregation completed.") == 2, text[-4000:]
        before = rf"site\(s\) {ids['site-d']} left SecAgg\+ at the (setup|share keys) stage"
        assert re.search(before, text), text[-4000:]
        assert f"site(s) {ids['site-c']} dropped after sharing their keys" in text
        assert "halted" not in text
        return
    assert f"no update from node {ids['site-c']}" in text  # no site-name: its node id
    assert "Node Unavailable" in text


def _rehearsal_processes(rehearsal_dir: Path) -> list[str]:
    """Command lines of live processes the rehearsal started: they all inherit its
    ``FLWR_HOME`` (the SuperLink, the SuperNodes, their flower-superexec, flwr-clientapp)."""
    mark = f"FLWR_HOME={rehearsal_dir / 'flwr-home'}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if mark in (proc / "environ").read_bytes().split(b"\0"):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return found


def _rehearsal(tmp_path: Path) -> tuple[list[str], dict[str, str], Path]:
    """``bash deploy/rehearsal.sh`` as docs/tutorials/first-federation.md shows it, in
    ``tmp_path`` on free ports."""
    port = _free_port()
    while not all(_port_free(port + k) for k in range(3)):
        port = _free_port()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "REHEARSAL_DIR": str(tmp_path / "rehearsal"),
        "REHEARSAL_PORT": str(port),
        "REHEARSAL_TIMEOUT_S": "240",
    }
    env.pop("FEDSCAN_DATA", None)
    return ["bash", str(ROOT / "deploy" / "rehearsal.sh")], env, tmp_path / "rehearsal"


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_the_rehearsal_script_runs_as_written_and_leaves_no_process_behind(
    tmp_path: Path,
) -> None:
    """The tutorial's rehearsal (docs/tutorials/first-federation.md), as a user runs it: it
    waits for each service (no fixed sleep), the federation completes, and every process it
    started is gone."""
    cmd, env, rehearsal = _rehearsal(tmp_path)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    for said in ("the SuperLink: ready after", "SuperNode hospital-b: ready after", "all stopped"):
        assert said in text, said
    assert "status finished:completed" in text
    (run,) = [d for d in (rehearsal / "runs").iterdir() if not d.name.startswith(".")]
    rounds = json.loads((run / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert _rehearsal_processes(rehearsal) == []


def test_a_stopped_rehearsal_stops_every_process_it_started(tmp_path: Path) -> None:
    """Stopped mid-round (a busy flwr-clientapp, the flower-superexec of the SuperLink and
    of each SuperNode): nothing it started outlives it."""
    cmd, env, rehearsal = _rehearsal(tmp_path)
    log = open(tmp_path / "rehearsal.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for(
            lambda: any("flwr-clientapp" in c for c in _rehearsal_processes(rehearsal)),
            600,
            "a flwr-clientapp at work",
        )
        started = _rehearsal_processes(rehearsal)
        assert any("flower-superexec" in c for c in started), started
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = _text(tmp_path / "rehearsal.log")
    assert proc.returncode != 0 and "all stopped" in text, text[-3000:]
    assert _rehearsal_processes(rehearsal) == []
