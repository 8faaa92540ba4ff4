"""The run directory (DESIGN.md contract): the one writer and reader of a run's history, and where runs
and outputs may go.

    RUN/config.json                  settings, data source, versions, command line, parent, status
    RUN/metrics.csv                  one row per evaluation point, flushed as written, steps increasing
    RUN/checkpoints/iter-NNNNNNN.pt  state at an evaluation point, enough to resume exactly (Checkpoint)
    RUN/checkpoints/last.pt          the newest state
    RUN/.lock                        held by the one process that writes the run

The measures `sphrun curvature` adds beside them (curvature.csv, curvature.json, hessian-density.csv) are
written by curvature.CurvatureFile under their own short lock: another command, its own format. Files are
written as sphrun.files writes them: whole, with the user's umask; metrics.csv rows past the checkpoint a
run resumes from are dropped on resume.
"""

import contextlib
import csv
import enum
import io
import json
import os
import re

import torch

from sphrun import SphrunError
from sphrun.checkpoint import Checkpoint
from sphrun.files import (atomic_write, cannot_write, check_writable, format_value, held_lock, remove_temporaries,
                          write_text)

METRICS_COLUMNS = ("iter", "epoch", "elr", "train_loss", "train_err", "test_loss", "test_err", "gm",
                   "si_norm", "cos_prev", "cos_init", "proj_err", "wall_s")


class Status(str, enum.Enum):
    """A run's status in config.json, stored as these strings (equal to them, as str)."""
    RUNNING = "running"  # being trained, or killed while it was
    DONE = "done"
    DIVERGED = "diverged"  # a non-finite loss or norm stopped it
    INTERRUPTED = "interrupted"  # stopped by a signal or a full disk: the same command resumes it

    def __str__(self):
        return self.value


