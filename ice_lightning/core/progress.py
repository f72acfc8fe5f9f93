"""Progress for the long steps (encoding many prompts, sampling, benchmarks) that suits where it runs.

- On a terminal: a bar in the look of Lightning's ``TQDMProgressBar``, shown only once a step has run for about
  2 s (quick calls print nothing) and cleared when the step ends.
- Off a terminal (a log file: CI, ``nohup``, a scheduler), where a bar's frames would pile up as hundreds of lines:
  one plain line at most every :data:`LOG_EVERY_S` seconds while a step runs, and one when it ends (a step
  shorter than 2 s prints nothing), as tqdm's ``disable=None`` and Lightning's bars keep logs readable.
- ``set_quiet(True)`` (the CLI's ``--quiet``) or ``ICE_LIGHTNING_QUIET=1``: nothing at all.

Example:
    >>> from ice_lightning.core.progress import progress
    >>> sum(progress(range(3), desc="adding"))
    3
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress", "set_quiet", "is_quiet", "on_terminal", "pipeline_bar_config", "DELAY_S", "LOG_EVERY_S"]

T = TypeVar("T")
#: A bar shows only after a step has run this long.
DELAY_S = 2.0
#: Off a terminal, a running step writes a line at most this often.
LOG_EVERY_S = 30.0
_quiet: bool | None = None


def set_quiet(quiet: bool = True) -> None:
    """Turn every progress bar of ice-lightning off (``True``) or back on."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    if _quiet is not None:
        return _quiet
    return os.environ.get("ICE_LIGHTNING_QUIET", "").strip().lower() in ("1", "true", "yes")


def on_terminal() -> bool:
    """Whether stderr is a terminal (where a bar redraws in place)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def pipeline_bar_config(desc: str) -> dict:
    """The keyword arguments of a diffusers pipeline's ``set_progress_bar_config`` for one step: a bar on a
    terminal, shown after :data:`DELAY_S` and cleared; off a terminal, or quiet, none."""
    return {"desc": desc, "disable": is_quiet() or not on_terminal(), "leave": False, "delay": DELAY_S,
            "dynamic_ncols": True}  # fmt: skip


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """``iterable``, with a progress bar on stderr if the loop runs longer than :data:`DELAY_S` (off a terminal:
    log lines, see the module docstring)."""
    if is_quiet():
        yield from iterable
        return
    if not on_terminal():
        yield from _log_lines(iterable, total, desc, unit)
        return
    from tqdm.auto import tqdm

    bar = tqdm(iterable, total=total, desc=desc, unit=unit, delay=DELAY_S, leave=False, dynamic_ncols=True,
               file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
               "[{elapsed}<{remaining}, {rate_fmt}]")  # fmt: skip
    try:
        yield from bar
    finally:
        bar.close()


def _log_lines(iterable: Iterable[T], total: int | None, desc: str, unit: str) -> Iterator[T]:
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    start = last = time.perf_counter()
    n = 0

    def line(what: str) -> None:
        print(f"{desc}: {n}/{total if total is not None else '?'} {unit} {what} {time.perf_counter() - start:.1f} s",
              file=sys.stderr, flush=True)  # fmt: skip

    for item in iterable:
        yield item
        n += 1
        now = time.perf_counter()
        if now - last >= LOG_EVERY_S and now - start >= DELAY_S:
            line("after")
            last = now
    if time.perf_counter() - start >= DELAY_S:
        line("done in")
