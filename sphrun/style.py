"""How every figure looks: one column of a two-column paper (3.4 in wide, 7 pt type), axis labels with
their units, log axes whose ticks are always labelled, legends below the panels, and atomic saving.

Figures are matplotlib Figure objects rendered by the Agg backend (no pyplot, no display)."""

import functools
import math
import os
import textwrap

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import Formatter, Locator, LogLocator, MaxNLocator, NullFormatter

from sphrun import SphrunError
from sphrun.files import atomic_write, check_output_file

FORMATS = (".png", ".svg", ".pdf")
COLUMN_WIDTH = 3.4  # inches
STYLE = {"font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7, "legend.fontsize": 6,
         "xtick.labelsize": 6, "ytick.labelsize": 6, "lines.linewidth": 1.0, "lines.markersize": 3}
ELR_COLORS = "viridis"
PHASE_COLORS = {"1": "#d6ecd2", "2": "#fbe3c0", "3": "#f4cccc"}  # pale: shading, fills
PHASE_EDGES = {"1": "#3f8a36", "2": "#c77a10", "3": "#b8413f"}  # the same hues, dark: lines, outlines
UNDECIDED_SHADE = {"facecolor": "#f2f2f2", "edgecolor": "#b8b8b8", "hatch": "////"}  # no verdict: grey, hatched
LOSS_MARKERS = {"ce": "o", "mse": "s"}
PERCENT_COLUMNS = ("train_err", "test_err", "proj_err")  # fractions in the files, % on the axes
LABELS = {
    "train_loss": "train loss $L_T$", "test_loss": "test loss",
    "train_err": "train error (%)", "test_err": "test error (%)",
    "gm": r"GM, mean $\|\nabla_{\mathrm{SI}} L_b\|$", "elr": "effective learning rate (ELR)",
    "iter": "SGD steps", "epoch": "epochs", "si_norm": "norm of the SI weights",
    "cos_prev": "cosine to the previous checkpoint", "cos_init": "cosine to the initialization",
    "proj_err": "projection error 1 - r (%)", "wall_s": "wall time (s)",
    "alpha": r"$\alpha$ (0: first run, 1: second run)",
    "fisher_trace": "Fisher trace tr F", "hessian_trace": "Hessian trace tr H",
    "hessian_eig": r"top Hessian eigenvalue $\lambda_{max}$",
}
SHORT_LABELS = {"train_loss": "train loss", "test_loss": "test loss", "gm": "GM", "elr": "ELR"}
BAND_ALPHA = 0.25  # the min-max band over seeds, in its line's colour
BAND_EDGE = 0.5  # the width of its edges' lines (points)
LEGEND_WRAP = 50  # characters of a legend label per line: about the width of the figure at 6 pt


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
    check_out(out_path)
    extension = os.path.splitext(out_path)[1].lower()
    atomic_write(out_path, lambda f: figure.savefig(f, format=extension[1:], dpi=300))
    return out_path


def check_out(out_path):
    """Refuse a figure path `save` cannot write, before anything is drawn: its format, its folder."""
    extension = os.path.splitext(out_path)[1].lower()
    if extension not in FORMATS:
        raise SphrunError(f"cannot write {out_path!r}: the figure's name must end in "
                          f"{', '.join(FORMATS)}")
    check_output_file(out_path)


def axis_label(column, losses=(), short=False):
    """The axis label of a column with its unit; `short` for the small panels of a 2x2 grid."""
    label = LABELS.get(column.replace("-", "_"), column)
    if short:
        label = SHORT_LABELS.get(column, label)
    one_loss = len(set(losses)) == 1
    if column in ("train_loss", "test_loss") and one_loss:
        label += " (nats)" if "ce" in losses else " (mean squared error)"
    if column == "gm":  # a gradient's norm: the loss's unit per unit length of the weights theta
        loss_unit = ("nats" if "ce" in losses else "MSE") if one_loss else "loss"
        label += rf" ({loss_unit} per unit $\theta$)"
    return label


def shown(column, values):
    """Values as drawn: fractions as percentages."""
    values = np.asarray(values, dtype=float)
    return values * 100 if column in PERCENT_COLUMNS else values