STATUSES = tuple(s.value for s in Status)
CHECKPOINT_NAME = re.compile(r"iter-(\d{7,})\.pt$")
OUTPUT_TABLES = ("connect.csv", "plane.csv")  # beside config.json, they mark connect's outputs, not runs


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
        try:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
        except OSError as e:
            raise cannot_write(self.checkpoint_dir, e) from e
        write_text(self.config_path, json.dumps(config, indent=2) + "\n")

    def set_status(self, status):
        config = self.read_config()
        config["status"] = status
        self.write_config(config)

    # --- metrics.csv -------------------------------------------------------------------------------
    def read_metrics(self):
        """Rows as dicts of floats ('iter' as int), their steps strictly increasing; [] when no row was
        written yet. A last line without its newline is a row being written, or cut by a kill: left out."""
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
        rows = [self.parse_metrics_row(header, values, number) for number, values in enumerate(rows, 2)]
        for line, (before, row) in enumerate(zip(rows, rows[1:]), 3):
            if row["iter"] <= before["iter"]:  # two writers, or rows pasted: its history is not one run's
                raise self.damaged_metrics(f"has step {row['iter']} at line {line} after step {before['iter']}: "
                                           f"its steps must strictly increase")
        return rows

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
        """Append `row` (after the header, in a new file). A write that fails is cut off again, so the
        file keeps whole rows only."""
        size = os.path.getsize(self.metrics_path) if os.path.exists(self.metrics_path) else 0
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS)
        if size == 0:
            writer.writeheader()
        writer.writerow({k: format_value(row[k]) for k in METRICS_COLUMNS})
        try:
            with open(self.metrics_path, "ab") as f:
                f.write(buffer.getvalue().encode())
        except OSError as e:
            with contextlib.suppress(OSError):
                os.truncate(self.metrics_path, size)
            raise cannot_write(self.metrics_path, e) from e

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

    def check_rows(self, steps, last_iter):
        """Refuse a metrics.csv that lacks the row of any of the evaluation `steps` up to `last_iter`, the
        step a run resumes from (cut short, or damaged): resuming would drop those rows for good."""
        have = {r["iter"] for r in self.metrics_until(last_iter)}
        missing = [s for s in steps if s <= last_iter and s not in have]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            shown = ", ".join(map(str, missing[:5])) + more
            raise self.damaged_metrics(f"lacks the rows of steps {shown}, evaluation points up to step "
                                       f"{last_iter} where the run resumes (cut short?)")

    def truncate_metrics(self, last_iter):
        """Drop rows past `last_iter` (written after the checkpoint a run resumes from, and a row cut by a
        kill); refuses as metrics_until does, before writing anything. A file with nothing to drop is
        left untouched."""
        rows = self.metrics_until(last_iter)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRICS_COLUMNS)  # \r\n, as append_metrics writes
        writer.writeheader()
        for row in rows:
            writer.writerow({k: format_value(row[k]) for k in METRICS_COLUMNS})
        with open(self.metrics_path, newline="", encoding="utf-8") as f:
            if f.read() == buffer.getvalue():
                return
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

    def save_checkpoint(self, checkpoint, at_eval_point):
        """Write `checkpoint` as last.pt and, at an evaluation point, as iter-NNNNNNN.pt too: that one first,
        so that a run whose last.pt exists has every checkpoint its metrics.csv names."""
        buffer = io.BytesIO()  # serialized first: a full disk then fails in a plain write, as an OSError
        torch.save(checkpoint.to_file(), buffer)
        targets = ([checkpoint.iter] if at_eval_point else []) + ["last"]
        for which in targets:
            atomic_write(self.checkpoint_path(which), lambda f: f.write(buffer.getbuffer()))

    def remove_checkpoint(self, it):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.checkpoint_path(it))

    def read_checkpoint(self, which="last"):
        """(Checkpoint, None), or (None, what is wrong with it: missing, unreadable, ...). One trained under
        other settings than config.json's is refused: the file was edited, or copied from another run."""
        path = self.checkpoint_path(which)
        if not os.path.isfile(path):
            return None, "missing"
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            return None, f"unreadable ({type(e).__name__})"
        try:
            checkpoint = Checkpoint.from_file(stored)
        except ValueError as e:
            return None, str(e)
        if which != "last" and checkpoint.iter != which:
            return None, f"the state of step {checkpoint.iter}, not of its own"
        differing = checkpoint.settings_differing(self.read_config()["settings"]) if self.exists() else []
        if differing:
            raise SphrunError(f"{path} was trained under other settings than {self.config_path} says "
                              f"({'; '.join(differing)}): put config.json's settings back as they were, or train "
                              f"the new settings in another --out")
        return checkpoint, None

    def load_checkpoint(self, which="last"):
        checkpoint, problem = self.read_checkpoint(which)
        available = ", ".join(map(str, self.checkpoint_iters())) or "none"
        if problem == "missing":
            raise SphrunError(f"{self.path} has no checkpoint {which} (checkpoints at steps: {available})")
        if problem:
            raise SphrunError(f"{self.checkpoint_path(which)} is {problem}: name another checkpoint of the "
                              f"run (steps {available})")
        return checkpoint

    def resume_point(self, origin):
        """(checkpoint, note) a run resumes from: last.pt when readable; else the newest readable iter
        checkpoint whose step has its metrics row, the note saying so. (None, None) when there is no
        history to keep: no checkpoint file and no row past the first, at `origin`, which a restart
        measures again. A history with nothing to resume it from is refused."""
        last, problem = self.read_checkpoint("last")
        if last is not None:
            return last, None
        rows = {r["iter"] for r in self.read_metrics()}
        iters = self.checkpoint_iters()
        for it in reversed(iters):
            state, _ = self.read_checkpoint(it)
            if state is not None and it in rows:
                later = ", ".join(str(s) for s in sorted(rows | set(iters)) if s > it)
                dropped = f"; the rows and checkpoints of steps {later} go" if later else ""
                return state, (f"{self.checkpoint_path('last')} is {problem}: resuming {self.path} from step "
                               f"{it}, its newest readable checkpoint with a metrics row{dropped}")
        if not iters and problem == "missing" and all(it <= origin for it in rows):
            return None, None
        raise SphrunError(f"{self.path} has a history but no checkpoint to resume it from (last.pt "
                          f"{problem}, no readable iter checkpoint with a metrics row): restore its "
                          f"checkpoints and metrics.csv from a copy, or delete {self.path} to train it again "
                          f"from its init")

    def remove_checkpoints_after(self, it):
        """Drop the iter checkpoints past step `it`, where a run resumes: the steps after it are trained
        again, and a thinner --keep would leave stale ones beside the new."""
        for later in self.checkpoint_iters():
            if later > it:
                self.remove_checkpoint(later)

    def remove_temporaries(self):
        """Delete what killed writers of the run left: temporaries of checkpoints, config.json and
        metrics.csv (curvature's go under its own lock). Call it holding the run's lock."""
        remove_temporaries(self.checkpoint_dir)
        remove_temporaries(self.path, ("config.json", "metrics.csv"))

    def remove_if_empty(self, up_to):
        """Remove the directory when it holds nothing but its lock file (one a refused command made to lock
        it), and the empty folders made for it, up to `up_to`."""
        with contextlib.suppress(OSError):
            if set(os.listdir(self.path)) <= {".lock"}:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.path, ".lock"))
                folder = os.path.abspath(self.path)
                while True:
                    os.rmdir(folder)  # fails, ending the climb, at a folder that is not empty
                    if folder == os.path.abspath(up_to):
                        break
                    folder = os.path.dirname(folder)

    # --- lock --------------------------------------------------------------------------------------
    def lock(self, name=".lock", wait=False, advice="choose another run", shared=False):
        """Hold RUN/<name> (made, with the run's folder, when missing) while writing, so two processes
        never write the same files: RUN/.lock for the run, refused in one line naming its holder and
        `advice`; `wait` for a short write's lock (curvature's); `shared` for a reader that needs the files
        to hold still (a fine-tune reading its parent), which other readers share. A connect output folder
        is locked the same way."""
        return held_lock(os.path.join(self.path, name), wait=wait, shared=shared,
                         refusal=lambda holder: f"{self.path} is being written by {holder}; wait for it or {advice}")


