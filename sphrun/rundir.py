"""The run directory (DESIGN.md contract): its one writer and its one reader.

    RUN/config.json                  settings, data source, versions, command line, parent, status
    RUN/metrics.csv                  one row per evaluation point, flushed as written
    RUN/checkpoints/iter-NNNNNNN.pt  state at an evaluation point, enough to resume exactly
    RUN/checkpoints/last.pt          the newest state
    RUN/curvature.csv                written by `sphrun curvature`

Every file but metrics.csv is written whole to a temporary name and renamed, so a crash never leaves
half a file; metrics.csv rows past the newest checkpoint are dropped on resume. Every file gets the
permissions of the user's umask, so a group can share runs on a cluster.
"""

import contextlib
import csv
import io
import json
import os
import re
import socket
import tempfile

import torch

from sphrun import SphrunError

METRICS_COLUMNS = ("iter", "epoch", "elr", "train_loss", "train_err", "test_loss", "test_err", "gm",
                   "si_norm", "cos_prev", "cos_init", "proj_err", "wall_s")
STATUSES = ("running", "done", "diverged", "interrupted")
CHECKPOINT_NAME = re.compile(r"iter-(\d{7,})\.pt$")


def atomic_write(path, write):
    """Call write(file) on a temporary file beside `path`, then rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes it 600; other files follow the umask
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask():
    """The process's umask (reading it means setting it: put it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


