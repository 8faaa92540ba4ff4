"""The paper's figures (docs/science.md) drawn from run directories and `sphrun connect` outputs, and
`sphrun plot`, which picks one by its kind (KINDS). How they look is sphrun.style's; which runs form a
line or a group of seeds, sphrun.runs'."""

import math
import os
from typing import Callable, NamedTuple

import numpy as np
from matplotlib import patheffects
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize, to_rgba
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator
from matplotlib.tri import CubicTriInterpolator, Triangulation

from sphrun import SphrunError
from sphrun.files import written_together
from sphrun.phase_table import group_table, majority_phase, report_phases, table_path_for
from sphrun.phases import TOO_SHORT, UNDECIDED
from sphrun.progress import message
from sphrun.runs import (CONNECT_MARKER, LOSS_NAMES, PLANE_MARKER, RUN_MARKER, connect_train_size, dataset_key,
                         describe_dataset, elr_text, epoch_at, find_dirs, find_settings, group_series, load_runs,
                         note_repeated_seeds, parent_rows, read_connect, read_connect_config, read_curvature,
                         read_density, read_plane, require_columns, series_label)
from sphrun.style import (BAND_ALPHA, BAND_EDGE, ELR_COLORS, LOSS_MARKERS, PHASE_COLORS, PHASE_EDGES,
                          UNDECIDED_SHADE, ReadableLogFormatter, ReadableLogLocator, axis_label, check_out, elr_norm,
                          figure_legend, new_figure, phase_patches, save, set_scale, shown, styled)

PROJECTION_LIMIT = 0.02  # the paper: 1 - r stays under 2 % in phases 1 and 2
BOX_SLOT = 0.8  # of the room between neighbouring ELRs on the cosine figure, shared by their boxes
CONNECT_MARGIN = 0.04  # of the alpha axis beyond each end, where the end's marker is drawn whole
LONE_BAND = 1.2  # a single ELR's phase is shaded this factor either side of it, where its point is
NEAR_BOUND = 0.5  # of the cosines' spread: 0 (uncorrelated) or 1 (parallel) that near them stays in view
SURFACE_LEVELS = 12  # filled contour levels of a panel of the plane
SURFACE_COLORS = "viridis"
ROUND_STEPS = [1, 2, 2.5, 5, 10]  # times a power of ten: the plane's even levels and colour-bar ticks
DRAWN_GRID = 201  # points per axis the plane's surface is drawn on, interpolated from the measured grid
PLANE_LAYOUT = {False: (2.3, 1.4), True: (1.4, 1.95)}  # inches: a panel's width, the room around: alone, two
LOG_COLUMNS = ("train_loss", "test_loss", "gm")  # drawn on log scales (levels) where all positive
DENSITY_FLOOR = 1e-6  # of the highest density: the bottom of the spectrum's log axis
STEP_COLORS = "plasma"  # one run's densities at several steps, early to late


def title(runs, in_legend=()):
    """'CIFAR-10 (5,000 train images), cross-entropy, ConvNet c=8': the data, the losses, the models; the
    losses or models the legend names (`in_legend`: "losses", "models") are left to it where they differ."""
    losses = {r.loss for r in runs}
    models = {(r.settings.get("model", "convnet"), r.settings.get("width")) for r in runs}
    if "losses" in in_legend and len(losses) > 1:
        losses = set()
    if "models" in in_legend and len(models) > 1:
        models = set()
    return heading(describe_dataset(*dataset_key(runs[0])), losses, models)


def heading(data, losses, models):
    """The data set, the losses and the (model, width) pairs in one line, or two where one would not fit."""
    losses = " and ".join(LOSS_NAMES.get(l, l) for l in sorted(losses))
    model_text = ", ".join(f"{'ConvNet' if m == 'convnet' else m} c={w}" for m, w in sorted(models, key=str))
    rest = ", ".join(part for part in (losses, model_text) if part)
    text = ", ".join(part for part in (data, rest) if part)
    return text if len(text) <= 48 or not rest else f"{data}\n{rest}"  # 48 characters fill a column


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
        return " to ".join(end_label(config[key]) for key in ("a", "b"))
    except (KeyError, TypeError, ValueError):
        return os.path.basename(os.path.normpath(folder))


