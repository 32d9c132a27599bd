"""A dependency-free progress bar: step, loss, constraint error, speed and time left.

On a terminal the line is redrawn in place (``\\r``); otherwise (logs, CI, parallel
sweeps) a plain line is printed at most every ``interval`` seconds and at the end.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressBar", "format_duration"]


def format_duration(seconds: float) -> str:
    """``75.3 -> "1:15"``, ``3725 -> "1:02:05"``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """``with ProgressBar(total, desc) as bar: bar.update(step, loss=..., error=...)``."""

    def __init__(self, total: int, desc: str = "", start: int = 0, enabled: bool = True,
                 stream: TextIO | None = None, width: int = 24, interval: float = 10.0) -> None:
        self.total, self.desc, self.start_step = total, desc, start
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.width, self.interval = width, interval
        self.t0 = time.perf_counter()
        self._last_print = -float("inf")
        self.step = start
        self.fields: dict[str, float | None] = {}

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def render(self) -> str:
        frac = self.step / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self.t0
        done = self.step - self.start_step
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        eta = (self.total - self.step) / rate if rate > 0 else 0.0
        parts = [f"{self.desc} " if self.desc else "",
                 f"[{bar}] {self.step}/{self.total}"]
        for key, value in self.fields.items():
            if value is not None:
                parts.append(f" {key}={value:.3g}" if isinstance(value, float) else
                             f" {key}={value}")
        parts.append(f" {rate:.1f} it/s {format_duration(elapsed)}<{format_duration(eta)}")
        return "".join(parts)

    def update(self, step: int, **fields: float | None) -> None:
        self.step = step
        self.fields.update(fields)
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last_print >= 0.1 or step >= self.total:
                self.stream.write("\r" + self.render() + "\x1b[K")
                self.stream.flush()
                self._last_print = now
        elif now - self._last_print >= self.interval:
            self.stream.write(self.render() + "\n")
            self.stream.flush()
            self._last_print = now

    def close(self) -> None:
        if not self.enabled:
            return
        line = self.render()
        self.stream.write(("\r" + line + "\x1b[K\n") if self.tty else line + "\n")
        self.stream.flush()
        self.enabled = False
