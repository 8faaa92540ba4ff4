"""Stopping long work on a signal: Ctrl-C, SIGTERM (a scheduler's stop) and SIGUSR1 (its notice).

The first signal becomes a flag that the work checks between its pieces (a training step, a grid point,
a checkpoint's measure), so a piece is never cut in half; the work then saves what it has and raises
Interrupted, and the process exits with 128 + the signal's number, as a shell reports a signal. A second
signal, or one where nothing can be saved yet, stops at once (StopNow).
"""

import contextlib
import signal
import time


class Interrupted(Exception):
    """Work stopped by a signal (Ctrl-C, SIGTERM, SIGUSR1) after saving what it had (a training run marked
    interrupted). The process exits with 128 + the signal's number, as a shell reports a signal."""

    def __init__(self, text, signum=signal.SIGINT):
        super().__init__(text)
        self.signum = int(signum)


class StopNow(Exception):
    """A stop signal met where the work cannot finish its piece first: a second one (the user or the
    scheduler insists), or SIGTERM or SIGUSR1 outside the loop. The command stops at once, without saving."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = int(signum)


# SIGTERM: a scheduler's stop (SLURM at its time limit or on preemption, then SIGKILL after a grace
# period); SIGUSR1: the notice `#SBATCH --signal=USR1@60` sends ahead of the limit.
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1")
                     if hasattr(signal, name))


# At its time limit SLURM sends SIGTERM to a job step twice, a few milliseconds apart (from slurmstepd, and
# forwarded by srun): a scheduler's signal repeated within this many seconds is one stop, not insistence.
REPEAT_S = 2.0


class StopRequest:
    """Turns the first stop signal (STOP_SIGNALS) into a flag the work checks between its pieces, so a piece
    is never cut in half; a second one raises StopNow (but SIGTERM or SIGUSR1 again within REPEAT_S)."""

    def __init__(self):
        self.signum = None

    @property
    def requested(self):
        return self.signum is not None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        return self

    def check(self):
        """Raise StopNow once a stop was requested: for work whose finished pieces are already kept (connect's
        points, curvature's values), which gives up the piece under way rather than wait for it."""
        if self.requested:
            raise StopNow(self.signum)

    def handle(self, signum, frame):
        now = time.monotonic()
        if not self.requested:
            self.signum, self.since = signum, now
        elif signum == signal.SIGINT or signum != self.signum or now - self.since > REPEAT_S:
            raise StopNow(signum)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def by_signal(signum):
    """' by SIGTERM' for a message; nothing for Ctrl-C, which the user knows they pressed."""
    return "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"


@contextlib.contextmanager
def stopping_at_once():
    """Outside the loop (loading data, a first evaluation) SIGTERM and SIGUSR1 stop a command at once, as
    Ctrl-C does there (KeyboardInterrupt), so that its runs are marked interrupted, not killed."""
    def handle(signum, frame):
        raise StopNow(signum)
    previous = {s: signal.signal(s, handle) for s in STOP_SIGNALS if s != signal.SIGINT}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