def end_label(end):
    """An end of a connect output (its config.json's record) as 'ELR 0.001 s0 @900'."""
    return (f"{'ELR' if end['settings'].get('sphere', True) else 'lr'} "
            f"{elr_text(float(end.get('elr') or end['settings']['elr']))} s{end['settings']['seed']} @{end['iter']}")


# --- the plane through three solutions -------------------------------------------------------------
def plane_figure(folder, out_path, columns=("train_loss", "test_err")):
    """Draw a plane output into out_path (what `sphrun connect A B C` calls); returns the path."""
    check_out(out_path)
    return save(draw_plane(folder, columns), out_path)


@styled
def draw_plane(folder, columns=("train_loss", "test_err")):
    """Filled contours of each of `columns` over the plane through three solutions (Garipov et al. 2018,
    figure 1), one panel each, side by side: log levels for losses and GM, even ones for errors (%); the
    solutions marked and named, the segments between them dashed, the cosine of the angle at A and the
    measured grid in the legend."""
    config = read_connect_config(folder)
    us, vs, values = read_plane(folder)
    unknown = [c for c in columns if c not in values]
    if unknown:
        raise SphrunError(f"{os.path.join(folder, PLANE_MARKER)} has no column {', '.join(unknown)} "
                          f"(it has {', '.join(values)})")
    try:
        corners = [config["basis"][key] for key in ("b", "c")]
        labels = [f"{letter}: {end_label(config[letter.lower()])}" for letter in "ABC"]
    except (KeyError, TypeError, ValueError):
        raise SphrunError(f"{folder}/config.json does not say where the three solutions lie; run "
                          f"`sphrun connect A B C` again")
    points = np.array([[0.0, 0.0], corners[0], corners[1]])
    settings = find_settings(config) or {}
    losses = [settings["loss"]] if "loss" in settings else []
    # equal axes: each panel as tall as the plane's shape wants at the width it gets, plus the room of the
    # title, colour bars (above two panels, beside one), axis labels and legend
    width, room = PLANE_LAYOUT[len(columns) > 1]
    shape = (vs[-1] - vs[0]) / (us[-1] - us[0])
    figure, axes = new_figure(1, len(columns), height=width * min(max(shape, 0.35), 1.3) + room)
    for ax, column in zip(axes[0], columns):
        draw_surface(figure, ax, us, vs, shown(column, values[column]), column, losses,
                     bar_at="top" if len(columns) > 1 else "right")
        draw_triangle(ax, points)
        ax.set_xlim(us[0], us[-1])
        ax.set_ylim(vs[0], vs[-1])
        ax.set_aspect("equal")
        ax.set_xlabel("u: along B - A")
    axes[0, 0].set_ylabel("v: toward C")
    handles = [Line2D([], [], marker="o", markerfacecolor="white", markeredgecolor="black", color="black",
                      linestyle="none", label=label) for label in labels]
    handles.append(Line2D([], [], color="black", linestyle="--",
                          label=f"segments between them; cos(angle at A) = {config['basis']['cos_a']:.3f}"))
    smooth = all(np.isfinite(values[column]).all() for column in columns)  # as `interpolated` draws them
    handles.append(Line2D([], [], linestyle="none", label=f"u, v in weight space; {len(us)} x {len(vs)} grid"
                                                          + (", interpolated" if smooth else "")))
    figure_legend(figure, handles)
    if settings:
        data = describe_dataset(settings.get("dataset"), connect_train_size(config))
        model = (settings.get("model", "convnet"), settings.get("width"))
        figure.suptitle(heading(data, {settings["loss"]}, {model}))
    return figure


