"""Progress bars for the long steps (encoding many prompts, sampling, benchmarks), in the look of Lightning's
``TQDMProgressBar``: a bar appears only once a step has run for about 2 s, so quick calls print nothing, and
it is cleared when the step ends. ``set_quiet(True)`` (the CLI's ``--quiet``) or ``ICE_LIGHTNING_QUIET=1``
turns every bar off.

Example:
    >>> from ice_lightning.core.progress import progress
    >>> sum(progress(range(3), desc="adding"))
    3
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["progress", "set_quiet", "is_quiet", "DELAY_S"]

T = TypeVar("T")
#: A bar shows only after a step has run this long.
DELAY_S = 2.0
_quiet: bool | None = None


def set_quiet(quiet: bool = True) -> None:
    """Turn every progress bar of ice-lightning off (``True``) or back on."""
    global _quiet
    _quiet = bool(quiet)


def is_quiet() -> bool:
    if _quiet is not None:
        return _quiet
    return os.environ.get("ICE_LIGHTNING_QUIET", "").strip().lower() in ("1", "true", "yes")


def progress(iterable: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """``iterable``, with a progress bar on stderr if the loop runs longer than :data:`DELAY_S`."""
    if is_quiet():
        yield from iterable
        return
    from tqdm.auto import tqdm

    bar = tqdm(iterable, total=total, desc=desc, unit=unit, delay=DELAY_S, leave=False, dynamic_ncols=True,
               file=sys.stderr, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
               "[{elapsed}<{remaining}, {rate_fmt}]")  # fmt: skip
    try:
        yield from bar
    finally:
        bar.close()
