"""The paper's figures (docs/science.md) drawn from run directories and `sphrun connect` outputs, and
`sphrun plot`, which picks one by its kind (KINDS). How they look is sphrun.style's; which runs form a
line or a group of seeds, sphrun.runs'."""

import math
import os
from typing import Callable, NamedTuple

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import to_rgba
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from sphrun import SphrunError
from sphrun.phases import group_table, majority_phase, report_phases, table_path_for
from sphrun.progress import message
from sphrun.runs import (CONNECT_MARKER, LOSS_NAMES, RUN_MARKER, connect_train_size, dataset_key,
                         describe_dataset, elr_text, find_dirs, find_settings, group_series, load_runs,
                         note_repeated_seeds, parent_rows, read_connect, read_connect_config, read_curvature,
                         require_columns, series_label)
from sphrun.style import (BAND_ALPHA, BAND_EDGE, ELR_COLORS, LOSS_MARKERS, PHASE_COLORS, PHASE_EDGES, axis_label,
                          check_out, elr_norm, figure_legend, new_figure, phase_patches, save, set_scale, shown,
                          styled)

PROJECTION_LIMIT = 0.02  # the paper: 1 - r stays under 2 % in phases 1 and 2
BOX_SLOT = 0.8  # of the room between neighbouring ELRs on the cosine figure, shared by their boxes
CONNECT_MARGIN = 0.04  # of the alpha axis beyond each end, where the end's marker is drawn whole
LONE_BAND = 1.2  # a single ELR's phase is shaded this factor either side of it, where its point is
NEAR_BOUND = 0.5  # of the cosines' spread: 0 (uncorrelated) or 1 (parallel) that near them stays in view


def title(runs):
    """'CIFAR-10 (5,000 train images), cross-entropy, ConvNet c=8': the data, the losses, the models."""
    models = {(r.settings.get("model", "convnet"), r.settings.get("width")) for r in runs}
    return heading(describe_dataset(*dataset_key(runs[0])), {r.loss for r in runs}, models)


def heading(data, losses, models):
    """The data set, the losses and the (model, width) pairs in one line, or two where one would not fit."""
    losses = " and ".join(LOSS_NAMES.get(l, l) for l in sorted(losses))
    model_text = ", ".join(f"{'ConvNet' if m == 'convnet' else m} c={w}" for m, w in sorted(models, key=str))
    text = f"{data}, {losses}, {model_text}"
    return text if len(text) <= 48 else f"{data}\n{losses}, {model_text}"  # 48 characters fill a column


# --- connect -----------------------------------------------------------------------------------------
def connect_figure(connect_dirs, out_path):
    """Draw the connect outputs into out_path (what `sphrun connect` calls); returns the path."""
    check_out(out_path)
    return save(draw_connect(connect_dirs), out_path)


@styled
def draw_connect(connect_dirs):
    """Metrics along the segment between two runs' weights (figures 3, 5, 6), one line per connect
    output, named by its two ends: train loss, train error, test error and GM (test loss where GM is
    absent) against alpha."""
    configs = [read_connect_config(d) for d in connect_dirs]
    curves = [(segment_label(d, c), read_connect(d)) for d, c in zip(connect_dirs, configs)]
    settings = [find_settings(c) for c in configs]
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
        ax.set_xlim(-CONNECT_MARGIN, 1 + CONNECT_MARGIN)  # the ends' markers whole, not cut by the axes
    figure_legend(figure, *axes[0, 0].get_legend_handles_labels())
    s = settings[0] if settings and settings[0] else None
    text = "Linear mode connectivity"
    if s:
        data = describe_dataset(s["dataset"], connect_train_size(configs[0]))
        text += "\n" + heading(data, {s["loss"]}, {(s.get("model", "convnet"), s.get("width"))})
    figure.suptitle(text)
    return figure


