"""The phase table: one row per group of seeds (sphrun.runs), with each seed's phase by the rules of
sphrun.phases, the phase most seeds have, the final metrics as mean and spread, and the borders between
phases; printed, and written as CSV beside the metrics figure.
"""

import csv
import io
import os
from collections import Counter

import numpy as np

from sphrun.files import write_text
from sphrun.phases import UNDECIDED, borders, classify, in_paper_order
from sphrun.runs import group_series, labelled_series, require_columns


TABLE_NEEDS = ("epoch", "train_loss", "train_err", "test_err", "gm", "cos_prev")
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
    if all(v.too_short for v in verdicts):  # say why: a longer run may be decided
        agreed = "; ".join(dict.fromkeys(v.label for v in verdicts))
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
