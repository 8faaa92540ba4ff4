"""Which of the paper's three training regimes a run is in, read from its metrics.csv rows alone.

The signatures are the paper's (PAPER.md §3), measured over the later half of the run (the evaluation
points at or after the middle step), where a phase-2 run has settled:

    3  divergence          the train error stays at chance level (1 - 1/C) and neighbouring checkpoints
                           are uncorrelated (median |cos_prev| small): a random walk on the sphere
    1  convergence         the train error reached 0, or the train loss is still falling: a clear
                           downward trend, or a fall at nearly every evaluation point, however slow
    2  chaotic equilibrium neither the train loss nor GM has a clear trend over the later half, while
                           the train error is clearly below chance (its median there)
    undecided              too few evaluation points in the later half to tell, or none of the above

The rules are tried in that order (3, then 1, then 2). A trend is the least-squares line of log(value)
against the step: its change over the later half, and its t statistic (slope over its standard error).
It is *clear* when it changes the value by more than about 10 % and stands out of the noise (|t| >= 3),
so neither one noisy point nor the fluctuations of an equilibrium make a trend.
"""

import csv
import io
import math
import os
from dataclasses import dataclass

import numpy as np

from sphrun import SphrunError
from sphrun.progress import message
from sphrun.rundir import write_text

PHASES = ("1", "2", "3")
UNDECIDED = "undecided"
MIN_WINDOW_POINTS = 4  # evaluation points in the later half needed to fit a trend
CHANCE_FRACTION = 0.9  # "at chance": train error >= 0.9 * (1 - 1/C) throughout; "clearly below": median under
UNCORRELATED_COS = 0.2  # |cosine| between neighbouring checkpoints below which they are unrelated
TREND_CHANGE = 0.1  # |change of log value| over the later half a trend must exceed: about 10 %
TREND_T = 3.0  # |t statistic| a trend must reach to stand out of the noise
MONOTONE_FRACTION = 0.8  # a loss falling at >= 80 % of the evaluation points is still falling


@dataclass(frozen=True)
class Verdict:
    phase: str  # "1", "2", "3" or "undecided"
    evidence: str  # the measurements that decided it, for the user


@dataclass(frozen=True)
class Trend:
    change: float  # of log(value) over the window, from the fitted line
    t: float  # slope / its standard error; +-inf for a perfect line

    def clear(self):
        return abs(self.change) > TREND_CHANGE and abs(self.t) >= TREND_T

    def __str__(self):
        return f"{math.expm1(self.change):+.0%} (t {self.t:+.1f})"


def later_half(rows):
    """Rows at or after the middle step between the first and the last evaluation point."""
    middle = (rows[0]["iter"] + rows[-1]["iter"]) / 2
    return [r for r in rows if r["iter"] >= middle]


def trend(window, column):
    """The least-squares line of log(column) against the step over the window."""
    steps = np.array([r["iter"] for r in window], dtype=float)
    values = np.log(np.maximum([r[column] for r in window], 1e-300))
    slope, intercept = np.polyfit(steps, values, 1)
    residuals = values - (slope * steps + intercept)
    spread = math.sqrt(float(residuals @ residuals) / (len(steps) - 2))
    standard_error = spread / math.sqrt(float(((steps - steps.mean()) ** 2).sum()))
    if standard_error > 0:
        t = slope / standard_error
    else:  # a perfect line
        t = math.copysign(math.inf, slope) if slope else 0.0
    return Trend(float(slope * (steps[-1] - steps[0])), float(t))


def falling_fraction(window, column):
    """Share of consecutive evaluation points at which `column` went down."""
    values = [r[column] for r in window]
    return sum(b < a for a, b in zip(values, values[1:])) / (len(values) - 1)


def classify(rows, num_classes):
    """The phase of a run from its metrics.csv rows (dicts with iter, train_loss, train_err, gm, cos_prev)."""
    rows = sorted(rows, key=lambda r: r["iter"])
    window = later_half(rows) if len(rows) > 1 else []
    if len(window) < MIN_WINDOW_POINTS:
        return Verdict(UNDECIDED, f"too short: {len(window)} evaluation points in the later half, "
                                  f"need {MIN_WINDOW_POINTS}")
    if not all(math.isfinite(r[c]) for r in window for c in ("train_loss", "train_err", "gm", "cos_prev")):
        return Verdict(UNDECIDED, "non-finite metrics in the later half")
    chance = 1 - 1 / num_classes
    lowest_err, highest_err = min(r["train_err"] for r in window), max(r["train_err"] for r in window)
    final_err = window[-1]["train_err"]
    typical_err = float(np.median([r["train_err"] for r in window]))  # an equilibrium fluctuates
    cos = float(np.median([abs(r["cos_prev"]) for r in window]))
    loss, gm = trend(window, "train_loss"), trend(window, "gm")
    falling = falling_fraction(window, "train_loss")
    numbers = (f"over the later half: train err {lowest_err:.3f} to {highest_err:.3f} "
               f"(chance {chance:.2f}), loss {loss}, GM {gm}, loss fell at {falling:.0%} of points, "
               f"median |cos_prev| {cos:.2f}")
    if lowest_err >= CHANCE_FRACTION * chance and cos < UNCORRELATED_COS:
        return Verdict("3", "at chance, uncorrelated: " + numbers)
    if final_err == 0:
        return Verdict("1", "converged: " + numbers)
    if (loss.clear() and loss.change < 0) or (falling >= MONOTONE_FRACTION and loss.change < 0):
        return Verdict("1", "loss falling: " + numbers)
    if not loss.clear() and not gm.clear() and typical_err < CHANCE_FRACTION * chance:
        return Verdict("2", "stationary: " + numbers)
    return Verdict(UNDECIDED, "no signature fits: " + numbers)