def set_scale(ax, axis, values, log=True, powers=False):
    """Log scale where asked and every value is positive; symlog when some are 0; linear otherwise.
    `powers`: log ticks always as powers of ten (ELRs, so that every figure writes them alike)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    setter = ax.set_xscale if axis == "x" else ax.set_yscale
    if not log or len(values) == 0 or values.min() < 0:
        setter("linear")
    elif values.min() > 0:
        setter("log")
        readable_log_ticks(ax.xaxis if axis == "x" else ax.yaxis, powers)
    else:
        positive = values[values > 0]
        setter("symlog", linthresh=positive.min() if len(positive) else 1.0)


# Nice numbers to label, times powers of ten, densest first: about evenly spaced on a log axis, so that
# a value has a label within about a third of it wherever it lies.
NICE_MANTISSAS = ((1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8), (1, 1.5, 2, 3, 4, 5, 7), (1, 1.5, 2, 3, 5, 7),
                  (1, 2, 3, 5, 7), (1, 2, 5))
LABEL_ROOM = 0.1  # of a log axis' length between neighbouring labels: a 6 pt label on a 1 in panel


class ReadableLogLocator(Locator):
    """Ticks of a log axis chosen from its final limits so that several always get a label: powers of
    ten over two decades or more; under two, the densest set of nice numbers (NICE_MANTISSAS) with at
    least 3 in view and LABEL_ROOM between them, so that a value reads off a label near it (2.8 off 3 on
    an axis from 2.7 to 7); within a narrow range, evenly spaced plain numbers. `wide`: labels as wide
    as $2\\times10^{-3}$ side by side, so fewer: powers of ten where two are in view, else 1 and 3 times
    them, or three evenly spaced numbers."""

    def __init__(self, wide=False):
        self.wide = wide

    def __call__(self):
        return self.tick_values(*self.axis.get_view_interval())

    def tick_values(self, vmin, vmax):
        low, high = sorted((vmin, vmax))
        if not low > 0:
            return LogLocator().tick_values(low, high)
        powers = LogLocator(numticks=8).tick_values(low, high)
        if high / low >= 100 or (self.wide and len(in_view(powers, low, high)) >= 2):
            return powers
        room = 3 * LABEL_ROOM if self.wide else LABEL_ROOM
        for subs in ((1, 3),) if self.wide else NICE_MANTISSAS:
            ticks = LogLocator(subs=subs, numticks=30).tick_values(low, high)
            shown = np.log10(in_view(ticks, low, high))
            if len(shown) >= 3 and np.diff(shown).min() >= room * math.log10(high / low):
                return ticks
        ticks = MaxNLocator(nbins=3 if self.wide else 6, steps=[1, 2, 2.5, 5, 10]).tick_values(low, high)
        return ticks[ticks > 0]


def in_view(ticks, low, high):
    return np.array([t for t in ticks if low <= t <= high])


def readable_log_ticks(axis, powers=False):
    """Labelled ticks on a log axis over any range (see ReadableLogLocator); unlabelled minor ticks."""
    axis.set_major_locator(ReadableLogLocator(wide=powers and axis.axis_name == "x"))
    axis.set_major_formatter(ReadableLogFormatter(powers))
    axis.set_minor_locator(LogLocator(subs="auto"))
    axis.set_minor_formatter(NullFormatter())


class ReadableLogFormatter(Formatter):
    """Plain numbers (0.05, 20, 3000) when every tick of the axis reads well so; else, or always with
    `powers`, powers of ten ($10^{-5}$, $2\\times10^{-5}$) for all of them, so that one axis never mixes
    the two."""

    ticks = ()

    def __init__(self, powers=False):
        self.powers = powers

    def set_locs(self, locs):
        self.ticks = list(locs)  # every tick about to be labelled

    def __call__(self, value, pos=None):
        low, high = sorted(self.axis.get_view_interval()) if self.axis else (0, math.inf)
        if not self.powers and all(1e-3 <= v < 1e4 for v in self.ticks if low <= v <= high):
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


def phase_patches(phases, outlined=False, undecided=()):
    """Legend entries of the phases present; `outlined` as boxes are drawn, in the dark hue too; then one
    of the undecided shading for each of the `undecided` labels."""
    return ([Patch(facecolor=PHASE_COLORS[p], edgecolor=PHASE_EDGES[p] if outlined else "none", label=f"phase {p}")
             for p in sorted(set(phases) & set(PHASE_COLORS))]
            + [Patch(**UNDECIDED_SHADE, linewidth=0, label=label) for label in dict.fromkeys(undecided)])


def figure_legend(figure, handles, labels=None):
    """A legend below the panels, where it hides no point, kept inside the figure's width: long labels
    (a fine-tune's parent) are wrapped and then take a row each."""
    labels = [h.get_label() for h in handles] if labels is None else labels
    labels = [textwrap.fill(str(label), LEGEND_WRAP) for label in labels]
    longest = max(len(line) for label in labels for line in label.splitlines())
    columns = 1 if longest > LEGEND_WRAP // 2 else 2 if longest > LEGEND_WRAP // 3 else 3
    return figure.legend(handles, labels, frameon=False, loc="outside lower center",
                         ncols=min(columns, len(handles)))

