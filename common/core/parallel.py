"""Map a per-file function over many files on the machine's cores, showing progress."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from fedscan.common.core.progress import progress

A = TypeVar("A")
R = TypeVar("R")


def available_cpus() -> int:
    """CPUs this process may use (respects affinity masks and cgroup-pinned sites)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pmap(
    fn: Callable[[A], R], items: Sequence[A], *, desc: str, workers: int | None = None
) -> list[R]:
    """Order-preserving map; small jobs stay in-process because a pool costs ~1 s to start."""
    workers = workers or available_cpus()
    shown = {"total": len(items), "desc": desc, "unit": "files", "quiet_below": 200}
    if workers <= 1 or len(items) < 200:
        return [fn(x) for x in progress(items, **shown)]
    chunk = max(1, len(items) // (workers * 8))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(progress(pool.map(fn, items, chunksize=chunk), **shown))