def segment_label(folder, config):
    """A connect output's two ends by ELR, seed and step, as 'ELR 0.001 s0 @900 to ELR 0.001 s1 @900' (lr
    for runs off the sphere); the folder's name when its config.json does not say."""
    try:
        ends = [config["a"], config["b"]]
        return " to ".join(f"{'ELR' if e['settings'].get('sphere', True) else 'lr'} "
                           f"{elr_text(float(e.get('elr') or e['settings']['elr']))} s{e['settings']['seed']}"
                           f" @{e['iter']}" for e in ends)
    except (KeyError, TypeError, ValueError):
        return os.path.basename(os.path.normpath(folder))


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
    figure, axes = new_figure(height=3.0)
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
    figure_legend(figure, phase_legend(runs, bool(orphan_parents), seeds))  # below: trajectories go anywhere
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
    """Background bands of each group's phase, split at the geometric midpoints between neighbouring ELRs
    and ending at the outermost ones: no phase is claimed where nothing was measured."""
    elrs = [r["elr"] for r in series_rows]
    if len(elrs) == 1:
        edges = [elrs[0] / LONE_BAND, elrs[0] * LONE_BAND]
    else:
        edges = [elrs[0]] + [math.sqrt(a * b) for a, b in zip(elrs, elrs[1:])] + [elrs[-1]]
    for row, lo, hi in zip(series_rows, edges, edges[1:]):
        if row["phase"] in PHASE_COLORS:
            ax.axvspan(lo, hi, color=PHASE_COLORS[row["phase"]], linewidth=0, zorder=0)


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
        set_scale(ax, "x", [row["elr"] for row in table], powers=True)
        set_scale(ax, "y", values, log=column in ("train_loss", "gm"))
        ax.set_ylabel(axis_label(column, losses, short=True))
        ax.set_xlabel("ELR")
    handles, labels = axes[0, 0].get_legend_handles_labels() if len(series) > 1 else ([], [])
    patches = phase_patches([row["phase"] for row in shaded])
    handles, labels = handles + patches, labels + [p.get_label() for p in patches]
    seeds = {len(group.runs) for line in series for group in line}
    if max(seeds) > 1:  # a key to the lines and bands, drawn as the first line is
        first = axes[0, 0].get_lines()[0]
        band = Patch(color=first.get_color(), alpha=BAND_ALPHA, linewidth=0)
        handles.append((band, Line2D([], [], color=first.get_color(), marker=first.get_marker())))
        counted = f"{seeds.pop()} seeds" if len(seeds) == 1 else "seeds"
        labels.append(f"line: mean over {counted}; band: lowest to highest")
    if handles:
        figure_legend(figure, handles, labels)
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
    # outlined in full colour: over a phase's shading a pale fill alone turns muddy
    ax.fill_between(elrs, lows, highs, facecolor=to_rgba(drawn.get_color(), BAND_ALPHA),
                    edgecolor=drawn.get_color(), linewidth=BAND_EDGE, zorder=1)
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
        for group in line:
            centre, width = placed[group.key]
            phase = majority_phase(group)
            phases.append(phase)
            pooled = [c for run in group.runs for c in cosines[run.path]]
            draw_box(ax, pooled, centre, width, phase, f"C{i}" if len(series) > 1 else None)
    ax.set_xticks(range(len(elrs)), [elr_text(e) for e in elrs], rotation=90 if len(elrs) > 6 else 0)
    ax.set_xlim(-0.5, len(elrs) - 0.5)
    fit_cosine_axis(ax, [c for values in cosines.values() for c in values])
    ax.set_xlabel(axis_label("elr"))
    ax.set_ylabel(f"cosine between checkpoints\n{next(iter(spacing.values()))} steps apart")
    handles = phase_patches(phases, outlined=True)
    if len(series) > 1:
        handles += [Patch(facecolor="white", edgecolor=f"C{i}", label=series_label(line, series))
                    for i, line in enumerate(series)]
    if handles:
        figure_legend(figure, handles)
    ax.set_title(title(runs))
    return figure


