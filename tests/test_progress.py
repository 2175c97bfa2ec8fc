"""Progress lines: a log file sees a phase start, advance and end, not minutes of silence."""

from __future__ import annotations

import logging

import pytest

from fedscan.common.core.parallel import pmap
from fedscan.common.core.progress import progress


def test_a_phase_logs_start_progress_and_end_when_not_on_a_terminal(caplog) -> None:
    caplog.set_level(logging.INFO, logger="fedscan.progress")
    out = list(progress(range(5), total=5, desc="decode", unit="files", every_s=0.0))
    assert out == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "decode: 5 files ..."
    assert "decode: 3/5 files" in " ".join(lines)  # every_s=0: a line per item
    assert lines[-1].startswith("decode: done, 5 files in ")


def test_small_phases_stay_quiet(caplog) -> None:
    caplog.set_level(logging.INFO, logger="fedscan.progress")
    assert list(progress(range(3), total=3, desc="x", quiet_below=200)) == [0, 1, 2]
    assert not caplog.records


@pytest.mark.parametrize("workers", [1, 2])
def test_pmap_keeps_order_and_reports_large_jobs(caplog, workers: int) -> None:
    caplog.set_level(logging.INFO, logger="fedscan.progress")
    items = list(range(250))
    assert pmap(abs, [-i for i in items], desc="decode", workers=workers) == items
    assert any(r.getMessage().startswith("decode: done, 250 files") for r in caplog.records)
