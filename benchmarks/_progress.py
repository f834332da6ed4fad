"""Progress on stderr: a bar of runs done, with the time left, and lines for what happened.

On a terminal the bar stays on the last line and is redrawn in place; every
message (`ProgressBar.note`) is printed above it. Elsewhere (a CI log, a pipe)
there is no bar, only the messages, one line each, so logs stay readable.

Workloads that do long work inside one run (filling a backlog of a million
events, say) report it with `note`, through the ``progress`` callable the
harness gives them, so their lines never tangle with the bar.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

import attrs

#: Characters of the bar itself.
BAR_WIDTH = 24


def format_duration(seconds: float) -> str:
    """``seconds`` as ``1h02m``, ``3m05s`` or ``12s``."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


@attrs.define(eq=False)
class ProgressBar:
    """Runs done out of ``total``, the elapsed time, and an estimate of the time left.

    Attributes:
        total: Runs to do.
        stream: Where to write (stderr).
        live: Whether to draw the bar; by default, when ``stream`` is a terminal.
    """

    total: int
    stream: TextIO = attrs.field(factory=lambda: sys.stderr)
    live: bool | None = None
    done: int = 0
    current: str = ""
    _started: float = attrs.field(factory=time.monotonic)
    _drawn: bool = False

    def __attrs_post_init__(self) -> None:
        if self.live is None:
            self.live = self.stream.isatty()

    def bar(self) -> str:
        """The bar's line, as it is drawn now."""
        filled = BAR_WIDTH * self.done // max(self.total, 1)
        elapsed = time.monotonic() - self._started
        text = f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {self.done}/{self.total} runs"
        text += f", {format_duration(elapsed)} elapsed"
        if 0 < self.done < self.total:
            left = elapsed / self.done * (self.total - self.done)
            text += f", about {format_duration(left)} left"
        if self.current:
            text += f"; now: {self.current}"
        return text

    def note(self, line: str) -> None:
        """Print ``line`` (above the bar, if drawn)."""
        self._clear()
        print(line, file=self.stream, flush=True)
        self._draw()

    def start(self, what: str) -> None:
        """Show that the run ``what`` has begun."""
        self.current = what
        self._draw()

    def advance(self, line: str) -> None:
        """Count one run done and print ``line``, what it measured."""
        self.done += 1
        self.current = ""
        self.note(line)

    def close(self) -> None:
        """Remove the bar, leaving the messages."""
        self._clear()

    def _clear(self) -> None:
        if self._drawn:
            # Carriage return, then erase to the end of the line.
            self.stream.write("\r\x1b[K")
            self._drawn = False

    def _draw(self) -> None:
        if self.live:
            self._clear()
            # Cut to the terminal's width: a wrapped line could not be redrawn in place.
            width = shutil.get_terminal_size().columns - 1
            self.stream.write(self.bar()[:width])
            self.stream.flush()
            self._drawn = True