def draw_box(ax, values, centre, width, phase, outline=None):
    """A box of `values` filled with its phase's pale colour and drawn in its dark one, so that even a
    flat box (cosines all alike) shows its phase; `outline`: the box's edge in its line's colour instead,
    where several lines share the figure."""
    dark = PHASE_EDGES.get(phase, "black")
    lines = {"color": dark}
    ax.boxplot([values], positions=[centre], widths=width, patch_artist=True, manage_ticks=False,
               boxprops={"facecolor": PHASE_COLORS.get(phase, "white"), "edgecolor": outline or dark},
               whiskerprops=lines, capprops=lines, medianprops=lines,
               flierprops={"markersize": 2, "markeredgecolor": dark})


def fit_cosine_axis(ax, cosines):
    """The y axis fitted to the cosines, so that boxes within 0.94-1 are boxes, not flat bars; 0
    (uncorrelated: a line marks it) and 1 (parallel) are kept in view only when the cosines come near."""
    low, high = min(cosines), max(cosines)
    near = NEAR_BOUND * max(high - low, 1e-3)
    low, high = (min(low, 0.0) if low <= near else low), (1.0 if 1 - high <= near else high)
    pad = 0.05 * max(high - low, 1e-3)
    ax.set_ylim(low - pad, high + pad)
    if low <= 0:
        ax.axhline(0, color="0.6", linewidth=0.5, zorder=0)


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
    set_scale(ax, "x", [r.elr for r in runs], powers=True)
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


def phase_kind(runs, request):
    return phase_figure(runs, request.x or "train_loss", request.y or "gm", request.aggregate)


def curvature_kind(runs, request):
    runs = with_curvature(runs)
    return phase_figure(runs, request.x or "train_loss", curvature_measure(runs, request.y), request.aggregate)


def metrics_kind(runs, request):
    """The metrics figure; its phase table printed and written beside it."""
    table = group_table(runs, request.aggregate)
    figure = metrics_figure(runs, table, request.aggregate)
    report_phases(table, table_path_for(request.out))
    return figure


class Request(NamedTuple):
    """What `sphrun plot` was asked besides the kind: --x and --y (None for the kind's own), whether
    seeds are grouped, and the figure's path."""
    x: str | None
    y: str | None
    aggregate: bool
    out: str


class Kind(NamedTuple):
    """A figure `sphrun plot --kind` draws: draw(runs, request) returns it (given the folders themselves
    when it reads connect outputs); `reads` is the file that marks a folder it draws from."""
    draw: Callable
    reads: str = RUN_MARKER
    takes_xy: bool = False  # --x and --y apply


# A new figure is a function and a line here.
KINDS = {
    "phase": Kind(phase_kind, takes_xy=True),
    "metrics": Kind(metrics_kind),
    "cosine": Kind(lambda runs, request: cosine_figure(runs, request.aggregate)),
    "connect": Kind(lambda folders, request: draw_connect(folders), reads=CONNECT_MARKER),
    "curvature": Kind(curvature_kind, takes_xy=True),
    "projection": Kind(lambda runs, request: projection_figure(runs, request.aggregate)),
}


def plot(paths, kind, out=None, x=None, y=None, aggregate=True):
    """Draw the figure of `kind` from the runs (or connect outputs) in `paths`; returns its path. With
    `aggregate`, runs that differ only in their seeds are drawn (and tabled) as one group."""
    if kind not in KINDS:
        raise SphrunError(f"unknown kind {kind!r}: choose one of {', '.join(KINDS)}")
    chosen = KINDS[kind]
    if (x or y) and not chosen.takes_xy:
        takers = " and ".join(name for name, k in KINDS.items() if k.takes_xy)
        raise SphrunError(f"--x and --y apply to the {takers} kinds, not to {kind}")
    if out is not None:
        check_out(out)
    dirs = find_dirs(paths, chosen.reads)
    request = Request(x, y, aggregate, out or default_out_for(paths, dirs, kind))
    check_out(request.out)
    if chosen.reads != RUN_MARKER:
        return save(chosen.draw(dirs, request), request.out)
    runs = load_runs(dirs)
    if aggregate:
        note_repeated_seeds(group_series(runs))
    return save(chosen.draw(runs, request), request.out)
