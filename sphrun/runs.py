"""Run directories and `sphrun connect` outputs read for the figures and the phase table, and runs grouped
into lines against the ELR: runs that differ only in their seeds form one group."""

import csv
import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np

from sphrun import SphrunError
from sphrun.config import TrainConfig
from sphrun.curvature import SCALARS, CurvatureFile
from sphrun.progress import message
from sphrun.rundir import OUTPUT_TABLES, RunDir

DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "synthetic": "synthetic data"}
LOSS_NAMES = {"ce": "cross-entropy", "mse": "MSE"}
CONNECT_COLUMNS = ("alpha", "train_loss", "train_err", "test_loss", "test_err")
RUN_MARKER, CONNECT_MARKER, PLANE_MARKER = "config.json", "connect.csv", "plane.csv"  # in a run, a segment, a plane
# Settings that do not split runs into separate lines against the ELR: the ELR itself, the run's length
# and where it ran, and the start step and ELR of a fine-tune (its parent already tells those apart).
NOT_SERIES = ("elr", "epochs", "iters", "eval_every", "keep", "device", "data_dir", "origin", "elr_from")
SEEDS = ("seed", "data_seed")  # runs that differ only in these form one group, drawn as their mean
MAX_LINEAGE = 20  # fine-tunes of fine-tunes followed up this far (ends a loop of copied run folders)


# --- reading runs ------------------------------------------------------------------------------------
@dataclass
class Run:
    path: str
    config: dict
    rows: list  # metrics.csv, by step

    @property
    def settings(self):
        return self.config["settings"]

    @property
    def elr(self):
        return float(self.settings["elr"])

    @property
    def loss(self):
        return self.settings["loss"]

    @property
    def num_classes(self):
        return int(self.config.get("num_classes", 10))

    @property
    def parent(self):
        return self.config.get("parent")

    def columns(self):
        return set(self.rows[0])


def load_run(path):
    run = RunDir(path)
    config = run.read_config()
    if not os.path.isfile(run.metrics_path):
        raise SphrunError(f"{path} has no metrics.csv: it has not been evaluated yet")
    rows = sorted(run.read_metrics(), key=lambda r: r["iter"])
    if not rows:
        raise SphrunError(f"{run.metrics_path} has no rows yet: wait for the first evaluation point")
    if not isinstance(config.get("settings"), dict) or "elr" not in config["settings"]:
        raise SphrunError(f"{run.config_path} has no settings with an elr")
    return Run(str(path), config, rows)


def find_dirs(paths, marker):
    """Directories holding `marker` (config.json for runs, connect.csv for connect outputs): each path
    itself when it holds one, else every such directory below it (not looking inside a found one)."""
    found = []
    for path in paths:
        if not os.path.isdir(path):
            raise SphrunError(f"{path} is not a directory: give run directories or folders of runs")
        if is_target(path, marker):
            found.append(path)
            continue
        below = []
        for folder, subfolders, files in os.walk(path):
            subfolders.sort()
            if folder != path and is_target(folder, marker):
                below.append(folder)
                subfolders.clear()
        if not below:
            what = "sphrun runs" if marker == RUN_MARKER else "sphrun connect outputs"
            raise SphrunError(f"no {what} in {path} (no {marker} in it or below it)")
        found += below
    return list(dict.fromkeys(os.path.normpath(p) for p in found))


def is_target(folder, marker):
    if marker == RUN_MARKER:  # a run: a connect output has a config.json too, but also its table
        return (os.path.isfile(os.path.join(folder, RUN_MARKER))
                and not any(os.path.isfile(os.path.join(folder, table)) for table in OUTPUT_TABLES))
    return os.path.isfile(os.path.join(folder, marker))