def draw_surface(figure, ax, us, vs, z, column, losses, bar_at):
    """Filled contours of the measured grid z (rows by v, columns by u) on its levels, drawn interpolated,
    with a colour bar (`bar_at` the panel's top or right) labelled at round values."""
    levels, norm = surface_levels(z, log=column in LOG_COLUMNS)
    filled = ax.contourf(*interpolated(us, vs, z, isinstance(norm, LogNorm)), levels=levels, norm=norm,
                         cmap=SURFACE_COLORS, extend="neither")
    bar = figure.colorbar(filled, ax=ax, location=bar_at, label=axis_label(column, losses, short=True))
    if isinstance(norm, LogNorm):  # a few nice labelled values, not all the levels
        bar.locator, bar.formatter = ReadableLogLocator(), ReadableLogFormatter()
    else:
        bar.locator = MaxNLocator(nbins=5, steps=ROUND_STEPS)


def interpolated(us, vs, z, log):
    """(u, v, z) to draw: the measured grid interpolated on a DRAWN_GRID x DRAWN_GRID one by a C1 cubic over
    its cells' triangles (of log z for log levels), kept within the measured range, so that a coarse grid
    draws curved contours and no band that was not measured, not the facets of linear interpolation. A
    grid with a non-finite point is drawn as measured."""
    if not np.isfinite(z).all():
        return us, vs, z
    values = np.log(z) if log else z
    columns = len(us)
    corner = np.arange(columns * len(vs)).reshape(len(vs), columns)[:-1, :-1].ravel()  # each cell's (0, 0)
    triangles = np.concatenate([np.stack([corner, corner + 1, corner + columns + 1], axis=1),
                                np.stack([corner, corner + columns + 1, corner + columns], axis=1)])
    grid_u, grid_v = np.meshgrid(us, vs)
    cubic = CubicTriInterpolator(Triangulation(grid_u.ravel(), grid_v.ravel(), triangles), values.ravel(),
                                 kind="geom")
    fine_u, fine_v = np.linspace(us[0], us[-1], DRAWN_GRID), np.linspace(vs[0], vs[-1], DRAWN_GRID)
    fine = np.clip(cubic(*np.meshgrid(fine_u, fine_v)).filled(np.nan), values.min(), values.max())
    return fine_u, fine_v, np.exp(fine) if log else fine


def surface_levels(z, log):
    """(levels, norm) of filled contours spanning z's finite values: SURFACE_LEVELS geometric steps (log,
    where all are positive) or even ones at round steps (ROUND_STEPS)."""
    finite = z[np.isfinite(z)]
    low, high = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
    if log and low > 0:
        if high <= low:
            low, high = low / 1.1, high * 1.1  # a flat surface: one band around its value
        return np.geomspace(low, high, SURFACE_LEVELS + 1), LogNorm(low, high)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    levels = MaxNLocator(SURFACE_LEVELS, steps=ROUND_STEPS).tick_values(low, high)
    return levels, Normalize(levels[0], levels[-1])


def draw_triangle(ax, points):
    """The three solutions at `points` (A, B, C as rows (u, v)): white dots with black rims, their letters
    beside them, and the dashed segments between them."""
    closed = np.vstack([points, points[:1]])
    ax.plot(closed[:, 0], closed[:, 1], color="black", linestyle="--", linewidth=0.8, zorder=3)
    ax.plot(points[:, 0], points[:, 1], marker="o", markerfacecolor="white", markeredgecolor="black",
            linestyle="none", zorder=4)
    outline = [patheffects.withStroke(linewidth=2, foreground="white")]  # legible on any colour
    for letter, (u, v) in zip("ABC", points):
        ax.annotate(letter, (u, v), xytext=(3, 3), textcoords="offset points", fontweight="bold", zorder=5,
                    path_effects=outline)


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
    seeds = max(len(group.runs) for line in series for group in line)
    handles = phase_legend(runs, bool(orphan_parents), seeds)
    elrs = sorted({r.elr for r in runs})
    if len(elrs) > 1:
        figure.colorbar(cmap, ax=ax, label="ELR")
    else:  # one ELR (a run, its seeds, a schedule's fine-tunes): the legend names it; a bar of one value says nothing
        handles.insert(0, Line2D([], [], color=cmap.to_rgba(elrs[0]), label=f"ELR {elr_text(elrs[0])}"))
    figure_legend(figure, handles)  # below: trajectories go anywhere
    ax.set_title(title(runs, in_legend=("losses",)))
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