class RunDir:
    def __init__(self, path):
        self.path = str(path)
        self.config_path = os.path.join(self.path, "config.json")
        self.metrics_path = os.path.join(self.path, "metrics.csv")
        self.checkpoint_dir = os.path.join(self.path, "checkpoints")

    def __str__(self):
        return self.path

    def exists(self):
        return os.path.isfile(self.config_path)

    # --- config.json -------------------------------------------------------------------------------
    def read_config(self):
        try:
            with open(self.config_path) as f:
                config = json.load(f)
        except FileNotFoundError:
            raise SphrunError(f"{self.path} is not a sphrun run (no config.json)")
        except (OSError, ValueError) as e:
            raise SphrunError(f"{self.config_path} is unreadable or not JSON: {e}")
        if not isinstance(config, dict) or "settings" not in config or config.get("status") not in STATUSES:
            raise SphrunError(f"{self.config_path} is not a sphrun run configuration")
        return config

    def write_config(self, config):
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        write_text(self.config_path, json.dumps(config, indent=2) + "\n")

    def set_status(self, status):
        config = self.read_config()
        config["status"] = status
        self.write_config(config)

    # --- metrics.csv -------------------------------------------------------------------------------
    def read_metrics(self):
        """Rows as dicts of floats ('iter' as int); [] when no row was written yet.

        A last line without its newline is a row being written, or cut by a kill: it is left out."""
        try:
            with open(self.metrics_path, newline="", encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return []
        except UnicodeDecodeError:
            raise self.damaged_metrics("is not text")
        if not text.endswith("\n") and "\n" in text:
            text = text[:text.rindex("\n") + 1]
        try:
            lines = list(csv.reader(io.StringIO(text)))
        except csv.Error as e:
            raise self.damaged_metrics(f"is not CSV ({e})")
        if not lines:
            return []
        header, rows = lines[0], lines[1:]
        missing = [c for c in METRICS_COLUMNS if c not in header]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise self.damaged_metrics(f"has no column {', '.join(missing[:3])}{more} (a foreign header)")
        return [self.parse_metrics_row(header, values, number) for number, values in enumerate(rows, 2)]

    def parse_metrics_row(self, header, values, line):
        try:
            if len(values) != len(header):
                raise ValueError
            return {k: int(v) if k == "iter" else float(v) for k, v in zip(header, values)}
        except ValueError:
            raise self.damaged_metrics(f"has a malformed row at line {line}")

    def damaged_metrics(self, what):
        return SphrunError(f"{self.metrics_path} {what}: restore it from a copy, or delete the run "
                           f"directory {self.path} and train it again")

    def append_metrics(self, row):
        new = not os.path.exists(self.metrics_path) or os.path.getsize(self.metrics_path) == 0
        with open(self.metrics_path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=METRICS_COLUMNS)
            if new:
                writer.writeheader()
            writer.writerow({k: format_value(row[k]) for k in METRICS_COLUMNS})
            f.flush()

    def discard_metrics(self):
        """Drop metrics.csv: a run starting (again) from its beginning writes it anew."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.metrics_path)

    def metrics_until(self, last_iter):
        """The rows a run resumed from its checkpoint at `last_iter` keeps. None left means a damaged file
        (every run writes its first row before its first checkpoint): refused, as going on would drop the
        history. Reads only, so a resume can check it before it announces itself."""
        rows = [r for r in self.read_metrics() if r["iter"] <= last_iter]
        if not rows:
            raise self.damaged_metrics(f"has no row at or before step {last_iter}, the newest checkpoint")
        return rows

    def truncate_metrics(self, last_iter):
        """Drop rows past `last_iter` (written after the newest checkpoint by a killed process); refuses
        as metrics_until does, before writing anything."""
        rows = self.metrics_until(last_iter)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: format_value(row[k]) for k in METRICS_COLUMNS})
        write_text(self.metrics_path, buffer.getvalue())

    # --- checkpoints -------------------------------------------------------------------------------
    def checkpoint_path(self, which):
        name = "last.pt" if which == "last" else f"iter-{int(which):07d}.pt"
        return os.path.join(self.checkpoint_dir, name)

    def checkpoint_iters(self):
        try:
            names = os.listdir(self.checkpoint_dir)
        except FileNotFoundError:
            return []
        return sorted(int(m.group(1)) for m in map(CHECKPOINT_NAME.match, names) if m)

    def has_checkpoint(self, which):
        return os.path.isfile(self.checkpoint_path(which))

    def save_checkpoint(self, state, at_eval_point):
        """Write `state` as last.pt and, at an evaluation point, as iter-NNNNNNN.pt too: that one first,
        so that a run whose last.pt exists has every checkpoint its metrics.csv names."""
        targets = ([state["iter"]] if at_eval_point else []) + ["last"]
        for which in targets:
            atomic_write(self.checkpoint_path(which), lambda f: torch.save(state, f))

    def remove_checkpoint(self, it):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.checkpoint_path(it))

    def load_checkpoint(self, which="last"):
        path = self.checkpoint_path(which)
        if not os.path.isfile(path):
            available = ", ".join(map(str, self.checkpoint_iters())) or "none"
            raise SphrunError(f"{self.path} has no checkpoint {which} (checkpoints at steps: {available})")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SphrunError(f"{path} is corrupt ({type(e).__name__}); "
                              f"delete it to resume from an earlier checkpoint")
        if not isinstance(state, dict) or "model" not in state or "iter" not in state:
            raise SphrunError(f"{path} is not a sphrun checkpoint")
        return state

    # --- lock --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """Hold RUN/.lock while writing, so two processes never write one run; names the holder."""
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform: go on unlocked
            yield
            return
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, ".lock"), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise SphrunError(f"{self.path} is being written by {holder}; wait for it or choose another run")
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            try:
                yield
            finally:
                f.truncate(0)
                fcntl.flock(f, fcntl.LOCK_UN)


def is_run_dir(path):
    """Whether `path` holds a run: config.json beside checkpoints/ or metrics.csv (a connect output has
    config.json beside connect.csv)."""
    return os.path.isfile(os.path.join(path, "config.json")) and (
        os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "metrics.csv")))


def check_run_location(path):
    """Refuse to make or open a run at `path` when that would put a run inside another run, or turn a
    folder of runs (a sweep's --out) into a run directory itself."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise SphrunError(f"{path} is not a folder: give the run a directory")
    ancestor = os.path.dirname(path)
    while ancestor != os.path.dirname(ancestor):
        if is_run_dir(ancestor):
            raise SphrunError(f"{ancestor} is a run directory: put the new run beside it, not inside it")
        ancestor = os.path.dirname(ancestor)
    if os.path.isdir(path) and not is_run_dir(path):
        runs = sorted(name for name in os.listdir(path) if is_run_dir(os.path.join(path, name)))
        if runs:
            raise SphrunError(f"{path} holds run directories ({runs[0]}, ...): it is a folder of runs; give "
                              f"--out a directory of its own for this run, such as {os.path.join(path, 'NAME')}")


def format_value(value):
    if isinstance(value, int):
        return str(value)
    return f"{value:.9g}"
