"""Which of the paper's three training regimes a run is in, read from its metrics.csv rows alone.

The signatures are the paper's (docs/science.md, The three phases), measured over the later half of the run (the evaluation
points at or after the middle step), and tried in this order:

    3  divergence          the train error stays at chance level (1 - 1/C) and neighbouring checkpoints
                           are uncorrelated: a random walk on the sphere
    1  convergence         the train error reached 0; or it is heading there, down by a third or more
                           over the later half; or the weights are settling (they turned little in all
                           over the later half) while the train loss does not rise
    2  chaotic equilibrium the train error stays clearly above 0 and clearly below chance, down by less
                           than a quarter over the later half, while the weights keep turning; settled
                           or still settling
    undecided              too few evaluation points in the later half, or no signature fits

The train error and the path of the weights decide, not the trends of loss and GM: on the default
log-spaced schedule a long run has only 4 points in its later half, where a small trend of noise often
looks real, and a phase-2 run still settling has falling loss and GM as a converging one does. What
tells them apart is the train error (stuck well above 0, or on its way to 0: large changes, which noise
rarely fakes) and how far the weights turn between checkpoints. A trend is the least-squares line of
log(value) against the step; its t statistic (slope over standard error) must reach 3 to count.
"""

import csv
import io
import math
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

from sphrun.rundir import write_text
from sphrun.runs import group_series, labelled_series, require_columns

PHASES = ("1", "2", "3")
UNDECIDED = "undecided"
MIN_WINDOW_POINTS = 4  # evaluation points in the later half: fewer tell nothing
CHANCE_FRACTION = 0.9  # "at chance": train error >= 0.9 * (1 - 1/C) throughout; "clearly below": median under
UNCORRELATED_COS = 0.2  # median |cos_prev| under which neighbouring checkpoints are unrelated
SETTLED_ANGLE = 0.5  # radians the weights turn at most over the later half of a converging run
MOVING_ANGLE = 1.0  # radians they turn at least over the later half of an equilibrium
HEADING_TO_ZERO = math.log(2 / 3)  # change of log(train error) over the later half: fell by a third or more
STUCK = math.log(3 / 4)  # ... and above this (fell by less than a quarter, or rose): an error that stays
CLEARLY_ABOVE_ZERO = 0.01  # median train error an equilibrium keeps: a run under 1 % is near convergence
TREND_T = 3.0  # |t statistic| a trend must reach to stand out of the noise


@dataclass(frozen=True)
class Verdict:
    phase: str  # "1", "2", "3" or "undecided"
    evidence: str  # what decided it, then the measurements, for the user


@dataclass(frozen=True)
class Trend:
    change: float  # of log(value) over the window, from the fitted line
    t: float  # slope / its standard error; +-inf for a perfect line

    def significant(self):
        return abs(self.t) >= TREND_T

    def __str__(self):
        return f"{math.expm1(self.change):+.0%} (t {self.t:+.1f})"


@dataclass(frozen=True)
class Signs:
    """The measurements of the later half that the rules read."""
    chance: float  # train error at chance level, 1 - 1/C
    lowest_err: float
    highest_err: float
    typical_err: float  # median: an equilibrium fluctuates
    err: Trend
    loss: Trend
    gm: Trend
    cos: float  # median |cos_prev|
    turned: float  # radians: the sum of the angles between neighbouring checkpoints

    def __str__(self):
        return (f"over the later half: train err {self.lowest_err:.3f} to {self.highest_err:.3f} "
                f"(median {self.typical_err:.3f}, chance {self.chance:.2f}), err {self.err}, "
                f"loss {self.loss}, GM {self.gm}, median |cos_prev| {self.cos:.4f}, "
                f"weights turned {self.turned:.2f} rad")


def later_half(rows):
    """Rows at or after the middle step between the first and the last evaluation point."""
    middle = (rows[0]["iter"] + rows[-1]["iter"]) / 2
    return [r for r in rows if r["iter"] >= middle]


def trend(window, column, floor=1e-300):
    """The least-squares line of log(column) against the step over the window (values under `floor`
    count as `floor`)."""
    steps = np.array([r["iter"] for r in window], dtype=float)
    values = np.log(np.maximum([r[column] for r in window], floor))
    slope, intercept = np.polyfit(steps, values, 1)
    residuals = values - (slope * steps + intercept)
    spread = math.sqrt(float(residuals @ residuals) / (len(steps) - 2))
    standard_error = spread / math.sqrt(float(((steps - steps.mean()) ** 2).sum()))
    if standard_error > 0:
        t = slope / standard_error
    else:  # a perfect line
        t = math.copysign(math.inf, slope) if slope else 0.0
    return Trend(float(slope * (steps[-1] - steps[0])), float(t))


def signs(window, num_classes):
    """What the rules read from the later half (`window`, rows by step) of a run with C classes."""
    errors = [r["train_err"] for r in window]
    positive = [e for e in errors if e > 0]
    # an error of 0 at some points: log(0) taken as half the smallest error seen, a fall to 0 a big fall
    floor = min(positive) / 2 if positive else 1.0
    return Signs(chance=1 - 1 / num_classes, lowest_err=min(errors), highest_err=max(errors),
                 typical_err=float(np.median(errors)), err=trend(window, "train_err", floor),
                 loss=trend(window, "train_loss"), gm=trend(window, "gm"),
                 cos=float(np.median([abs(r["cos_prev"]) for r in window])), turned=turned(window))