def borders(elrs, phases):
    """The ELR intervals where the phase changes, as (lower ELR, upper ELR, phase below, phase above),
    in increasing ELR, undecided runs skipped."""
    decided = sorted((e, p) for e, p in zip(elrs, phases) if p != UNDECIDED)
    return [(a, b, pa, pb) for (a, pa), (b, pb) in zip(decided, decided[1:]) if pa != pb]


def in_paper_order(elrs, phases):
    """True when the decided phases, by increasing ELR, never go back: 1s, then 2s, then 3s, each one
    contiguous block (a phase may be absent)."""
    decided = [p for _, p in sorted(zip(elrs, phases)) if p != UNDECIDED]
    return decided == sorted(decided)


# --- the phase table: one row per run, printed and written beside the metrics figure -------------------
TABLE_NEEDS = ("train_loss", "train_err", "test_err", "gm", "cos_prev")


def phase_table(runs):
    """One row per run (objects with path, elr, loss, num_classes and rows by step): its ELR, final
    metrics, phase and the evidence for it."""
    table = []
    for run in runs:
        missing = [c for c in TABLE_NEEDS if c not in run.rows[0]]
        if missing:
            raise SphrunError(f"{os.path.join(run.path, 'metrics.csv')} has no column {', '.join(missing)} "
                              f"(it has {', '.join(sorted(run.rows[0]))})")
        verdict = classify(run.rows, run.num_classes)
        last = max(run.rows, key=lambda r: r["iter"])
        table.append({"run": run.path, "elr": run.elr, "loss": run.loss, "steps": last["iter"],
                      "train_loss": last["train_loss"], "train_err": last["train_err"],
                      "test_err": last["test_err"], "gm": last["gm"], "phase": verdict.phase,
                      "evidence": verdict.evidence})
    return table


def table_path_for(figure_path):
    """The phase table beside the figure: fig.png -> fig-phases.csv (never a run's own metrics.csv)."""
    return os.path.splitext(figure_path)[0] + "-phases.csv"


def write_table(table, path):
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    write_text(path, buffer.getvalue())


def print_table(table, groups):
    """The table on stdout, one block per line against the ELR (groups: (label or None, run paths)),
    each with its borders between phases and a note when they are out of the paper's order."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: one line per run, however long
        console = Console(width=250)
    by_run = {row["run"]: row for row in table}
    for label, paths in groups:
        rows = sorted((by_run[p] for p in paths), key=lambda row: row["elr"])
        shown = Table(title=label, show_edge=False, pad_edge=False)
        for heading in ("ELR", "train loss", "train err", "test err", "GM", "phase", "evidence"):
            shown.add_column(heading, justify="left" if heading == "evidence" else "right", overflow="fold")
        for row in rows:
            shown.add_row(f"{row['elr']:.3g}", f"{row['train_loss']:.4g}", f"{row['train_err']:.3f}",
                          f"{row['test_err']:.3f}", f"{row['gm']:.4g}", row["phase"], row["evidence"])
        console.print(shown)
        elrs, phases = [row["elr"] for row in rows], [row["phase"] for row in rows]
        found = borders(elrs, phases)
        if found:
            console.print("borders: " + "; ".join(f"{a}|{b} between ELR {lo:.3g} and {hi:.3g}"
                                                  for lo, hi, a, b in found))
        if not in_paper_order(elrs, phases):
            console.print("note: these phases are not in the paper's order (1, then 2, then 3 as ELR "
                          "grows, each one contiguous block)")


def report_phases(table, groups, csv_path):
    """Print the table and write it as CSV (what `sphrun plot --kind metrics` does after its figure)."""
    print_table(table, groups)
    write_table(table, csv_path)
    message(f"wrote {csv_path}")