def is_run_dir(path):
    """Whether `path` holds a run: config.json beside checkpoints/ or metrics.csv (a connect output has
    config.json beside connect.csv)."""
    return os.path.isfile(os.path.join(path, "config.json")) and (
        os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isfile(os.path.join(path, "metrics.csv")))


def check_run_location(path, what="run"):
    """Refuse to make or open a run at `path` when that would put a run inside another run, turn a
    folder of runs (a sweep's --out) into a run directory itself, or meet a folder that cannot be
    written. `what` names the directory in messages (a connect output obeys the same rule)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise SphrunError(f"{path} is not a folder: give the {what} a directory")
    ancestor = os.path.dirname(path)
    while ancestor != os.path.dirname(ancestor):
        if is_run_dir(ancestor):
            raise SphrunError(f"{ancestor} is a run directory: put the new {what} beside it, not inside it")
        ancestor = os.path.dirname(ancestor)
    if os.path.isdir(path) and not is_run_dir(path):
        runs = sorted(name for name in os.listdir(path) if is_run_dir(os.path.join(path, name)))
        if runs:
            raise SphrunError(f"{path} holds run directories ({runs[0]}, ...): it is a folder of runs; give "
                              f"--out a directory of its own for this {what}, such as "
                              f"{os.path.join(path, 'NAME')}")
    check_writable(path)


def check_output_folder(path, table="connect.csv"):
    """Refuse a connect output at `path` that would overwrite a run's files: never a run directory (nor
    a folder with another config.json), inside one or over a folder of runs; an earlier output of the same
    kind there (its `table`: connect.csv for a segment, plane.csv for a plane) is replaced."""
    check_run_location(path, "connect output")
    foreign = os.path.isfile(os.path.join(path, "config.json")) and not os.path.isfile(os.path.join(path, table))
    if is_run_dir(path) or foreign:
        other = [name for name in OUTPUT_TABLES if name != table and os.path.isfile(os.path.join(path, name))]
        what = f"another connect output's config.json ({other[0]} beside it)" if other else "a run's config.json"
        raise SphrunError(f"{path} holds {what}: give --out a folder of its own for the connect "
                          f"output, such as {os.path.join(os.path.dirname(os.path.abspath(path)), 'NAME')}")