def turned(window):
    """The path of the weights over the window in radians: the angles between neighbouring checkpoints
    added up. A converged run hardly turns; an equilibrium keeps turning, by more the finer the
    checkpoints sample its wandering, so the sum tells them apart at any spacing."""
    return float(sum(math.acos(min(1.0, max(-1.0, r["cos_prev"]))) for r in window[1:]))


def classify(rows, num_classes):
    """The phase of a run from its metrics.csv rows (dicts with iter, train_loss, train_err, gm, cos_prev)."""
    rows = sorted(rows, key=lambda r: r["iter"])
    window = later_half(rows) if len(rows) > 1 else []
    if len(window) < MIN_WINDOW_POINTS:
        return Verdict(UNDECIDED, f"too short: {len(window)} evaluation points in the later half, "
                                  f"need {MIN_WINDOW_POINTS}")
    if not all(math.isfinite(r[c]) for r in window for c in ("train_loss", "train_err", "gm", "cos_prev")):
        return Verdict(UNDECIDED, "non-finite metrics in the later half")
    s = signs(window, num_classes)
    phase, reason = decide(s)
    return Verdict(phase, f"{reason}; {s}")


def decide(s):
    """(phase, the reason in words) from the signs of the later half, by the rules in the module's
    docstring."""
    at_chance = s.lowest_err >= CHANCE_FRACTION * s.chance
    below_chance = s.typical_err < CHANCE_FRACTION * s.chance
    if at_chance and s.cos < UNCORRELATED_COS:
        return "3", "random walk: train error at chance, checkpoints uncorrelated"
    if s.lowest_err == 0:
        return "1", "converged: train error reached 0"
    if s.err.change <= HEADING_TO_ZERO and s.err.significant():
        return "1", "train error heading to 0: down by a third or more"
    rising = s.loss.change > 0 and s.loss.significant()
    if s.turned <= SETTLED_ANGLE and below_chance and not rising:
        return "1", f"weights settling: turned under {SETTLED_ANGLE} rad, train loss not rising"
    stuck = s.err.change > STUCK
    if s.turned >= MOVING_ANGLE and below_chance and s.typical_err >= CLEARLY_ABOVE_ZERO and stuck:
        settled = not (s.loss.significant() or s.gm.significant())
        return "2", "equilibrium: train error stuck between 0 and chance, weights moving" + (
            "" if settled else " (loss or GM still settling)")
    if not below_chance and s.cos < UNCORRELATED_COS:
        return UNDECIDED, ("no signature fits: checkpoints uncorrelated, train error near chance but not "
                           "throughout")
    if not below_chance:
        return UNDECIDED, "no signature fits: train error near chance, checkpoints correlated (stuck?)"
    if s.turned <= SETTLED_ANGLE:
        return UNDECIDED, "no signature fits: weights settling but the train loss rising"
    if s.turned < MOVING_ANGLE:
        return UNDECIDED, (f"no signature fits: weights turned {s.turned:.2f} rad, between settling "
                           f"(<= {SETTLED_ANGLE}) and moving (>= {MOVING_ANGLE}); train longer")
    if not stuck:
        return UNDECIDED, ("no signature fits: train error falling, by a quarter to a third, while the "
                           "weights move; train longer")
    return UNDECIDED, "no signature fits: train error under 1 % but not 0, weights moving"


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


# --- the phase table: one row per group of seeds, printed and written beside the metrics figure -------
TABLE_NEEDS = ("train_loss", "train_err", "test_err", "gm", "cos_prev")
FINAL_METRICS = ("train_loss", "train_err", "test_err", "gm")


def checked_rows(run):
    """The run's metrics rows, refused in one line when a column the table reads is missing."""
    require_columns(run, TABLE_NEEDS)
    return run.rows


def seed_names(runs):
    """'s0', 's1', ... for each run; 's0/d1' (init seed / data seed) when the data seeds differ too."""
    data_seeds = {r.settings.get("data_seed", 0) for r in runs}
    return [f"s{r.settings.get('seed', 0)}" + (f"/d{r.settings.get('data_seed', 0)}" if len(data_seeds) > 1 else "")
            for r in runs]


def agreement(phases):
    """(the phase most seeds have, how many: '2 (3/3)'); a tie at the top is undecided, '1 or 2 (1/2 each)'."""
    counts = Counter(phases)
    top = max(counts.values())
    leaders = sorted(p for p, n in counts.items() if n == top)
    if len(leaders) > 1:
        return UNDECIDED, f"{' or '.join(leaders)} ({top}/{len(phases)} each)"
    return leaders[0], f"{leaders[0]} ({top}/{len(phases)})"


