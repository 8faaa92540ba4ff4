"""The paper's figures (docs/science.md) drawn from run directories and `sphrun connect` outputs.

Figures are matplotlib Figure objects rendered by the Agg backend (no pyplot, no display), sized for one
column of a two-column paper (3.4 in wide) and written atomically as .png, .svg or .pdf.
"""

import csv
import dataclasses
import functools
import json
import math
import os
import textwrap
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import Formatter, Locator, LogLocator, MaxNLocator, NullFormatter

from sphrun import SphrunError
from sphrun.config import TrainConfig
from sphrun.phases import UNDECIDED, agreement, classify, phase_table, report_phases, table_path_for
from sphrun.progress import message
from sphrun.rundir import RunDir, atomic_write

KINDS = ("phase", "metrics", "cosine", "connect", "curvature", "projection")
FORMATS = (".png", ".svg", ".pdf")
COLUMN_WIDTH = 3.4  # inches
STYLE = {"font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "legend.fontsize": 6,
         "xtick.labelsize": 6, "ytick.labelsize": 6, "lines.linewidth": 1.0, "lines.markersize": 3}
ELR_COLORS = "viridis"
PHASE_COLORS = {"1": "#d6ecd2", "2": "#fbe3c0", "3": "#f4cccc"}
DATASET_NAMES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "synthetic": "synthetic data"}
LOSS_NAMES = {"ce": "cross-entropy", "mse": "MSE"}
LOSS_MARKERS = {"ce": "o", "mse": "s"}
PERCENT_COLUMNS = ("train_err", "test_err", "proj_err")  # fractions in the files, % on the axes
LABELS = {
    "train_loss": "train loss $L_T$", "test_loss": "test loss",
    "train_err": "train error (%)", "test_err": "test error (%)",
    "gm": "GM (mean mini-batch gradient norm)", "elr": "effective learning rate (ELR)",
    "iter": "SGD steps", "epoch": "epochs", "si_norm": "norm of the SI weights",
    "cos_prev": "cosine to the previous checkpoint", "cos_init": "cosine to the initialization",
    "proj_err": "projection error 1 - r (%)", "wall_s": "wall time (s)",
    "alpha": r"$\alpha$ (0: first run, 1: second run)",
    "fisher_trace": "Fisher trace tr F", "hessian_trace": "Hessian trace tr H",
    "hessian_eig": r"top Hessian eigenvalue $\lambda_{max}$",
}
SHORT_LABELS = {"train_loss": "train loss", "test_loss": "test loss", "gm": "GM", "elr": "ELR"}
CONNECT_COLUMNS = ("alpha", "train_loss", "train_err", "test_loss", "test_err")
# Settings that do not split runs into separate lines against the ELR: the ELR itself, the run's length
# and where it ran, and the start step and ELR of a fine-tune (its parent already tells those apart).
NOT_SERIES = ("elr", "epochs", "iters", "eval_every", "keep", "device", "data_dir", "origin", "elr_from")
PROJECTION_LIMIT = 0.02  # the paper: 1 - r stays under 2 % in phases 1 and 2
LEGEND_WRAP = 50  # characters of a legend label per line: about the width of the figure at 6 pt
BOX_SLOT = 0.8  # of the room between neighbouring ELRs on the cosine figure, shared by their boxes
SEEDS = ("seed", "data_seed")  # runs that differ only in these form one group, drawn as their mean
MAX_LINEAGE = 20  # fine-tunes of fine-tunes followed up this far (ends a loop of copied run folders)
BAND_ALPHA = 0.25  # the min-max band over seeds, in its line's colour


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
            what = "sphrun runs" if marker == "config.json" else "sphrun connect outputs"
            raise SphrunError(f"no {what} in {path} (no {marker} in it or below it)")
        found += below
    return list(dict.fromkeys(os.path.normpath(p) for p in found))


def is_target(folder, marker):
    if marker == "config.json":  # a run: a connect output has a config.json too, but also connect.csv
        return (os.path.isfile(os.path.join(folder, "config.json"))
                and not os.path.isfile(os.path.join(folder, "connect.csv")))
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