# --- the Hessian's eigenvalue density ------------------------------------------------------------------
def with_density(runs):
    """{run path: {step: Density}} of the runs that have a hessian-density.csv; the others are named in a
    note, and none at all is an error."""
    curves = {run.path: read_density(run) for run in runs}
    if not any(curves.values()):
        raise SphrunError(f"no run has a hessian-density.csv: run `sphrun curvature RUN --measures "
                          f"hessian-density` first (e.g. on {runs[0].path})")
    for run in runs:
        if not curves[run.path]:
            message(f"note: {run.path} has no hessian-density.csv and is left out")
    return {path: by_step for path, by_step in curves.items() if by_step}


@styled
def spectrum_figure(runs):
    """The Hessian's eigenvalue density (Ghorbani, Krishnan and Xiao 2019, figure 1) on a log density axis,
    which shows the bulk near 0 and the outliers alike: of several runs, each at its last measured step
    in the colour of its ELR (as the phase diagram), or of one run at each measured step, early to late;
    the legend says which steps."""
    curves = with_density(runs)
    runs = [run for run in runs if run.path in curves]
    figure, axes = new_figure(height=2.6)
    ax = axes[0, 0]
    if len(runs) == 1:
        drawn, key = one_runs_spectra(figure, ax, runs[0], curves[runs[0].path])
    else:
        colors = ScalarMappable(norm=elr_norm([r.elr for r in runs]), cmap=ELR_COLORS)
        drawn = [(colors.to_rgba(run.elr), curves[run.path][max(curves[run.path])]) for run in runs]
        figure.colorbar(colors, ax=ax, label="ELR")
        key = f"each run at {steps_text([(run, max(curves[run.path])) for run in runs])}"
    peak = max(max(curve.density) for _, curve in drawn)
    floor = DENSITY_FLOOR * peak
    for color, curve in drawn:
        ax.plot(*to_floor(curve, floor), color=color)
    ax.set_yscale("log")
    ax.set_ylim(floor, 2 * peak)
    ax.set_xlabel(r"Hessian eigenvalue $\lambda$")
    ax.set_ylabel(r"density (1 / $\lambda$)")
    ax.set_title(title(runs))
    figure_legend(figure, [Line2D([], [], color=drawn[-1][0] if len(drawn) == 1 else "0.3", label=key)])
    return figure


def one_runs_spectra(figure, ax, run, by_step):
    """(colour, curve) of one run's densities, and the legend's words for them: at one step, in the first
    colour of the cycle; at several, early to late along a colour bar of the steps."""
    if len(by_step) == 1:
        (step, curve), = by_step.items()
        return [("C0", curve)], f"ELR {elr_text(run.elr)} at {steps_text([(run, step)])}"
    colors = ScalarMappable(norm=Normalize(min(by_step), max(by_step)), cmap=STEP_COLORS)
    figure.colorbar(colors, ax=ax, label=axis_label("iter"))
    return ([(colors.to_rgba(step), curve) for step, curve in sorted(by_step.items())],
            f"ELR {elr_text(run.elr)}, one line per measured step")


def steps_text(measured):
    """'step 60 (epoch 20)' when every (run, step) is at the same step, else 'its last step: 60 to 90 (epochs
    20 to 30)': where the drawn densities were measured."""
    steps = sorted({step for _, step in measured})
    epochs = sorted({epoch_at(run, step) for run, step in measured} - {None})
    in_epochs = "" if not epochs else (f" (epoch {epochs[0]:.4g})" if len(epochs) == 1
                                       else f" (epochs {epochs[0]:.4g} to {epochs[-1]:.4g})")
    if len(steps) == 1:
        return f"step {steps[0]}{in_epochs}"
    return f"its last step: {steps[0]} to {steps[-1]}{in_epochs}"


