"""Progress on long work: a rich bar on a terminal, plain log lines otherwise. Messages go to stderr."""

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

console = Console(stderr=True)

# Without a terminal (a job's log file) a line at least this often (seconds) between evaluation points,
# so that a long stretch without one still shows the job is alive and how far it is.
HEARTBEAT_S = 120.0


def message(text):
    """One line for the user on stderr (never data: data goes to files)."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def duration(seconds):
    """A time span as a person reads it: 45 s, 12 min, 3 h 05 min, 6 years (a --grid 10000 plane)."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 365 * 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds / (365.25 * 86400):,.0f} years"


class StepProgress:
    """Shows step, loss, ELR and ETA. `update` is cheap enough to call every step: the display is
    refreshed (and the loss read from the device) at most every `interval` seconds. Without a terminal
    every line starts with the date and time, and `update` writes one every `heartbeat` seconds."""

    def __init__(self, total, start=0, label="train", interval=0.5, live=None, heartbeat=None):
        self.total, self.label, self.interval = total, label, interval
        self.heartbeat = HEARTBEAT_S if heartbeat is None else heartbeat
        self.live = sys.stderr.isatty() if live is None else live
        self.last_refresh = 0.0
        self.started, self.start_step = time.monotonic(), start
        self.last_line = self.started
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
        info = "" if loss is None else f"loss {loss:.4g}  elr {elr:.3g}"
        if self.bar:
            self.bar.update(self.task, completed=step, info=info)
        elif time.monotonic() - self.last_line >= self.heartbeat:
            parts = (f"{self.label} {step}/{self.total}", info, self.time_left(step))
            self.log("  ".join(part for part in parts if part))

    def time_left(self, step):
        """The rest at the pace since this display started ("" before the first step)."""
        done = step - self.start_step
        if done <= 0:
            return ""
        return f"{duration((time.monotonic() - self.started) / done * (self.total - step))} left"

    def log(self, text):
        """A line that stays: printed above a live bar, or as a plain log line after the date and time."""
        if self.bar:
            self.bar.console.print(text, highlight=False, markup=False)
        else:
            message(time.strftime("%Y-%m-%d %H:%M:%S ") + text)
            self.last_line = time.monotonic()
