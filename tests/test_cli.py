"""End to end: the main command on the embedded synthetic default."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fedscan.common.core.config import load_config
from fedscan.common.core.errors import ConfigError
from fedscan.simulations.cli import build_parser, main


def test_help_lists_commands():
    text = build_parser().format_help()
    for cmd in ("train", "audit", "config"):
        assert cmd in text


def test_train_on_synthetic_default_writes_a_labelled_run(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("FEDSCAN_DATA", raising=False)
    code = main(
        [
            "train",
            f"runs_dir={tmp_path}",
            "model=paper_cnn",
            "dataset.image_size=32",
            "train.epochs=2",
            "dataset.per_class=16",
            "dataset.size=32",
        ]
    )
    assert code == 0
    (run,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # not .mlflow
    for name in ("config.yaml", "metrics.json", "curves.png", "confusion_matrix.png", "model.pt"):
        assert (run / name).stat().st_size > 0, name
    m = json.loads((run / "metrics.json").read_text())
    assert m["synthetic"] is True and "SYNTHETIC" in m["label"]
    assert len(m["history"]) == 2
    assert set(m["final"]) == {"val", "test_grouped"}
    test = m["final"]["test_grouped"]
    assert 0.0 <= test["accuracy"] <= 1.0
    # the test figures carry a bootstrap interval over the split's groups; val none
    ci = test["ci"]
    assert ci["resamples"] == 1000 and 1 < ci["groups"] <= test["n"]
    assert ci["accuracy"][0] <= test["accuracy"] <= ci["accuracy"][1]
    assert "ci" not in m["final"]["val"]


def test_feature_cache_path_trains(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("FEDSCAN_DATA", raising=False)
    code = main(
        [
            "train",
            f"runs_dir={tmp_path}",
            "train.epochs=4",
            "train.batch_size=16",
            "train.cached_flips=true",
            "dataset.per_class=40",
        ]
    )
    assert code == 0
    (run,) = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]  # not .mlflow
    m = json.loads((run / "metrics.json").read_text())
    assert m["model"] == "efficientnet_lite0" and m["mode"] == "finetune"
    # a pretrained trunk separates the synthetic classes easily
    assert m["final"]["test_grouped"]["accuracy"] >= 0.75
    # train.cached_flips (brain's default; the synthetic default's is off): the prefix
    # also ran over the mirrored training images, once, into a file of their rows only
    features = Path(os.environ["FEDSCAN_CACHE"]) / "features"
    (mirrored,) = features.glob("*-mirrored-*.npy")
    assert len(np.load(mirrored, mmap_mode="r")) == m["splits"]["train"]["total"]


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.epochs=0", "train.epochs"),
        ("train.lr=abc", "train.lr"),
        ("dataset.image_size=8", "dataset.image_size"),
        ("model.mode=bogus", "model.mode"),
        ("bootstrap.resamples=10", "bootstrap.resamples"),
        ("model.freeze_bn=maybe", "model.freeze_bn"),
        ("model.prefix_precision=half", "model.prefix_precision"),
    ],
)
def test_bad_config_values_exit_2_naming_the_key(
    tmp_path: Path, capsys, monkeypatch, override, key
):
    monkeypatch.delenv("FEDSCAN_DATA", raising=False)
    assert main(["train", f"runs_dir={tmp_path}", "dataset.per_class=16", override]) == 2
    assert key in capsys.readouterr().err


def test_unknown_group_option_names_the_key():
    with pytest.raises(ConfigError, match="dataset"):
        load_config(["dataset=chest_xray"])


def test_configured_missing_data_root_is_an_error(tmp_path: Path, capsys):
    assert main(["train", f"data_root={tmp_path / 'nowhere'}", f"runs_dir={tmp_path}"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_a_config_typo_fails_before_torch_is_imported() -> None:
    """The error comes in about a second, not after torch, Flower and Ray have loaded."""
    import subprocess
    import sys

    code = (
        "import sys; from fedscan.simulations.cli import main; "
        "rc = main(['{cmd}', 'trian.epochs=2']); print(rc, 'torch' in sys.modules)"
    )
    for cmd in ("train", "simulate"):
        out = subprocess.run(
            [sys.executable, "-c", code.format(cmd=cmd)], capture_output=True, text=True
        )
        assert out.stdout.split() == ["2", "False"], out.stdout + out.stderr
        assert "did you mean train.epochs?" in out.stderr


def test_a_bad_value_fails_before_torch_is_imported() -> None:
    """``train.lr=abc`` (a typed value, not a typo) is also answered before torch loads."""
    import subprocess
    import sys

    code = (
        "import sys; from fedscan.simulations.cli import main; "
        "rc = main(['{cmd}', '{bad}']); print(rc, 'torch' in sys.modules)"
    )
    for cmd, bad, key in (
        ("train", "train.lr=abc", "train.lr"),
        ("simulate", "federation.local_epochs=0", "federation.local_epochs"),
    ):
        out = subprocess.run(
            [sys.executable, "-c", code.format(cmd=cmd, bad=bad)], capture_output=True, text=True
        )
        assert out.stdout.split() == ["2", "False"], out.stdout + out.stderr
        assert f"config key '{key}'" in out.stderr


def test_a_bad_command_line_option_is_called_an_option() -> None:
    from fedscan.common.core.errors import ConfigError

    assert str(ConfigError("--out", "x")) == "option '--out': x"
    assert str(ConfigError("train.epochs", "x")) == "config key 'train.epochs': x"


def test_a_named_dataset_never_silently_becomes_synthetic(monkeypatch) -> None:
    """Without data, naming no dataset gives the SYNTHETIC default; naming one (brain,
    lung, a dataset.path) is an error that says which setting to set."""
    monkeypatch.delenv("FEDSCAN_DATA", raising=False)
    assert load_config([]).dataset.name == "synthetic"
    assert load_config(["dataset.image_size=32"]).dataset.name == "synthetic"
    for named in (["dataset=brain_mri"], ["dataset=lung_ct"], ["dataset.path=brain-tumor-mri"]):
        with pytest.raises(ConfigError, match=r"'data_root'.*FEDSCAN_DATA=.*data_root="):
            load_config(named)
    # composed only (a deployed site, `fedscan config`): the named dataset, never synthetic
    assert load_config(["dataset=lung_ct"], check_data=False).dataset.name == "lung_ct"


def test_a_deployed_site_composes_the_coordinators_dataset_without_its_folders(
    tmp_path: Path, monkeypatch
) -> None:
    """``flwr run`` sends the coordinator's dataset and data root to every site; a deployed
    site (a data-path) reads its own folder, so neither is an error there, and it trains at
    the named dataset's image size (not the synthetic default's). A simulated site (no
    data-path) reads the named dataset and fails like the server would."""
    from flwr.app import Context, RecordDict

    from fedscan.client.app import _config

    monkeypatch.delenv("FEDSCAN_DATA", raising=False)
    run_config = {"dataset": "brain_mri", "data-root": str(tmp_path / "coordinator-only")}

    def context(node_config: dict) -> Context:
        return Context(1, 1, node_config, RecordDict(), run_config)

    cfg = _config(context({"data-path": str(tmp_path)}), ())
    assert cfg.dataset.name == "brain_mri" and cfg.dataset.image_size == 160
    with pytest.raises(ConfigError, match="data_root"):
        _config(context({"partition-id": 0, "num-partitions": 2}), ())


@pytest.mark.parametrize(
    ("argv", "env", "setting"),
    [
        (["train", "data_root=/nonexistent/fedscan-data"], {}, "config key 'data_root'"),
        (["train"], {"FEDSCAN_DATA": "/nonexistent/fedscan-data"}, "variable 'FEDSCAN_DATA'"),
        (["simulate", "dataset=lung_ct"], {"FEDSCAN_DATA": "EMPTY"}, "variable 'FEDSCAN_DATA'"),
        (["train", "dataset.path=/nonexistent/brain"], {}, "config key 'dataset.path'"),
        (["site", "check", "--data-path", "/nonexistent/site"], {}, "option '--data-path'"),
    ],
    ids=["data_root", "FEDSCAN_DATA", "FEDSCAN_DATA-without-dataset", "dataset.path", "data-path"],
)
def test_a_bad_data_path_is_answered_in_2_s_naming_its_setting(
    tmp_path: Path, argv: list[str], env: dict[str, str], setting: str
) -> None:
    """The command line (a fresh process) answers a missing data folder before torch or
    Flower load, in under 2 s, naming the setting it came from."""
    import subprocess
    import sys
    import time

    env = {k: str(tmp_path) if v == "EMPTY" else v for k, v in env.items()}
    full = {k: v for k, v in os.environ.items() if k != "FEDSCAN_DATA"} | env
    code = (
        "import sys; from fedscan.simulations.cli import main; rc = main(sys.argv[1:]); "
        "print(rc, 'torch' in sys.modules or 'flwr' in sys.modules)"
    )
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code, *argv, f"runs_dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=full,
    )
    seconds = time.monotonic() - start
    assert out.stdout.split() == ["2", "False"], out.stdout + out.stderr
    assert setting in out.stderr, out.stderr
    assert seconds < 2.0, f"{seconds:.1f} s"
