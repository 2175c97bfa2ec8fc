"""Progress that a user sees in a terminal *and* in a log file.

tqdm draws a bar only on a terminal; redirected to a file it prints nothing, and
a user watching a log for minutes assumes a hang. :func:`progress` wraps an
iterable: a start line naming the phase and how much it holds, a bar on a
terminal, otherwise a log line every ``every_s`` seconds (20: a batch can take
seconds, and no phase may look silent for 30), and an end line with the
phase's time.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
log = logging.getLogger("fedscan.progress")


def progress(
    items: Iterable[T],
    *,
    total: int,
    desc: str,
    unit: str = "items",
    every_s: float = 20.0,
    quiet_below: int = 0,
    announce: bool = True,
) -> Iterator[T]:
    """Yield ``items`` while reporting; ``total`` counts them in ``unit`` (for the lines).

    ``quiet_below``: phases with fewer items log nothing (tiny test inputs).
    ``announce=False``: no start and end lines, only the periodic ones (a loop whose
    caller already logs each pass, like a training epoch).
    """
    if total < quiet_below:
        yield from items
        return
    if announce:
        log.info("%s: %d %s ...", desc, total, unit)
    start = last = time.perf_counter()
    tty = sys.stderr.isatty()
    it = tqdm(items, total=total, desc=desc, leave=False) if tty else items
    for done, x in enumerate(it, 1):
        yield x
        now = time.perf_counter()
        if not tty and now - last >= every_s:
            last = now
            log.info("%s: %d/%d %s (%.0f s)", desc, done, total, unit, now - start)
    if announce:
        log.info("%s: done, %d %s in %.1f s", desc, total, unit, time.perf_counter() - start)
