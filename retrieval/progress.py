"""Progress bars that suit where the output goes: a live tqdm bar on a terminal, a log-friendly summary elsewhere.

When the output is redirected (a log file, a pipe, a batch job), a live bar would write a line per refresh.
There :func:`progress_bar` draws nothing while the work runs and writes at most one line when it ends
(``encoding val images: 1200 img in 3.1 s (387 img/s)``); a short-lived inner bar (``leave=False``) writes
nothing at all.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: the current ``sys.stderr``) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed stream
        return False


def format_duration(seconds: float) -> str:
    """``3.1 s`` below a minute, ``02:05`` or ``1:02:05`` above."""
    return f"{seconds:.1f} s" if seconds < 60 else tqdm.format_interval(seconds)


def format_rate(count: float, seconds: float, unit: str) -> str:
    """``387 img/s``, or ``4.2 s/run`` when fewer than one per second; empty when no time has passed."""
    if seconds <= 0 or count <= 0:
        return ""
    rate = count / seconds
    if rate >= 1:
        return f"{rate:.0f} {unit}/s" if rate >= 10 else f"{rate:.1f} {unit}/s"
    return f"{seconds / count:.1f} s/{unit}"


class SummaryBar:
    """The stand-in for a tqdm bar when the output is not a terminal: silent while it runs, one line when closed.

    It takes the calls the project makes on a tqdm bar (iteration, ``update``, ``set_postfix``,
    ``set_postfix_str``, ``set_description``, ``close``, ``with``); the line is written only when
    ``leave`` and only once.
    """

    def __init__(self, iterable: Iterable | None, desc: str, total: int | None, unit: str, leave: bool,
                 stream: TextIO | None) -> None:
        self.iterable, self.desc, self.unit, self.leave, self.stream = iterable, desc, unit, leave, stream
        self.total = total if total is not None else _length(iterable)
        self.n = 0
        self.started = time.perf_counter()
        self.closed = False

    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this progress bar wraps no iterable; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.n += 1
        finally:  # exhausted, broken out of, or garbage-collected: the bar ends with its work
            self.close()

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("this progress bar has no known length")
        return self.total

    def __enter__(self) -> SummaryBar:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        """Nothing to draw between refreshes: a postfix is for the live bar only."""

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Nothing to draw between refreshes: a postfix is for the live bar only."""

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def summary(self) -> str:
        """``desc: 1200 img in 3.1 s (387 img/s)``."""
        seconds = time.perf_counter() - self.started
        count = f"{self.n}/{self.total}" if self.total is not None and self.n != self.total else f"{self.n}"
        rate = format_rate(self.n, seconds, self.unit)
        return f"{self.desc}: {count} {self.unit} in {format_duration(seconds)}" + (f" ({rate})" if rate else "")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.leave:
            stream = sys.stderr if self.stream is None else self.stream
            print(self.summary(), file=stream, flush=True)


ProgressBar = tqdm | SummaryBar


def progress_bar(iterable: Iterable | None = None, *, desc: str, total: int | None = None, unit: str = "it",
                 enabled: bool = True, leave: bool = True, stream: TextIO | None = None) -> ProgressBar:
    """A progress bar over ``iterable`` (or advanced with ``update``) that never floods a log file.

    On a terminal (``stream``, default ``sys.stderr``, is a tty) it is a tqdm bar. Otherwise nothing is drawn
    while it runs and, when it closes, one summary line is written if ``leave`` (none for a short inner bar
    made with ``leave=False``). With ``enabled=False`` nothing is ever written.
    """
    if not enabled:
        return SummaryBar(iterable, desc, total, unit, leave=False, stream=stream)
    if is_terminal(stream):
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, file=stream)
    return SummaryBar(iterable, desc, total, unit, leave, stream)


def _length(iterable: Iterable | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def write_line(text: str, enabled: bool = True) -> None:
    """Print one line of status to stdout without breaking a live bar (under torchrun: ``enabled`` on rank 0 only)."""
    if enabled:
        tqdm.write(text)