def spread(values):
    """(mean, sample standard deviation) over the seeds; the deviation is None for a single seed."""
    values = np.asarray(values, dtype=float)
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def group_row(label, runs):
    """The table's row for one group of runs that differ only in their seeds."""
    verdicts = [classify(checked_rows(run), run.num_classes) for run in runs]
    finals = [max(run.rows, key=lambda r: r["iter"]) for run in runs]
    names = seed_names(runs)
    phases = [v.phase for v in verdicts]
    majority, agreed = agreement(phases)
    steps = sorted({int(f["iter"]) for f in finals})
    row = {"series": label or "", "elr": runs[0].elr, "loss": runs[0].loss, "seeds": len(runs),
           "phase": majority, "agreement": agreed,
           "phases": " ".join(f"{n}:{p}" for n, p in zip(names, phases)),
           "steps": steps[0] if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"}
    for column in FINAL_METRICS:
        row[column], row[f"{column}_std"] = spread([f[column] for f in finals])
    row["runs"] = ";".join(run.path for run in runs)
    row["evidence"] = verdicts[0].evidence if len(runs) == 1 else " | ".join(
        f"{n}: {v.evidence}" for n, v in zip(names, verdicts))
    return row


def phase_table(series):
    """One row per group of runs that differ only in their seeds: its ELR, number of seeds, the phase of
    each, their agreement, and the mean and std of the final metrics. `series`: the lines against the
    ELR as (label or None, groups by ELR), each group a list of runs (path, elr, loss, settings,
    num_classes and rows by step)."""
    return [group_row(label, group) for label, groups in series for group in groups]


def group_table(runs, aggregate=True):
    """The phase table of sphrun.runs Runs: one row per group of seeds (per run without `aggregate`)."""
    return phase_table(labelled_series(group_series(runs, aggregate)))


def majority_phase(group):
    """The phase most of a sphrun.runs Group's seeds are in (undecided for a run without train_err)."""
    phases = [classify(run.rows, run.num_classes).phase if "train_err" in run.columns() else UNDECIDED
              for run in group.runs]
    return agreement(phases)[0]


def table_path_for(figure_path):
    """The phase table beside the figure: fig.png -> fig-phases.csv (never a run's own metrics.csv)."""
    return os.path.splitext(figure_path)[0] + "-phases.csv"


def write_table(table, path):
    """The table as CSV; a std is empty where a group has a single seed."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    for row in table:
        writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    write_text(path, buffer.getvalue())


def with_std(row, column, digits):
    """'mean +- std' of a final metric, the mean alone for a single seed."""
    mean, std = row[column], row[f"{column}_std"]
    return f"{mean:.{digits}}" if std is None else f"{mean:.{digits}} ± {std:.{digits}}"


def short_evidence(row):
    """A single run's evidence in full; for several seeds the rule that decided each, seeds with the same
    rule together (the measurements are in the CSV), so the row stays readable."""
    if row["seeds"] == 1:
        return row["evidence"]
    by_rule = {}
    for part in row["evidence"].split(" | "):
        name, evidence = part.split(": ", 1)
        by_rule.setdefault(evidence.split(";")[0], []).append(name)
    return " | ".join(f"{' '.join(names)}: {rule}" for rule, names in by_rule.items())


def print_table(table):
    """The table on stdout, one block per line against the ELR, each with the borders between its groups'
    majority phases and a note when they are out of the paper's order."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a log file or a pipe: one line per group, however long
        console = Console(width=250)
    for label in dict.fromkeys(row["series"] for row in table):
        rows = sorted((row for row in table if row["series"] == label), key=lambda row: row["elr"])
        shown = Table(title=label or None, show_edge=False, pad_edge=False)
        for heading in ("ELR", "seeds", "train loss", "train err", "test err", "GM", "phase", "per seed",
                        "evidence"):
            shown.add_column(heading, justify="left" if heading == "evidence" else "right", overflow="fold")
        for row in rows:
            shown.add_row(f"{row['elr']:.3g}", str(row["seeds"]), with_std(row, "train_loss", "4g"),
                          with_std(row, "train_err", "3f"), with_std(row, "test_err", "3f"),
                          with_std(row, "gm", "4g"), row["agreement"], row["phases"], short_evidence(row))
        console.print(shown)
        uneven = [row for row in rows if isinstance(row["steps"], str)]
        if uneven:
            console.print("note: the seeds of ELR " + ", ".join(f"{row['elr']:.3g}" for row in uneven)
                          + " end at different steps; their final metrics are averaged as they are")
        elrs, phases = [row["elr"] for row in rows], [row["phase"] for row in rows]
        found = borders(elrs, phases)
        if found:
            console.print("borders: " + "; ".join(f"{a}|{b} between ELR {lo:.3g} and {hi:.3g}"
                                                  for lo, hi, a, b in found))
        if not in_paper_order(elrs, phases):
            console.print("note: these phases are not in the paper's order (1, then 2, then 3 as ELR "
                          "grows, each one contiguous block)")


def report_phases(table, csv_path):
    """Print the table and write it as CSV (what `sphrun plot --kind metrics` does with its figure, which
    says where it wrote both once both are written)."""
    print_table(table)
    write_table(table, csv_path)
