"""sphrun: train scale-invariant networks on the sphere and study their loss landscape."""

__version__ = "0.2.0"


class SphrunError(Exception):
    """A user-facing problem (bad input, foreign file): the CLI prints one line and exits `exit_code`."""
    exit_code = 2