def load_runs(dirs):
    runs = [load_run(d) for d in dirs]
    datasets = {dataset_key(r) for r in runs}
    if len(datasets) > 1:
        listed = "; ".join(f"{describe_dataset(*d)}" for d in sorted(datasets, key=str))
        raise SphrunError(f"runs on different data sets ({listed}): plot each data set separately")
    return sorted(runs, key=lambda r: (r.loss, r.parent is not None, r.elr, r.path))


def dataset_key(run):
    return run.settings.get("dataset"), run.config.get("train_size")


def describe_dataset(dataset, train_size):
    name = DATASET_NAMES.get(dataset, str(dataset))
    return f"{name} ({train_size:,} train images)" if isinstance(train_size, int) else name


def elr_text(elr):
    """An ELR as run names show it: 3 significant digits."""
    return f"{elr:.3g}"


def epoch_at(run, step):
    """The epoch at a step of the run, as metrics.csv counts them (steps / steps per epoch, from the first
    run of the lineage); None when its rows cannot say (no row past step 0)."""
    for row in run.rows:
        if row["iter"] == step:
            return row["epoch"]
    last = run.rows[-1]
    return step * last["epoch"] / last["iter"] if last["iter"] > 0 else None


def require_columns(run, columns, source="metrics.csv"):
    missing = [c for c in columns if c not in run.columns()]
    if missing:
        raise SphrunError(f"{os.path.join(run.path, source)} has no column {', '.join(missing)} "
                          f"(it has {', '.join(sorted(run.columns()))})")


def read_curvature(run, required=True):
    """RUN/curvature.csv as rows by step, each with the scalar measures taken there (columns like
    hessian-eig); None when there is none and none is required."""
    rows, _ = CurvatureFile(run).read()
    measured = {it: {m: v for m, v in values.items() if m in SCALARS} for it, values in rows.items()}
    measured = {it: values for it, values in measured.items() if values}
    if not measured and not required:
        return None
    if not measured:
        raise SphrunError(f"{run.path} has no curvature.csv: run `sphrun curvature {run.path}` first")
    return [{"iter": it, **values} for it, values in sorted(measured.items())]


def read_density(run):
    """RUN/hessian-density.csv as {step: Density}; empty when there is none."""
    return CurvatureFile(run).read_densities()


def find_parent(run, runs_by_path):
    """A fine-tune's parent as a Run: among the runs given, else read from disk; None when not readable."""
    parent = run.parent
    if not isinstance(parent, dict) or "run" not in parent:
        return None
    # recorded relative to where the fine-tune was started: try there, then beside the fine-tune
    named = str(parent["run"])
    candidates = [named, os.path.join(os.path.dirname(run.path), os.path.basename(os.path.normpath(named)))]
    for candidate in candidates:
        key = os.path.normpath(str(candidate))
        if key in runs_by_path:
            return runs_by_path[key]
        if os.path.isfile(os.path.join(key, "metrics.csv")):
            try:
                return load_run(key)
            except SphrunError:
                continue
    return None


def parent_rows(run, runs_by_path):
    """(the parent's path, its metrics rows up to the fork) for a fine-tune whose parent can be read,
    else (None, None)."""
    if not isinstance(run.parent, dict) or "run" not in run.parent:
        return None, None
    source = find_parent(run, runs_by_path)
    if source is None:
        message(f"note: the parent {run.parent['run']} of fine-tune {run.path} is not readable; "
                f"its line starts at the fork alone")
        return None, None
    fork = int(run.parent.get("iter", run.rows[0]["iter"]))
    return os.path.normpath(source.path), [r for r in source.rows if r["iter"] <= fork] or None


