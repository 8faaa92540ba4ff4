"""Progress on long work: a rich bar on a terminal, plain log lines otherwise. Messages go to stderr."""

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)


def message(text):
    """One line for the user on stderr (never data: data goes to files)."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


class StepProgress:
    """Shows step, loss, ELR and ETA. `update` is cheap enough to call every step: the display is
    refreshed (and the loss read from the device) at most every `interval` seconds."""

    def __init__(self, total, start=0, label="train", interval=0.5, live=None):
        self.total, self.label, self.interval = total, label, interval
        self.live = sys.stderr.isatty() if live is None else live
        self.last_refresh = 0.0
        self.bar = None
        if self.live:
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console)
            self.task = self.bar.add_task(label, total=total, completed=start, info="")

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def due(self):
        """True when the display wants a fresh value (the caller then pays one host sync)."""
        now = time.monotonic()
        if now - self.last_refresh < self.interval:
            return False
        self.last_refresh = now
        return True

    def update(self, step, loss=None, elr=None):
        if self.bar:
            info = "" if loss is None else f"loss {loss:.4g}  elr {elr:.3g}"
            self.bar.update(self.task, completed=step, info=info)

    def log(self, text):
        """A line that stays: printed above a live bar, or as a plain log line."""
        if self.bar:
            self.bar.console.print(text, highlight=False, markup=False)
        else:
            message(text)


def duration(seconds):
    """A time to read at a glance: '45 s', '3 min 20 s', '2 h 05 min', '3.2 days', '55 years'."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min {seconds % 60:02.0f} s"
    if seconds < 2 * 86400:
        return f"{seconds // 3600:.0f} h {seconds % 3600 // 60:02.0f} min"
    if seconds < 365 * 86400:
        return f"{seconds / 86400:.1f} days"
    return f"{seconds / (365.25 * 86400):,.0f} years"


def time_left(began, done, total):
    """Seconds the total - done pieces left will take at the pace of the `done` measured since `began`
    (time.perf_counter); None before the first."""
    return (time.perf_counter() - began) / done * (total - done) if done else None
