"""Progress of one long phase (training steps, dense baselines, profiling, few-shot fitting).

Why: on a terminal a live bar is the right thing; in a log file (stderr redirected, CI, a
job scheduler) tqdm's carriage-return redraws turn a 1,500-step run into hundreds of
kilobytes of one "line". So on a terminal this is tqdm, and anywhere else it prints one
plain line every `interval_s` seconds and one when the phase ends.
"""

from __future__ import annotations

import sys
import time
import weakref
from collections.abc import Callable
from typing import Any, TextIO

LOG_INTERVAL_S = 10.0  # seconds between plain lines when the stream is not a terminal
_OPEN: weakref.WeakSet[Progress] = weakref.WeakSet()  # displays not yet closed


def close_open() -> None:
    """End every display still open, so a message about an interruption or an error that
    stopped a phase starts on its own line (the `moe` command calls this before saying why)."""
    for p in list(_OPEN):
        p.close()


def _clock_text(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """Counts `total` units (plural name, e.g. "steps") of one phase; use as a context
    manager so it always ends its line, also when the phase is interrupted.

    enabled=False shows nothing (the counting still works, so callers need no branches).
    `stream` defaults to stderr; `clock` is injectable so the plain-line rhythm can be
    tested without sleeping.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        unit: str = "steps",
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval_s: float = LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        terminal: bool | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = int(initial)
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.interval_s, self.clock = float(interval_s), clock
        self._postfix: dict[str, str] = {}
        self._closed = False
        self._bar = None
        self._start_n = self.n
        self._start = self._last = clock()
        _OPEN.add(self)
        if enabled and (_is_terminal(self.stream) if terminal is None else terminal):
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, dynamic_ncols=True,
                             file=self.stream)

    # ---------------------------------------------------------------- updates
    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self.n < self.total and self.clock() - self._last >= self.interval_s:
            self._line()  # the last unit's line is close()'s, which says how long the phase took

    def set_position(self, n: int) -> None:
        """Jump to n (e.g. after a rollback) without counting the difference as work."""
        self.n = self._start_n = int(n)
        self._start = self.clock()
        if self._bar is not None:
            self._bar.n = self.n
            self._bar.refresh()

    def set_postfix(self, **values: Any) -> None:
        """Figures shown after the count (e.g. loss=0.081); strings are shown as given."""
        self._postfix = {k: str(v) for k, v in values.items()}
        if self._bar is not None:
            self._bar.set_postfix(self._postfix, refresh=False)  # drawn at the next (rate-limited) update

    def close(self) -> None:
        """End the phase: the bar's line is finished, or one last plain line is written."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            self._line(done=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- plain lines
    def _line(self, done: bool = False) -> None:
        now = self.clock()
        self._last = now
        elapsed = now - self._start
        parts = [f"{self.desc}: {self.n}/{self.total} {self.unit}"]
        if self.total > 0:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        rate = (self.n - self._start_n) / elapsed if elapsed > 0 else 0.0
        if done:
            parts.append(f"{'took' if self.n >= self.total else 'stopped after'} {_clock_text(elapsed)}")
        elif rate > 0:
            parts.append(f"{rate:.3g} {self.unit}/s")
            parts.append(f"{_clock_text((self.total - self.n) / rate)} left")
        parts += [f"{k}={v}" for k, v in self._postfix.items()]
        print(", ".join(parts), file=self.stream, flush=True)
