"""One installed import package: the wheel holds ``fedscan`` and nothing else at the top
level, every module of the repository's folders is in it, and it runs where another
top-level ``common`` module comes first on the path (the clash the old layout had)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fedscan

ROOT = Path(__file__).resolve().parents[1]
PIP = [sys.executable, "-m", "pip"]
FOLDERS = ("common", "client", "server", "simulations", "deploy", "configs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [*PIP, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        capture_output=True,
    )
    (found,) = out.glob("fedscan-*.whl")
    return found


def test_the_wheel_holds_one_top_level_package_and_every_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fedscan"}
    source = {
        f"fedscan/{p.relative_to(ROOT).as_posix()}"
        for folder in FOLDERS
        for p in (ROOT / folder).rglob("*")
        if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts
    }
    assert source - set(names) == set()  # a new sub-package must be listed in pyproject.toml
    assert f"fedscan-{fedscan.__version__}.dist-info/METADATA" in names


def test_the_installed_wheel_runs_beside_an_unrelated_common_module(
    wheel: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
    )
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "common.py").write_text("CLASH = True\n")  # someone else's `common`
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(site)])}
    probe = (
        "import common, fedscan.common.core.config as c, fedscan.server.app, fedscan.client.app\n"
        "assert common.CLASH\n"
        f"assert c.__file__.startswith({str(site)!r}), c.__file__\n"
        "print(c.config_dir())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(site / "fedscan" / "configs")
    for cmd in (
        [str(site / "bin" / "fedscan"), "--version"],
        [sys.executable, "-m", "fedscan", "--version"],
    ):
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == f"fedscan {fedscan.__version__}"


def test_flower_accepts_the_app_and_its_version_is_fedscans() -> None:
    """``flwr run`` validates pyproject.toml before anything runs: a dynamic version
    (no ``version`` in [project]) made every ``flwr run .`` fail at once."""
    from flwr.cli.config_utils import load_and_validate

    config, _ = load_and_validate(ROOT / "pyproject.toml", check_module=False)
    assert config["project"]["version"] == fedscan.__version__