def require_columns(run, columns, source="metrics.csv"):
    missing = [c for c in columns if c not in run.columns()]
    if missing:
        raise SphrunError(f"{os.path.join(run.path, source)} has no column {', '.join(missing)} "
                          f"(it has {', '.join(sorted(run.columns()))})")


def read_curvature(run, required=True):
    """RUN/curvature.csv as rows by step, each with the measures taken there (columns like hessian-eig);
    None when there is none and none is required."""
    from sphrun.curvature import CurvatureFile

    measured, _ = CurvatureFile(run).read()
    if not measured and not required:
        return None
    if not measured:
        raise SphrunError(f"{run.path} has no curvature.csv: run `sphrun curvature {run.path}` first")
    return [{"iter": it, **values} for it, values in sorted(measured.items())]


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


def group_table(runs, aggregate=True):
    """The phase table of the runs: one row per group of seeds (per run without `aggregate`)."""
    return phase_table(labelled_series(group_series(runs, aggregate)))


# --- figure helpers ----------------------------------------------------------------------------------
def new_figure(rows=1, cols=1, height=2.6):
    """A figure one column wide with a grid of axes (always 2-d); call it under `styled`."""
    figure = Figure(figsize=(COLUMN_WIDTH, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(rows, cols, squeeze=False)


def styled(function):
    """Draw under the module's style (fonts sized for one column), whatever the caller's rcParams."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return function(*args, **kwargs)
    return wrapper


@styled
def save(figure, out_path):
    """Write the figure atomically; under the module's style, since tick labels are made as it is drawn."""
    extension = os.path.splitext(out_path)[1].lower()
    check_extension(out_path)
    folder = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(folder):
        raise SphrunError(f"cannot write {out_path}: the folder {folder} does not exist")
    atomic_write(out_path, lambda f: figure.savefig(f, format=extension[1:], dpi=300))
    return out_path


def check_extension(out_path):
    extension = os.path.splitext(out_path)[1].lower()
    if extension not in FORMATS:
        raise SphrunError(f"cannot write {out_path!r}: the figure's name must end in "
                          f"{', '.join(FORMATS)}")


def axis_label(column, losses=(), short=False):
    """The axis label of a column with its unit; `short` for the small panels of a 2x2 grid."""
    label = LABELS.get(column.replace("-", "_"), column)
    if short:
        label = SHORT_LABELS.get(column, label)
    if column in ("train_loss", "test_loss") and len(set(losses)) == 1:
        label += " (nats)" if "ce" in losses else " (mean squared error)"
    return label


def shown(column, values):
    """Values as drawn: fractions as percentages."""
    values = np.asarray(values, dtype=float)
    return values * 100 if column in PERCENT_COLUMNS else values


def set_scale(ax, axis, values, log=True):
    """Log scale where asked and every value is positive; symlog when some are 0; linear otherwise."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    setter = ax.set_xscale if axis == "x" else ax.set_yscale
    if not log or len(values) == 0 or values.min() < 0:
        setter("linear")
    elif values.min() > 0:
        setter("log")
        readable_log_ticks(ax.xaxis if axis == "x" else ax.yaxis)
    else:
        positive = values[values > 0]
        setter("symlog", linthresh=positive.min() if len(positive) else 1.0)


class ReadableLogLocator(Locator):
    """Ticks of a log axis chosen from its final limits so that several always get a label: powers of
    ten over two decades or more, 1, 2 and 5 times them over one to two, and evenly spaced plain numbers
    within a decade (where a log locator finds one tick or none)."""

    def __call__(self):
        return self.tick_values(*self.axis.get_view_interval())

    def tick_values(self, vmin, vmax):
        low, high = sorted((vmin, vmax))
        if not low > 0:
            return LogLocator().tick_values(low, high)
        if high / low >= 100:
            return LogLocator(numticks=8).tick_values(low, high)
        if high / low >= 10:
            return LogLocator(subs=(1, 2, 5), numticks=20).tick_values(low, high)
        ticks = MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
        return ticks[ticks > 0]


def readable_log_ticks(axis):
    """Labelled ticks on a log axis over any range (see ReadableLogLocator); unlabelled minor ticks."""
    axis.set_major_locator(ReadableLogLocator())
    axis.set_major_formatter(ReadableLogFormatter())
    axis.set_minor_locator(LogLocator(subs="auto"))
    axis.set_minor_formatter(NullFormatter())


class ReadableLogFormatter(Formatter):
    """Plain numbers (0.05, 20, 3000) when every tick of the axis reads well so; else powers of ten
    ($10^{-5}$, $2\\times10^{-5}$) for all of them, so that one axis never mixes the two."""

    ticks = ()

    def set_locs(self, locs):
        self.ticks = list(locs)  # every tick about to be labelled

    def __call__(self, value, pos=None):
        low, high = sorted(self.axis.get_view_interval()) if self.axis else (0, math.inf)
        if all(1e-3 <= v < 1e4 for v in self.ticks if low <= v <= high):
            return f"{value:g}"
        exponent = math.floor(math.log10(value) + 1e-9)
        mantissa = round(value / 10 ** exponent, 3)
        if mantissa == 1:
            return f"$10^{{{exponent}}}$"
        return f"${mantissa:g}\\times10^{{{exponent}}}$"


def elr_norm(elrs):
    low, high = min(elrs), max(elrs)
    if low == high:
        low, high = low / 2, high * 2
    return LogNorm(low, high)


def title(runs):
    """'CIFAR-10 (5,000 train images), cross-entropy, ConvNet c=8': the data, the losses, the models."""
    first = runs[0]
    data = describe_dataset(*dataset_key(first))
    losses = " and ".join(LOSS_NAMES.get(l, l) for l in sorted({r.loss for r in runs}))
    models = sorted({(r.settings.get("model", "convnet"), r.settings.get("width")) for r in runs}, key=str)
    model_text = ", ".join(f"{'ConvNet' if m == 'convnet' else m} c={w}" for m, w in models)
    text = f"{data}, {losses}, {model_text}"
    return text if len(text) <= 48 else f"{data}\n{losses}, {model_text}"  # 48 characters fill a column


def describe_dataset(dataset, train_size):
    name = DATASET_NAMES.get(dataset, str(dataset))
    return f"{name} ({train_size:,} train images)" if isinstance(train_size, int) else name


def elr_text(elr):
    return f"{elr:.3g}"


# --- connect -----------------------------------------------------------------------------------------
def read_connect(folder):
    path = os.path.join(folder, "connect.csv")
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = reader.fieldnames or []
    except FileNotFoundError:
        raise SphrunError(f"{folder} is not a sphrun connect output (no connect.csv)")
    missing = [c for c in CONNECT_COLUMNS if c not in header]
    if missing:
        raise SphrunError(f"{path} has no column {', '.join(missing)}")
    try:
        rows = [{k: float(v) for k, v in row.items()} for row in rows]
    except (TypeError, ValueError):
        raise SphrunError(f"{path} has a malformed row")
    if len(rows) < 2:
        raise SphrunError(f"{path} has fewer than 2 points")
    return sorted(rows, key=lambda r: r["alpha"])


def read_connect_config(folder):
    try:
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


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


def connect_figure(connect_dirs, out_path):
    """Draw the connect outputs into out_path (what `sphrun connect` calls); returns the path."""
    check_extension(out_path)
    return save(draw_connect(connect_dirs), out_path)


@styled
def draw_connect(connect_dirs):
    """Metrics along the segment between two runs' weights (figures 3, 5, 6), one line per connect
    output: train loss, train error, test error and GM (test loss where GM is absent) against alpha."""
    curves = [(os.path.basename(os.path.normpath(d)), read_connect(d)) for d in connect_dirs]
    settings = [find_settings(read_connect_config(d)) for d in connect_dirs]
    datasets = {(s.get("dataset"), s.get("subset")) for s in settings if s}
    if len(datasets) > 1:
        raise SphrunError("connect outputs on different data sets: plot each data set separately")
    fourth = "gm" if all("gm" in rows[0] for _, rows in curves) else "test_loss"
    losses = [s["loss"] for s in settings if s]
    figure, axes = new_figure(2, 2, height=3.3)
    for ax, column in zip(axes.flat, ("train_loss", "train_err", "test_err", fourth)):
        values = []
        for label, rows in curves:
            y = shown(column, [r[column] for r in rows])
            ax.plot([r["alpha"] for r in rows], y, marker=".", label=label)
            values += list(y)
        ax.set_xlabel(r"$\alpha$")
        ax.set_ylabel(axis_label(column, losses, short=True))
        set_scale(ax, "y", values, log=column in ("train_loss", "test_loss", "gm"))
        ax.set_xlim(0, 1)
    if len(curves) > 1:
        figure_legend(figure, *axes[0, 0].get_legend_handles_labels())
    s = settings[0] if settings and settings[0] else None
    heading = "Linear mode connectivity"
    if s:
        data = DATASET_NAMES.get(s["dataset"], s["dataset"])
        if s.get("subset"):
            data += f" (subset {s['subset']:g})"
        heading += f"\n{data}, {LOSS_NAMES.get(s['loss'], s['loss'])}"
        if "width" in s:
            heading += f", ConvNet c={s['width']}"
    figure.suptitle(heading)
    return figure


# --- phase diagrams ----------------------------------------------------------------------------------
def column_values(rows, column, curvature):
    """{step: value} of `column` from metrics rows or, when not there, from curvature.csv rows;
    None when neither has it. A curvature column may be named with - or _ (hessian-eig, hessian_eig)."""
    if column in rows[0]:
        return {r["iter"]: r[column] for r in rows}
    for name in (column, column.replace("_", "-")):
        values = {r["iter"]: r[name] for r in curvature or [] if name in r}
        if values:
            return values
    return None


def trajectory(run, rows, x, y, curvature):
    """Points (x, y) at the steps where both are known, by step."""
    xs, ys = column_values(rows, x, curvature), column_values(rows, y, curvature)
    if xs is None or ys is None:
        missing = x if xs is None else y
        known = sorted(set(rows[0]) | {c for r in curvature or [] for c in r})
        source = "metrics.csv or curvature.csv" if curvature else "metrics.csv, and it has no curvature.csv"
        raise SphrunError(f"{run.path}: no column {missing} in {source} (there: {', '.join(known)})")
    return [(xs[s], ys[s]) for s in sorted(xs) if s in ys]


def needs_curvature(run, columns):
    return any(c not in run.columns() for c in columns)


@styled
def phase_figure(runs, x="train_loss", y="gm", aggregate=True):
    """Trajectories of (x, y) over the evaluation points, one per run, log-log, each group of seeds in the
    colour of its ELR (figures 1, 16, 19; with curvature.csv columns figures 22, 23). Fine-tunes are
    dashed and start from their parent's point at the fork."""
    by_path = {os.path.normpath(r.path): r for r in runs}
    cmap = ScalarMappable(norm=elr_norm([r.elr for r in runs]), cmap=ELR_COLORS)
    figure, axes = new_figure(height=2.7)
    ax = axes[0, 0]
    all_x, all_y, orphan_parents = [], [], set()
    series = group_series(runs, aggregate)
    for group in (group for line in series for group in line):
        color = cmap.to_rgba(group.elr)  # the group's colour: its seeds read as one bundle
        for run in group.runs:
            points = run_points(ax, run, x, y, by_path, orphan_parents)
            if not points:
                continue
            px, py = shown(x, [p[0] for p in points]), shown(y, [p[1] for p in points])
            all_x += list(px)
            all_y += list(py)
            marker = LOSS_MARKERS.get(run.loss, "o")
            ax.plot(px, py, color=color, linestyle="--" if run.parent else "-", zorder=2)
            ax.plot(px[:1], py[:1], marker=marker, markerfacecolor="white", markeredgecolor=color,
                    linestyle="none", zorder=3)
            ax.plot(px[-1:], py[-1:], marker=marker, color=color, linestyle="none", zorder=3)
    losses = [r.loss for r in runs]
    ax.set_xlabel(axis_label(x, losses))
    ax.set_ylabel(axis_label(y, losses))
    set_scale(ax, "x", all_x, log=x not in ("cos_prev", "cos_init"))
    set_scale(ax, "y", all_y, log=y not in ("cos_prev", "cos_init"))
    figure.colorbar(cmap, ax=ax, label="ELR")
    seeds = max(len(group.runs) for line in series for group in line)
    ax.legend(handles=phase_legend(runs, bool(orphan_parents), seeds), frameon=False, loc="best")
    ax.set_title(title(runs))
    return figure


def run_points(ax, run, x, y, by_path, orphan_parents):
    """The run's (x, y) points by step; a fine-tune's start at its parent's point at the fork, and the
    parent's path to the fork drawn faintly once when the parent is not among the runs drawn."""
    curvature = read_curvature(run, required=False) if needs_curvature(run, (x, y)) else None
    points = trajectory(run, run.rows, x, y, curvature)
    parent_path, fork = parent_rows(run, by_path) if run.parent else (None, None)
    if fork and x in fork[-1] and y in fork[-1]:
        parent_point = (fork[-1][x], fork[-1][y])
        if not points or points[0] != parent_point:
            points = [parent_point] + points
        if parent_path not in by_path and parent_path not in orphan_parents:
            orphan_parents.add(parent_path)
            ax.plot(shown(x, [r[x] for r in fork]), shown(y, [r[y] for r in fork]), color="0.6",
                    linewidth=0.7, zorder=1)
    return points


def phase_legend(runs, parents_drawn=False, seeds=1):
    handles = [Line2D([], [], marker="o", markerfacecolor="white", markeredgecolor="0.3", color="0.3",
                      linestyle="none", label="start"),
               Line2D([], [], marker="o", color="0.3", linestyle="none", label="end")]
    losses = sorted({r.loss for r in runs})
    if len(losses) > 1:
        handles += [Line2D([], [], marker=LOSS_MARKERS.get(l, "o"), color="0.3", linestyle="none",
                           label=LOSS_NAMES.get(l, l)) for l in losses]
    if any(r.parent for r in runs):
        handles.append(Line2D([], [], color="0.3", linestyle="--", label="fine-tune"))
    if parents_drawn:
        handles.append(Line2D([], [], color="0.6", linewidth=0.7, label="its parent, to the fork"))
    if seeds > 1:
        handles.append(Line2D([], [], color="0.3", label=f"one line per seed (up to {seeds} per ELR)"))
    return handles


# --- final metrics and phases against the ELR -----------------------------------------------------------
def shade_phases(ax, series_rows):
    """Background bands of each run's phase, split at the geometric midpoints between neighbouring ELRs."""
    elrs = [r["elr"] for r in series_rows]
    if len(elrs) == 1:
        edges = [elrs[0] / 2, elrs[0] * 2]
    else:
        mids = [math.sqrt(a * b) for a, b in zip(elrs, elrs[1:])]
        edges = [elrs[0] ** 2 / mids[0]] + mids + [elrs[-1] ** 2 / mids[-1]]
    for row, lo, hi in zip(series_rows, edges, edges[1:]):
        if row["phase"] in PHASE_COLORS:
            ax.axvspan(lo, hi, color=PHASE_COLORS[row["phase"]], linewidth=0, zorder=0)


def phase_patches(phases):
    return [Patch(color=PHASE_COLORS[p], label=f"phase {p}") for p in sorted(set(phases) & set(PHASE_COLORS))]


def figure_legend(figure, handles, labels=None):
    """A legend below the panels, where it hides no point, kept inside the figure's width: long labels
    (a fine-tune's parent) are wrapped and then take a row each."""
    labels = [h.get_label() for h in handles] if labels is None else labels
    labels = [textwrap.fill(str(label), LEGEND_WRAP) for label in labels]
    longest = max(len(line) for label in labels for line in label.splitlines())
    columns = 1 if longest > LEGEND_WRAP // 2 else 2 if longest > LEGEND_WRAP // 3 else 3
    return figure.legend(handles, labels, frameon=False, loc="outside lower center",
                         ncols=min(columns, len(handles)))


@styled
def metrics_figure(runs, table, aggregate=True):
    """Final train loss, train error, test error and GM against the ELR (figures 2, 18, 20): one point per
    group of seeds at their mean, a band from the lowest to the highest seed, and behind the line with
    the most ELRs each group's majority phase (the rows of `table`, from group_table)."""
    by_group = {row["runs"]: row for row in table}
    series = group_series(runs, aggregate)
    figure, axes = new_figure(2, 2, height=3.3)
    losses = [r.loss for r in runs]
    shaded = [by_group[group.key] for group in series[0]]
    for ax, column in zip(axes.flat, ("train_loss", "train_err", "test_err", "gm")):
        shade_phases(ax, shaded)
        values = []
        for line in series:
            values += draw_mean_and_band(ax, line, column, series_label(line, series))
        set_scale(ax, "x", [row["elr"] for row in table])
        set_scale(ax, "y", values, log=column in ("train_loss", "gm"))
        ax.set_ylabel(axis_label(column, losses, short=True))
        ax.set_xlabel("ELR")
    handles = phase_patches([row["phase"] for row in shaded])
    if len(series) > 1:
        handles = axes[0, 0].get_legend_handles_labels()[0] + handles
    seeds = {len(group.runs) for line in series for group in line}
    if max(seeds) > 1:
        counted = f"{seeds.pop()} seeds" if len(seeds) == 1 else "seeds"
        handles.append(Patch(color="0.5", alpha=BAND_ALPHA, linewidth=0,
                             label=f"line: mean over {counted}; band: lowest to highest"))
    if handles:
        figure_legend(figure, handles)
    figure.suptitle(title(runs))
    return figure


def draw_mean_and_band(ax, line, column, label):
    """One line through the mean over each group's seeds, and where a group has several, a band from the
    lowest to the highest seed in the line's colour; returns the values drawn (for the axis' scale)."""
    elrs = [group.elr for group in line]
    finals = [shown(column, group.finals(column)) for group in line]
    means = [f.mean() for f in finals]
    drawn, = ax.plot(elrs, means, marker=LOSS_MARKERS.get(line[0].loss, "o"),
                     linestyle="--" if line[0].parent else "-", label=label)
    if all(len(group.runs) == 1 for group in line):
        return means
    lows, highs = [f.min() for f in finals], [f.max() for f in finals]
    ax.fill_between(elrs, lows, highs, color=drawn.get_color(), alpha=BAND_ALPHA, linewidth=0, zorder=1)
    return means + lows + highs


# --- cosines and projection error against the ELR -----------------------------------------------------
def later_cosines(run):
    """(spacing, cos_prev over the later half of the run), whose evaluation points must be equally spaced
    (a shorter last gap, where the run's length is not a multiple of the spacing, is left out)."""
    require_columns(run, ("cos_prev",))
    rows = run.rows
    gaps = [b["iter"] - a["iter"] for a, b in zip(rows, rows[1:])]
    if not gaps:
        raise SphrunError(f"{run.path} has a single evaluation point: no cosine between checkpoints")
    if len(gaps) > 1 and gaps[-1] < gaps[0]:
        rows, gaps = rows[:-1], gaps[:-1]
    if len(set(gaps)) > 1:
        raise SphrunError(f"{run.path}: evaluation points are not equally spaced (gaps of {min(gaps)} to "
                          f"{max(gaps)} steps, the default log-spaced schedule?), so its cosines are not "
                          f"comparable; train with --eval-every N for this figure")
    middle = (rows[0]["iter"] + rows[-1]["iter"]) / 2
    return gaps[0], [r["cos_prev"] for r in rows[1:] if r["iter"] >= middle]


def cosine_slots(series):
    """Where each group's box goes: one slot per distinct ELR, in increasing order, shared side by side by
    the lines that have a group at that ELR. Returns {group key: (centre, width)} and the slots' ELRs."""
    elrs = sorted({group.elr for line in series for group in line})
    placed = {}
    for slot, elr in enumerate(elrs):
        here = [group for line in series for group in line if group.elr == elr]
        width = BOX_SLOT / len(here)
        for k, group in enumerate(here):
            placed[group.key] = (slot + (k - (len(here) - 1) / 2) * width, 0.85 * width)
    return placed, elrs


def majority_phase(group):
    """The phase most of the group's seeds are in (undecided for a run without train_err)."""
    phases = [classify(run.rows, run.num_classes).phase if "train_err" in run.columns() else UNDECIDED
              for run in group.runs]
    return agreement(phases)[0]


@styled
def cosine_figure(runs, aggregate=True):
    """The distribution of the cosine between neighbouring checkpoints over the later half of the runs,
    one box per group of seeds, their cosines pooled (figures 10, 17), coloured by the group's majority
    phase, the ELRs in increasing order."""
    spacing, cosines = {}, {}
    for run in runs:
        spacing[run.path], cosines[run.path] = later_cosines(run)
    if len(set(spacing.values())) > 1:
        listed = ", ".join(f"{os.path.basename(p)}: {g}" for p, g in spacing.items())
        raise SphrunError(f"runs have checkpoints a different number of steps apart ({listed}); "
                          f"their cosines are not comparable: plot equally spaced runs together")
    runs = [r for r in runs if cosines[r.path]]
    if not runs:
        raise SphrunError("no run has evaluation points in its later half: train longer")
    log_spaced = [os.path.basename(r.path) for r in runs if not r.settings.get("eval_every")]
    if log_spaced:
        message(f"note: {', '.join(log_spaced)}: evaluated on the default log-spaced schedule, whose points "
                f"are equally spaced only up to epoch 10; train with --eval-every N to compare longer runs")
    figure, axes = new_figure(height=2.6)
    ax = axes[0, 0]
    series = group_series(runs, aggregate)
    placed, elrs = cosine_slots(series)
    phases = []
    for i, line in enumerate(series):
        edge = f"C{i}" if len(series) > 1 else "black"
        for group in line:
            centre, width = placed[group.key]
            pooled = [c for run in group.runs for c in cosines[run.path]]
            boxes = ax.boxplot([pooled], positions=[centre], widths=width, patch_artist=True,
                               manage_ticks=False, flierprops={"markersize": 2},
                               medianprops={"color": "black"}, boxprops={"edgecolor": edge})
            phase = majority_phase(group)
            boxes["boxes"][0].set_facecolor(PHASE_COLORS.get(phase, "white"))
            phases.append(phase)
    ax.set_xticks(range(len(elrs)), [elr_text(e) for e in elrs], rotation=90 if len(elrs) > 6 else 0)
    ax.set_xlim(-0.5, len(elrs) - 0.5)
    ax.axhline(0, color="0.6", linewidth=0.5, zorder=0)
    ax.set_xlabel(axis_label("elr"))
    ax.set_ylabel(f"cosine between checkpoints\n{next(iter(spacing.values()))} steps apart")
    handles = phase_patches(phases)
    if len(series) > 1:
        handles += [Patch(facecolor="white", edgecolor=f"C{i}", label=series_label(line, series))
                    for i, line in enumerate(series)]
    if handles:
        figure_legend(figure, handles)
    ax.set_title(title(runs))
    return figure


@styled
def projection_figure(runs, aggregate=True):
    """The projection error 1 - r against the ELR (figure 25): mean over the steps of each group's seeds,
    with the range over their evaluation intervals, and the paper's 2 % line."""
    series = group_series(runs, aggregate)
    figure, axes = new_figure(height=2.5)
    ax = axes[0, 0]
    values = []
    for line in series:
        for group in line:
            for run in group.runs:
                require_columns(run, ("proj_err",))
        # the first row of a run is its starting point: no step was taken before it
        intervals = [shown("proj_err", [r["proj_err"] for run in group.runs for r in run.rows[1:]])
                     for group in line]
        if not all(len(i) for i in intervals):
            raise SphrunError("a run has a single evaluation point: no projection error to show")
        means = np.array([i.mean() for i in intervals])
        low = means - np.array([i.min() for i in intervals])
        high = np.array([i.max() for i in intervals]) - means
        ax.errorbar([group.elr for group in line], means, yerr=[low, high],
                    marker=LOSS_MARKERS.get(line[0].loss, "o"), capsize=1.5,
                    label=series_label(line, series) if len(series) > 1 else None)
        values += list(means - low)
    ax.axhline(100 * PROJECTION_LIMIT, color="0.4", linestyle=":", linewidth=0.8, label="2 %")
    set_scale(ax, "x", [r.elr for r in runs])
    set_scale(ax, "y", values + [100 * PROJECTION_LIMIT])
    ax.set_xlabel(axis_label("elr"))
    ax.set_ylabel(axis_label("proj_err"))
    ax.legend(frameon=False, loc="best")
    ax.set_title(title(runs))
    return figure


# --- the command -------------------------------------------------------------------------------------
def default_out(dirs, kind):
    """`<kind>.png` in the folder that holds the runs; `<run>-<kind>.png` beside a single run."""
    if any(os.path.isabs(d) for d in dirs):
        dirs = [os.path.abspath(d) for d in dirs]
    if len(dirs) == 1:
        return os.path.join(os.path.dirname(dirs[0]), f"{os.path.basename(dirs[0])}-{kind}.png")
    return os.path.join(os.path.commonpath([os.path.dirname(d) for d in dirs]), f"{kind}.png")


def default_out_for(paths, dirs, kind):
    """A single folder of runs named on the command line holds the figure; otherwise see default_out."""
    if len(paths) == 1 and os.path.normpath(paths[0]) not in dirs:
        return os.path.join(paths[0], f"{kind}.png")
    return default_out(dirs, kind)


def curvature_measure(runs, y):
    """--y for the curvature kind: the asked column, else the first measure of the first curvature.csv."""
    if y:
        return y
    columns = list(dict.fromkeys(c for r in read_curvature(runs[0]) for c in r if c != "iter"))
    preferred = [c for c in columns if c != "gm"] or columns
    if not preferred:
        raise SphrunError(f"{runs[0].path}/curvature.csv has no measure column")
    return preferred[0]


def with_curvature(runs):
    """The runs that have a curvature.csv; the others are named in a note, and none at all is an error."""
    measured = [run for run in runs if read_curvature(run, required=False)]
    if not measured:
        raise SphrunError(f"no run has a curvature.csv: run `sphrun curvature RUN` first "
                          f"(e.g. on {runs[0].path})")
    for run in runs:
        if run not in measured:
            message(f"note: {run.path} has no curvature.csv and is left out "
                    f"(run `sphrun curvature {run.path}` to add it)")
    return measured


def plot(paths, kind, out=None, x=None, y=None, aggregate=True):
    """Draw the figure of `kind` from the runs (or connect outputs) in `paths`; returns its path. With
    `aggregate`, runs that differ only in their seeds are drawn (and tabled) as one group."""
    if kind not in KINDS:
        raise SphrunError(f"unknown kind {kind!r}: choose one of {', '.join(KINDS)}")
    if out is not None:
        check_extension(out)
    if (x or y) and kind not in ("phase", "curvature"):
        raise SphrunError(f"--x and --y apply to the phase and curvature kinds, not to {kind}")
    if kind == "connect":
        dirs = find_dirs(paths, "connect.csv")
        return connect_figure(dirs, out or default_out_for(paths, dirs, kind))
    dirs = find_dirs(paths, "config.json")
    runs = load_runs(dirs)
    out = out or default_out_for(paths, dirs, kind)
    if aggregate:
        note_repeated_seeds(group_series(runs))
    if kind == "metrics":  # the figure, then the phase table on stdout and beside the figure
        table = group_table(runs, aggregate)
        save(metrics_figure(runs, table, aggregate), out)
        report_phases(table, table_path_for(out))
        return out
    if kind == "phase":
        figure = phase_figure(runs, x or "train_loss", y or "gm", aggregate)
    elif kind == "curvature":
        runs = with_curvature(runs)
        figure = phase_figure(runs, x or "train_loss", curvature_measure(runs, y), aggregate)
    elif kind == "cosine":
        figure = cosine_figure(runs, aggregate)
    else:
        figure = projection_figure(runs, aggregate)
    return save(figure, out)