# --- groups of seeds, lines against the ELR ------------------------------------------------------------
class Group:
    """Runs that differ only in their seeds (init and data seed): one point against the ELR, one box, one
    row of the phase table. Without aggregation every run is a group of one."""

    def __init__(self, runs):
        self.runs = sorted(runs, key=seed_order)

    @property
    def elr(self):
        return self.runs[0].elr

    @property
    def loss(self):
        return self.runs[0].loss

    @property
    def parent(self):
        return self.runs[0].parent

    @property
    def key(self):
        """The group's runs as the phase table names them (its `runs` column)."""
        return ";".join(run.path for run in self.runs)

    def finals(self, column):
        """The column's value at each run's last evaluation point, by seed."""
        return np.array([max(run.rows, key=lambda r: r["iter"])[column] for run in self.runs], dtype=float)


def full_settings(run):
    """The run's settings, with today's default for a setting its (older) config.json lacks."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                if f.default is not dataclasses.MISSING}
    return {**defaults, **run.settings}


def seed_order(run):
    """Runs of a group by init seed, then data seed (s0, s1, ... in the table)."""
    settings = full_settings(run)
    return settings["seed"], settings["data_seed"], run.path


def series_key(run, aggregate=True, runs_by_path=None, depth=0):
    """What sets a run's line against the ELR apart: its settings but the ELR, the run's length and where
    it ran (and its seeds when `aggregate`), and for a fine-tune its parent and fork."""
    ignored = NOT_SERIES + SEEDS if aggregate else NOT_SERIES
    settings = tuple(sorted((k, repr(v)) for k, v in full_settings(run).items() if k not in ignored))
    return settings, lineage_key(run, aggregate, runs_by_path or {}, depth)


def lineage_key(run, aggregate, runs_by_path, depth):
    """None for a run from init; else the fork's step and the parent: its recorded path, or, when seeds
    are aggregated and it can be read, its own line and ELR, so that the fine-tunes of the seeds of one
    setting share a line (and a group at each ELR)."""
    parent = run.parent if isinstance(run.parent, dict) else None
    if not parent:
        return None
    source = find_parent(run, runs_by_path) if aggregate and depth < MAX_LINEAGE else None
    if source is None:
        return str(parent.get("run")), parent.get("iter")
    return series_key(source, aggregate, runs_by_path, depth + 1), source.elr, parent.get("iter")


def group_series(runs, aggregate=True):
    """The runs as lines against the ELR, each a list of Groups by increasing ELR, the line with the most
    ELRs first. Runs that differ only in their seeds form one group; without `aggregate`, each its own."""
    runs_by_path = {os.path.normpath(r.path): r for r in runs}
    lines = {}
    for run in runs:
        groups = lines.setdefault(series_key(run, aggregate, runs_by_path), {})
        groups.setdefault(run.elr if aggregate else run.path, []).append(run)
    series = [sorted((Group(g) for g in groups.values()), key=lambda g: (g.elr, g.runs[0].path))
              for groups in lines.values()]
    return sorted(series, key=lambda line: (-len(line), line[0].loss, line[0].runs[0].path))


def note_repeated_seeds(series):
    """Say so when two runs of a group have the same seeds (the same run trained twice, for another
    length or into another folder): both count in its mean."""
    for line in series:
        for group in line:
            seeds = [seed_order(run)[:2] for run in group.runs]
            if len(set(seeds)) < len(seeds):
                message(f"note: runs with the same seeds at ELR {elr_text(group.elr)} are averaged as if "
                        f"they were different seeds: {', '.join(group.key.split(';'))}")


def series_label(line, series):
    """What tells this line apart: the loss when losses differ, the parent for fine-tunes, and the
    settings that are the same along each line but differ between lines."""
    first = line[0].runs[0]
    parts = []
    if len({other[0].loss for other in series}) > 1:
        parts.append(LOSS_NAMES.get(first.loss, first.loss))
    if first.parent:
        parents = {str(run.parent.get("run")) for group in line for run in group.runs}
        parts.append(f"fine-tuned from {os.path.basename(str(first.parent.get('run')))} "
                     f"at step {first.parent.get('iter')}"
                     + (f" (and {len(parents) - 1} other seeds' runs)" if len(parents) > 1 else ""))
    constant = [constant_settings(other) for other in series]
    differing = [k for k in constant[0] if k not in NOT_SERIES + ("loss",)
                 and all(k in c for c in constant) and len({c[k] for c in constant}) > 1]
    parts += [f"{k}={full_settings(first).get(k)}" for k in differing]
    return ", ".join(parts) or "from init"


def constant_settings(line):
    """{setting: repr of its value} of the settings every run of the line shares (seeds of a line of
    aggregated groups vary along it, so they name no line)."""
    settings = [full_settings(run) for group in line for run in group.runs]
    return {k: repr(v) for k, v in settings[0].items() if all(repr(s.get(k)) == repr(v) for s in settings)}


def labelled_series(series):
    """(label, the groups' runs) per line, as sphrun.phases.phase_table wants; no label for a single line."""
    return [(series_label(line, series) if len(series) > 1 else None, [group.runs for group in line])
            for line in series]


# --- connect outputs --------------------------------------------------------------------------------
def read_table(folder, table, columns, what):
    """(its path, its rows as floats, its header) of the CSV `table` of a connect output, refused in one
    line when absent, short of one of `columns` or malformed."""
    path = os.path.join(folder, table)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except FileNotFoundError:
        raise SphrunError(f"{folder} is not a sphrun {what} (no {table})")
    missing = [c for c in columns if c not in header]
    if missing:
        raise SphrunError(f"{path} has no column {', '.join(missing)}")
    try:
        return path, [{k: float(v) for k, v in row.items()} for row in rows], header
    except (TypeError, ValueError):
        raise SphrunError(f"{path} has a malformed row")


def read_connect(folder):
    path, rows, _ = read_table(folder, CONNECT_MARKER, CONNECT_COLUMNS, "connect output")
    if len(rows) < 2:
        raise SphrunError(f"{path} has fewer than 2 points")
    return sorted(rows, key=lambda r: r["alpha"])


PLANE_COLUMNS = ("u", "v", "train_loss", "train_err", "test_loss", "test_err")


def read_plane(folder):
    """A plane output (`sphrun connect A B C`): (u values, v values, {column: values as a 2-d array, row i
    at the i-th v, column j at the j-th u}), the grid's axes ascending."""
    path, rows, header = read_table(folder, PLANE_MARKER, PLANE_COLUMNS, "plane output")
    us, vs = sorted({r["u"] for r in rows}), sorted({r["v"] for r in rows})
    if len(us) < 2 or len(vs) < 2 or len(rows) != len(us) * len(vs):
        raise SphrunError(f"{path} is not a full grid of at least 2 x 2 points ({len(rows)} rows over "
                          f"{len(us)} u and {len(vs)} v values)")
    index_u, index_v = {u: j for j, u in enumerate(us)}, {v: i for i, v in enumerate(vs)}
    grids = {c: np.full((len(vs), len(us)), np.nan) for c in header if c not in ("u", "v")}
    for r in rows:
        for c, grid in grids.items():
            grid[index_v[r["v"]], index_u[r["u"]]] = r[c]
    return np.array(us), np.array(vs), grids


def read_connect_config(folder):
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def connect_train_size(config):
    """The train set's size of a connect output: recorded in its config.json, else (an output of an
    older sphrun) read from end A's run where it still is; None when neither says."""
    if isinstance(config.get("train_size"), int):
        return config["train_size"]
    try:
        return RunDir(str(config["a"]["run"])).read_config().get("train_size")
    except (KeyError, TypeError, SphrunError, OSError):
        return None


def find_settings(tree):
    """The first dict with a dataset and a loss anywhere in a connect config (the sources' settings)."""
    if isinstance(tree, dict):
        if "dataset" in tree and "loss" in tree:
            return tree
        children = tree.values()
    elif isinstance(tree, list):
        children = tree
    else:
        return None
    for child in children:
        found = find_settings(child)
        if found:
            return found
    return None