def to_floor(curve, floor):
    """A density's points to draw, each end dropped below the axis' floor: its grid stops 5 smoothing widths
    past the outermost Ritz values, where the density may still be just above the floor, and a tail
    left there would stop in mid-air."""
    below = floor / 10  # under the axis: the line leaves it at the floor, as the curve's other tails do
    eigenvalues = [curve.eigenvalues[0], *curve.eigenvalues, curve.eigenvalues[-1]]
    return eigenvalues, [below, *np.maximum(curve.density, below), below]


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
        else:
            ax.axvspan(lo, hi, **UNDECIDED_SHADE, linewidth=0, zorder=0)


def undecided_label(row):
    """A group without a phase as the legend names it: 'undecided', or why, when its runs are too short
    (its agreement says 'undecided (too short: 10 epochs, needs 20)')."""
    return row["agreement"] if TOO_SHORT in row["agreement"] else UNDECIDED


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
    patches = phase_patches([row["phase"] for row in shaded],
                            undecided=[undecided_label(row) for row in shaded if row["phase"] not in PHASE_COLORS])
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
    figure.suptitle(title(runs, in_legend=("losses", "models")))
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
    ax.set_title(title(runs, in_legend=("losses", "models")))
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
    ax.set_title(title(runs, in_legend=("losses", "models")))
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


def plane_kind(folders, request):
    if len(folders) != 1:
        raise SphrunError(f"--kind plane draws one plane output, got {len(folders)}: {', '.join(folders)}")
    return draw_plane(folders[0], (request.y,) if request.y else ("train_loss", "test_err"))


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
    takes: tuple = ()  # which of --x and --y apply


# A new figure is a function and a line here.
KINDS = {
    "phase": Kind(phase_kind, takes=("x", "y")),
    "metrics": Kind(metrics_kind),
    "cosine": Kind(lambda runs, request: cosine_figure(runs, request.aggregate)),
    "connect": Kind(lambda folders, request: draw_connect(folders), reads=CONNECT_MARKER),
    "curvature": Kind(curvature_kind, takes=("x", "y")),
    "projection": Kind(lambda runs, request: projection_figure(runs, request.aggregate)),
    "plane": Kind(plane_kind, reads=PLANE_MARKER, takes=("y",)),
    "spectrum": Kind(lambda runs, request: spectrum_figure(runs)),
}


def plot(paths, kind, out=None, x=None, y=None, aggregate=True):
    """Draw the figure of `kind` from the runs (or connect outputs) in `paths`; returns its path. With
    `aggregate`, runs that differ only in their seeds are drawn (and tabled) as one group."""
    if kind not in KINDS:
        raise SphrunError(f"unknown kind {kind!r}: choose one of {', '.join(KINDS)}")
    chosen = KINDS[kind]
    for option, value in (("x", x), ("y", y)):
        if value and option not in chosen.takes:
            takers = " and ".join(name for name, k in KINDS.items() if option in k.takes)
            raise SphrunError(f"--{option} applies to the {takers} kinds, not to {kind}")
    if out is not None:
        check_out(out)
    dirs = find_dirs(paths, chosen.reads)
    request = Request(x, y, aggregate, out or default_out_for(paths, dirs, kind))
    check_out(request.out)
    if chosen.reads == RUN_MARKER:
        dirs = load_runs(dirs)
        if aggregate:
            note_repeated_seeds(group_series(dirs))
    with written_together() as written:  # the figure and its table (metrics: -phases.csv) change together
        figure = save(chosen.draw(dirs, request), request.out)
    for path in written:
        if path != figure:
            message(f"wrote {path}")
    return figure
