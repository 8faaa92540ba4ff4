"""`sphrun plot`: what each figure draws, checked against hand-written metrics.csv files whose values
and phases are known here; every kind drawn from tiny real runs; default names; the refusals."""

import csv
import json
import math
import os
import shutil
import sys

import matplotlib
import matplotlib.image
import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex

from sphrun import SphrunError
from sphrun.config import TrainConfig
from sphrun.phase_table import group_table
from sphrun.plot import (KINDS, cosine_figure, draw_connect, draw_plane, metrics_figure, phase_figure, plot,
                         projection_figure, spectrum_figure, with_curvature)
from sphrun.runs import find_dirs, group_series, load_run, load_runs, parent_rows
from sphrun.style import (PHASE_COLORS, PHASE_EDGES, STYLE, UNDECIDED_SHADE, axis_label, figure_legend,
                          new_figure, set_scale)
from sphrun.rundir import RunDir
from sphrun.train import train

# --- hand-written runs --------------------------------------------------------------------------------
# A sweep of five ELRs whose phases are plain by construction: phase 1 reaches zero train error with
# nearly parallel checkpoints, phase 2 sits at a level well below chance, phase 3 sits at chance (90 %)
# with uncorrelated checkpoints. Each run's values differ, so a figure that draws the wrong run, column or
# row shows other numbers. Steps 0, 100, ..., 1100 at 25 steps per epoch (44 epochs, the fine-tune 24:
# long enough for the rules).
STEPS = list(range(0, 1200, 100))
STEPS_PER_EPOCH = 25
SWEEP = {1e-4: "1", 3e-4: "1", 3e-3: "2", 1e-2: "2", 1e-1: "3"}
FT_ELR, FT_FROM, FT_PARENT = 3e-3, 500, 3e-4


def run_name(elr):
    return f"cifar10-convnet32-ce-elr{elr:g}-s0-bdd2eb58"


def wiggle(k, size):
    """An equilibrium's fluctuation: +-size, alternating, so the level shows no trend."""
    return size * (-1) ** k


def handmade_row(phase, elr, k):
    """Metrics at the k-th evaluation point of a run in `phase` at `elr` (c tells the runs apart)."""
    c = 1 + math.log10(elr) / 10  # 0.5 to 0.9
    if phase == "1":
        loss, err, gm, cos = c * 2 / (1 + k), max(0.0, 0.5 - 0.1 * k), c * 10 / math.sqrt(1 + k), 0.9999
    elif phase == "2":
        loss, err, gm = c * (1 + wiggle(k, 0.02)), c * 0.5 + wiggle(k, 0.01), c * 3 * (1 + wiggle(k, 0.02))
        cos = 0.6 * c + wiggle(k, 0.02)
    else:
        loss, err, gm, cos = c * 8 * (1 + wiggle(k, 0.03)), 0.9 + wiggle(k, 0.003), c * 2000, wiggle(k, 0.01)
    return {"iter": STEPS[k], "epoch": STEPS[k] / STEPS_PER_EPOCH, "elr": elr, "train_loss": loss, "train_err": err,
            "test_loss": loss + 0.5, "test_err": min(1.0, err + 0.1), "gm": gm, "si_norm": 40.0,
            "cos_prev": 1.0 if k == 0 else cos, "cos_init": 1 - 0.01 * k, "proj_err": c * 1e-3 * (k % 3),
            "wall_s": 10.0 * k}


def handmade_rows(phase, elr, first=0):
    return [handmade_row(phase, elr, k) for k in range(first, len(STEPS))]


def write_run(folder, elr, rows, parent=None, eval_every=100):
    os.makedirs(folder, exist_ok=True)
    settings = {"elr": elr, "loss": "ce", "dataset": "cifar10", "model": "convnet", "width": 32,
                "eval_every": eval_every}
    config = {"command": "train", "settings": settings, "num_classes": 10, "train_size": 50000,
              "parent": parent, "status": "done"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    write_csv(os.path.join(folder, "metrics.csv"), rows)


@pytest.fixture
def handmade(tmp_path):
    """The sweep of SWEEP and a fine-tune of its 3e-4 run at 3e-3 from step 500 (phase 2); returns the
    folder and {run path: its rows in step order}."""
    root = tmp_path / "sweep"
    written = {}
    for elr, phase in SWEEP.items():
        written[str(root / run_name(elr))] = handmade_rows(phase, elr)
    parent = str(root / run_name(FT_PARENT))
    child = f"{parent}-ft-elr{FT_ELR:g}-from{FT_FROM}"
    written[child] = handmade_rows("2", FT_ELR, first=STEPS.index(FT_FROM))
    for path, rows in written.items():
        is_child = path == child
        write_run(path, rows[0]["elr"], rows, {"run": parent, "iter": FT_FROM} if is_child else None)
    return root, written


def sweep_runs(root):
    return load_runs(find_dirs([str(root)], "config.json"))


def final(rows, column):
    """The value at the last step, found here by step, not by file order."""
    return max(rows, key=lambda r: r["iter"])[column]


# --- what is drawn --------------------------------------------------------------------------------------
def render(figure):
    """Draw the figure as saving would (under the module's style), so ticks and legends are laid out."""
    with matplotlib.rc_context(STYLE):
        figure.canvas.draw()
    return figure


def labelled_ticks(axis):
    """The tick labels an axis shows: non-empty, at ticks within its limits."""
    low, high = sorted(axis.get_view_interval())
    ticks = zip(list(axis.get_majorticklocs()) + list(axis.get_minorticklocs()),
                axis.get_majorticklabels() + axis.get_minorticklabels())
    return [label.get_text() for loc, label in ticks
            if low <= loc <= high and label.get_text() and label.get_visible()]


def inside(inner, outer, slack=0.5):
    return (inner.x0 >= outer.x0 - slack and inner.y0 >= outer.y0 - slack
            and inner.x1 <= outer.x1 + slack and inner.y1 <= outer.y1 + slack)


def line_labelled(ax, label):
    found = [line for line in ax.get_lines() if line.get_label() == label]
    assert len(found) == 1, [line.get_label() for line in ax.get_lines()]
    return found[0]


def box_x(box):
    x = box.get_path().vertices[:, 0]
    return [x.min(), x.max()]


def box_y(box):
    y = box.get_path().vertices[:, 1]
    return y.min(), y.max()


def shading_span(ax, patch):
    """(left, right) in data x of a phase band: a Rectangle, or before Matplotlib 3.9 a Polygon."""
    shown = patch.get_transform().transform(patch.get_path().vertices)  # in display units
    x = ax.transData.inverted().transform(shown)[:, 0]
    return x.min(), x.max()


def band_colour(ax, x):
    """The colour of the phase band behind x (None where there is none)."""
    for patch in ax.patches:
        left, right = shading_span(ax, patch)
        if left * (1 - 1e-9) <= x <= right * (1 + 1e-9):
            return to_hex(patch.get_facecolor())
    return None


def test_metrics_figure_draws_each_runs_final_values_and_phase(handmade):
    root, written = handmade
    runs = sweep_runs(root)
    figure = render(metrics_figure(runs, group_table(runs)))
    elrs = sorted(SWEEP)
    sweep_rows = [written[str(root / run_name(e))] for e in elrs]
    for ax, column, unit in zip(figure.axes, ("train_loss", "train_err", "test_err", "gm"), (1, 100, 100, 1)):
        line = line_labelled(ax, "from init")
        assert list(line.get_xdata()) == pytest.approx(elrs)
        assert list(line.get_ydata()) == pytest.approx([unit * final(rows, column) for rows in sweep_rows])
        for elr, phase in SWEEP.items():
            assert band_colour(ax, elr) == PHASE_COLORS[phase], (column, elr)
        for low, high in zip(elrs, elrs[1:]):  # bands meet halfway between ELRs on the log axis
            border = math.sqrt(low * high)
            assert band_colour(ax, border * 0.99) == PHASE_COLORS[SWEEP[low]]
            assert band_colour(ax, border * 1.01) == PHASE_COLORS[SWEEP[high]]
    child = [rows for path, rows in written.items() if "-ft-" in path][0]
    fine_tune = line_labelled(figure.axes[0], f"fine-tuned from {run_name(FT_PARENT)} at step {FT_FROM}")
    assert list(fine_tune.get_ydata()) == pytest.approx([final(child, "train_loss")])


def test_metrics_shading_claims_no_phase_past_the_outermost_elrs(handmade):
    root, _ = handmade
    runs = sweep_runs(root)
    figure = render(metrics_figure(runs, group_table(runs)))
    for ax in figure.axes:
        spans = [shading_span(ax, patch) for patch in ax.patches]
        assert len(spans) == len(SWEEP)
        assert min(s[0] for s in spans) == pytest.approx(min(SWEEP)), ax.get_ylabel()
        assert max(s[1] for s in spans) == pytest.approx(max(SWEEP)), ax.get_ylabel()
        low, high = ax.get_xlim()
        assert low < min(SWEEP) and high > max(SWEEP)  # the axis goes on, unshaded, where nothing was run


def test_a_sweep_too_short_for_the_rules_is_undecided_in_the_table_and_on_the_figure(tmp_path):
    """The hand-made sweep, its phases plain, evaluated over 10 epochs instead of 44: phase 2 may still be
    settling in its later half (the paper: within 5-10 epochs), so no group gets a phase, and the
    figure shades none, but says why."""
    for elr, phase in SWEEP.items():
        rows = [dict(row, epoch=row["iter"] / 110) for row in handmade_rows(phase, elr)]  # 0 to 10 epochs
        write_run(tmp_path / run_name(elr), elr, rows)
    runs = sweep_runs(tmp_path)
    table = group_table(runs)
    why = "undecided (too short: 10 epochs, needs 20)"
    assert [(row["phase"], row["agreement"]) for row in table] == [("undecided", why)] * len(SWEEP)
    assert all(row["evidence"] == "too short: 10 epochs, needs 20" for row in table)
    figure = render(metrics_figure(runs, table))
    for ax in figure.axes:
        assert {band_colour(ax, elr) for elr in SWEEP} == {UNDECIDED_SHADE["facecolor"]}, ax.get_ylabel()
    assert [t.get_text() for t in figure.legends[0].get_texts()] == [why]


def test_metrics_writes_and_prints_the_phase_table(handmade, tmp_path, monkeypatch, capsys):
    root, written = handmade
    figure = tmp_path / "final.png"
    code, out, err = run_cli(monkeypatch, capsys, root, "--kind", "metrics", "--out", figure)
    assert code == 0 and drawn(figure), err
    with open(tmp_path / "final-phases.csv") as f:
        table = {row["runs"]: row for row in csv.DictReader(f)}  # one seed each: a group per run
    assert set(table) == set(written)
    for path, rows in written.items():
        expected = "2" if "-ft-" in path else SWEEP[rows[0]["elr"]]
        assert table[path]["phase"] == expected, table[path]["evidence"]
        assert table[path]["evidence"]
        for column in ("train_loss", "train_err", "test_err", "gm"):
            assert float(table[path][column]) == pytest.approx(final(rows, column), rel=1e-5)
        assert int(table[path]["steps"]) == STEPS[-1]
    assert "1|2 between ELR 0.0003 and 0.003" in out and "2|3 between ELR 0.01 and 0.1" in out
    assert "fine-tuned from" in out  # the fine-tune is its own line, with its own table
    assert f"wrote {tmp_path / 'final-phases.csv'}" in err


@pytest.fixture
def drawn_figures(monkeypatch):
    """The figures `plot` saves, kept for a look at what they hold."""
    import sphrun.plot

    figures = []
    save = sphrun.plot.save
    monkeypatch.setattr(sphrun.plot, "save",
                        lambda figure, path: figures.append(figure) or save(figure, path))
    return figures


def test_phase_diagram_draws_each_trajectory_by_step(handmade, drawn_figures, tmp_path):
    root, written = handmade
    plot([str(root)], "phase", out=str(tmp_path / "phase.png"))
    ax = render(drawn_figures[0]).axes[0]
    lines = [(list(l.get_xdata()), list(l.get_ydata())) for l in ax.get_lines() if len(l.get_xdata()) > 1]
    parent = written[str(root / run_name(FT_PARENT))]
    for path, rows in written.items():
        expected = ([r["train_loss"] for r in rows], [r["gm"] for r in rows])
        if "-ft-" in path:  # a fine-tune's line starts at its parent's point at the fork
            fork = [r for r in parent if r["iter"] == FT_FROM][0]
            expected = ([fork["train_loss"]] + expected[0], [fork["gm"]] + expected[1])
        assert any(x == pytest.approx(expected[0]) and y == pytest.approx(expected[1])
                   for x, y in lines), path
    assert ax.get_xscale() == ax.get_yscale() == "log"
    colour_bar = drawn_figures[0].axes[1]
    for axis in (ax.xaxis, ax.yaxis, colour_bar.yaxis):
        assert len(labelled_ticks(axis)) >= 2


def test_phase_diagram_of_one_elr_names_it_in_the_legend_without_a_colour_bar(handmade):
    """A colour bar of one value (a single run, a schedule's fine-tunes) spans a made-up range: the legend
    names the ELR instead, in the lines' colour; two ELRs keep their colour bar."""
    root, _ = handmade
    runs = [r for r in sweep_runs(root) if "-ft-" not in r.path]
    one = render(phase_figure([runs[1]]))
    assert len(one.axes) == 1
    (trajectory,) = [l for l in one.axes[0].get_lines() if len(l.get_xdata()) > 1]
    legend = one.legends[0]
    assert legend.get_texts()[0].get_text() == "ELR 0.0003"
    assert to_hex(legend.legend_handles[0].get_color()) == to_hex(trajectory.get_color())
    two = render(phase_figure(runs[:2]))
    assert len(two.axes) == 2 and two.axes[1].get_ylabel() == "ELR"
    assert not any(t.get_text().startswith("ELR") for t in two.legends[0].get_texts())


def test_cosine_figure_draws_the_later_half_of_each_run(handmade):
    root, written = handmade
    runs = [r for r in sweep_runs(root) if "-ft-" not in r.path]
    figure = render(cosine_figure(runs))
    ax = figure.axes[0]
    middle = STEPS[-1] / 2
    for slot, elr in enumerate(sorted(SWEEP)):
        rows = written[str(root / run_name(elr))]
        later = [r["cos_prev"] for r in rows if r["iter"] >= middle and r["iter"] > 0]
        box = [b for b in ax.patches if min(box_x(b)) <= slot <= max(box_x(b))]
        assert len(box) == 1, elr
        low, high = box_y(box[0])  # the quartiles, and the median across the box
        assert (low, high) == pytest.approx(tuple(np.percentile(later, [25, 75]))), elr
        median = [l for l in ax.get_lines() if list(l.get_xdata()) == pytest.approx(box_x(box[0]))]
        assert len(median) == 1 and median[0].get_ydata()[0] == pytest.approx(np.median(later)), elr
    assert labelled_ticks(ax.xaxis) == [f"{e:.3g}" for e in sorted(SWEEP)]
    assert len(labelled_ticks(ax.yaxis)) >= 3
    axes_width = ax.get_window_extent().width
    for box in ax.patches:  # boxes a readable width, not lines
        assert box.get_window_extent().width > 0.05 * axes_width


def box_lines(ax, box):
    """The whiskers, caps and median drawn over a box's width (not fliers, nor the line marking 0)."""
    left, right = box_x(box)
    return [line for line in ax.get_lines() if line.get_transform() is ax.transData
            and line.get_linestyle() != "None" and left - 1e-9 <= np.mean(line.get_xdata()) <= right + 1e-9]


def test_cosine_boxes_are_drawn_in_their_phases_colours(handmade):
    root, _ = handmade
    runs = [r for r in sweep_runs(root) if "-ft-" not in r.path]
    ax = render(cosine_figure(runs)).axes[0]
    for slot, elr in enumerate(sorted(SWEEP)):
        box = [b for b in ax.patches if min(box_x(b)) <= slot <= max(box_x(b))][0]
        phase = SWEEP[elr]
        assert to_hex(box.get_facecolor()) == PHASE_COLORS[phase], elr
        # phase 1's cosines are all 0.9999: a flat box, which shows its phase in its lines alone
        lines = box_lines(ax, box)
        assert len(lines) == 5 and {to_hex(line.get_color()) for line in lines} == {PHASE_EDGES[phase]}, elr
        assert to_hex(box.get_edgecolor()) == PHASE_EDGES[phase], elr
    # phase 3's cosines lie about 0: it stays in view, marked
    low, high = ax.get_ylim()
    assert low < 0 < high and any(list(line.get_ydata()) == [0, 0] for line in ax.get_lines())


def test_cosine_axis_fits_cosines_far_from_0(tmp_path):
    """Cosines within 0.94-1: on an axis from 0 to 1 every box would be a flat bar."""
    for elr, phase, lowest in ((1e-4, "1", 0.99), (1e-2, "2", 0.94)):
        rows = [dict(handmade_row(phase, elr, k), cos_prev=lowest + 0.002 * (k % 5)) for k in range(len(STEPS))]
        write_run(tmp_path / f"elr{elr:g}", elr, rows)
    runs = sweep_runs(tmp_path)
    ax = render(cosine_figure(runs)).axes[0]
    later = [r["cos_prev"] for run in runs for r in run.rows if r["iter"] >= STEPS[-1] / 2]
    low, high = ax.get_ylim()
    spread = max(later) - min(later)
    assert min(later) - 0.2 * spread < low < min(later)  # fitted below, 0 far out of view
    assert 1 <= high < 1 + 0.2 * spread  # 1 (parallel) is near: kept in view
    assert all(box.get_window_extent().height > 5 for box in ax.patches)  # boxes, not bars
    assert not [line for line in ax.get_lines() if list(line.get_ydata()) == [0, 0]]


def test_cosine_figure_keeps_its_legend_off_the_plot(handmade):
    root, _ = handmade
    figure = render(cosine_figure(sweep_runs(root)))
    legend = figure.legends[0].get_window_extent()
    assert inside(legend, figure.bbox)
    assert not legend.overlaps(figure.axes[0].get_window_extent())


def test_cosine_figure_wants_equally_spaced_points(tmp_path, capsys):
    # the default schedule: one point per epoch up to epoch 10, then log-spaced (13, 16, 20, ...)
    epochs = list(range(11)) + [13, 16, 20]
    rows = [dict(handmade_row("2", 1e-2, k % 12), iter=39 * e) for k, e in enumerate(epochs)]
    write_run(tmp_path / "log", 1e-2, rows, eval_every=None)
    with pytest.raises(SphrunError, match="not equally spaced.*--eval-every"):
        cosine_figure([load_run(str(tmp_path / "log"))])
    write_run(tmp_path / "short", 1e-2, rows[:11], eval_every=None)  # 10 epochs: one epoch apart
    render(cosine_figure([load_run(str(tmp_path / "short"))]))
    assert "log-spaced schedule" in capsys.readouterr().err


def test_connect_figure_draws_the_csv_columns(tmp_path):
    folder = tmp_path / "a@100--b@100"
    folder.mkdir()
    alphas = [k / 10 for k in range(11)]
    rows = [{"alpha": a, "train_loss": 0.5 + a * (1 - a), "train_err": 0.1 + a * (1 - a) / 4,
             "test_loss": 1.1 + a, "test_err": 0.3 + a / 20, "gm": 1.2 + 0.1 * a} for a in alphas]
    write_csv(folder / "connect.csv", rows)
    figure = render(draw_connect([str(folder)]))
    for ax, column, unit in zip(figure.axes, ("train_loss", "train_err", "test_err", "gm"), (1, 100, 100, 1)):
        line = ax.get_lines()[0]
        assert list(line.get_xdata()) == pytest.approx(alphas)
        assert list(line.get_ydata()) == pytest.approx([unit * r[column] for r in rows])
        if ax.get_yscale() == "log":  # train loss and GM span less than a decade here
            assert len(labelled_ticks(ax.yaxis)) >= 2, column


def connect_output(folder, config):
    """A connect output of 11 points whose config.json is `config`."""
    folder.mkdir(parents=True)
    write_csv(folder / "connect.csv", [{"alpha": a / 10, "train_loss": 1 + a * (10 - a) / 25,
                                        "train_err": 0.2 + a * (10 - a) / 100, "test_loss": 1.5,
                                        "test_err": 0.4, "gm": 2.0 + a / 10} for a in range(11)])
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def suptitle(figure):
    return " ".join(text.get_text() for text in figure.texts)  # Figure.get_suptitle: Matplotlib 3.8 on


def end(run, seed, elr=3e-4, step=900):
    settings = {"elr": elr, "loss": "ce", "dataset": "synthetic", "subset": 500.0, "model": "convnet",
                "width": 4, "seed": seed}
    return {"run": run, "iter": step, "elr": elr, "settings": settings}


def test_connect_figure_names_both_ends_and_the_train_set(tmp_path):
    ends = {"command": "connect", "a": end("runs/x-s0", 0), "b": end("runs/x-s1", 1)}
    folder = connect_output(tmp_path / "x-s0@900--x-s1@900", {**ends, "train_size": 500})
    figure = render(draw_connect([folder]))
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend == ["ELR 0.0003 s0 @900 to ELR 0.0003 s1 @900"]  # one output: named all the same
    heading = suptitle(figure)
    assert "synthetic data (500 train images)" in heading and "subset" not in heading  # as the runs' titles
    # an output of an older sphrun, without train_size: read from end A's run, where it is
    write_run(tmp_path / "runs" / "x-s0", 3e-4, handmade_rows("1", 3e-4))
    older = connect_output(tmp_path / "older", {**ends, "a": end(str(tmp_path / "runs" / "x-s0"), 0)})
    assert "(50,000 train images)" in suptitle(draw_connect([older]))


def test_connect_figure_shows_the_ends_whole(tmp_path):
    folder = connect_output(tmp_path / "ab", {"a": end("a", 0), "b": end("b", 1), "train_size": 500})
    figure = render(draw_connect([folder]))
    for ax in figure.axes:
        inside_axes = ax.get_window_extent()
        for line in ax.get_lines():
            radius = line.get_markersize() / 2 * figure.dpi / 72  # in pixels
            for point in ax.transData.transform(line.get_xydata()[[0, -1]]):
                assert inside_axes.x0 + radius <= point[0] <= inside_axes.x1 - radius, ax.get_ylabel()
                assert inside_axes.y0 + radius <= point[1] <= inside_axes.y1 - radius, ax.get_ylabel()


# A plane output whose surface is known: train loss lowest at (2, 1.5), an inner grid point, and rising
# steeply (4 decades) away from it; test error a tilted plane. 5 u by 4 v values, so a grid read with u
# and v swapped cannot be drawn; B at (4, 0), C at (1, 3).
PLANE_US, PLANE_VS = [-1.0, 0.5, 2.0, 3.5, 5.0], [-0.5, 0.5, 1.5, 2.5]


def plane_loss(u, v):
    return 0.01 * math.exp((u - 2) ** 2 + (v - 1.5) ** 2)


def plane_output(folder):
    folder.mkdir(parents=True)
    write_csv(folder / "plane.csv", [{"u": u, "v": v, "train_loss": plane_loss(u, v), "train_err": 0.5,
                                      "test_loss": 2.0, "test_err": 0.2 + 0.05 * u + 0.02 * v, "gm": 1.0 + u * u}
                                     for v in PLANE_VS for u in PLANE_US])
    config = {"command": "connect", "kind": "plane", "a": end("runs/x-s0", 0), "b": end("runs/x-s1", 1),
              "c": end("runs/x-s2", 2), "basis": {"b": [4.0, 0.0], "c": [1.0, 3.0], "cos_a": 1 / math.sqrt(10)},
              "train_size": 500}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def contour_sets(figure):
    """The filled contours of each panel, read off the panels' colour bars, in the panels' order."""
    return [ax._colorbar.mappable for ax in figure.axes if hasattr(ax, "_colorbar")]


def band_holding(contours, point):
    """The index of the band of filled contours whose region holds `point`."""
    from matplotlib.path import Path

    for band, polygons in enumerate(contours.allsegs):
        if any(Path(polygon).contains_point(point) for polygon in polygons):
            return band
    return None


def bar_label(contours):
    """The label of the colour bar of a panel's contours (above the panel or beside it)."""
    bar = contours.colorbar.ax
    return bar.get_xlabel() or bar.get_ylabel()


def bar_ticks(contours):
    """The tick values a colour bar shows, along its long side."""
    bar = contours.colorbar
    axis = bar.ax.xaxis if bar.orientation == "horizontal" else bar.ax.yaxis
    low, high = sorted(axis.get_view_interval())
    return [t for t in axis.get_majorticklocs() if low <= t <= high]


def test_plane_figure_draws_the_surface_the_solutions_and_the_angle(tmp_path):
    figure = render(draw_plane(plane_output(tmp_path / "abc")))
    panels = [ax for ax in figure.axes if ax.get_xlabel().startswith("u")]
    loss, error = contour_sets(figure)
    assert len(panels) == 2 and [bar_label(c) for c in (loss, error)] == ["train loss (nats)", "test error (%)"]
    losses = [plane_loss(u, v) for v in PLANE_VS for u in PLANE_US]
    assert loss.levels[0] == pytest.approx(min(losses)) and loss.levels[-1] == pytest.approx(max(losses))
    ratios = np.diff(np.log(loss.levels))
    assert np.allclose(ratios, ratios[0])  # log levels: each band the same factor
    assert band_holding(loss, (2.0, 1.5)) == 0  # the lowest loss in the lowest band, where it is
    assert band_holding(loss, (-1.0 + 1e-3, -0.5 + 1e-3)) == len(loss.levels) - 2  # the highest, in a corner
    for u in PLANE_US[1:-1]:  # every inner grid point drawn in the band of its measured value
        for v in PLANE_VS[1:-1]:
            value = plane_loss(u, v)
            if not np.isclose(loss.levels, value).any():  # on a level, either band is right
                assert band_holding(loss, (u, v)) == np.searchsorted(loss.levels, value) - 1, (u, v)
    errors = [100 * (0.2 + 0.05 * u + 0.02 * v) for v in PLANE_VS for u in PLANE_US]  # percent
    assert error.levels[0] <= min(errors) < error.levels[1] and error.levels[-2] < max(errors) <= error.levels[-1]
    assert np.allclose(np.diff(error.levels), np.diff(error.levels)[0])
    for ax in panels:
        assert ax.get_xlim() == pytest.approx((-1, 5)) and ax.get_ylim() == pytest.approx((-0.5, 2.5))
        dots = [l for l in ax.get_lines() if l.get_marker() == "o"][0]
        assert dots.get_xydata().tolist() == [[0, 0], [4, 0], [1, 3]]
        edges = [l for l in ax.get_lines() if l.get_linestyle() == "--"][0]
        assert edges.get_xydata().tolist() == [[0, 0], [4, 0], [1, 3], [0, 0]]
        assert [t.get_text() for t in ax.texts] == ["A", "B", "C"]
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend[:3] == ["A: ELR 0.0003 s0 @900", "B: ELR 0.0003 s1 @900", "C: ELR 0.0003 s2 @900"]
    assert "cos(angle at A) = 0.316" in legend[3]
    assert "synthetic data (500 train images)" in suptitle(figure)


@pytest.fixture(scope="module")
def plane_drawn(tmp_path_factory):
    """The plane figure of plane_output, drawn once for the tests that only read it."""
    return render(draw_plane(plane_output(tmp_path_factory.mktemp("plane") / "abc")))


def test_plane_legend_marks_the_solutions_as_drawn_not_with_letter_glyphs(plane_drawn):
    handles = plane_drawn.legends[0].legend_handles
    assert not [h.get_marker() for h in handles if str(h.get_marker()).startswith("$")]  # mathtext: bold italics
    for handle in handles[:3]:  # A, B, C: the white dots with black rims of the panels
        assert handle.get_marker() == "o" and to_hex(handle.get_markerfacecolor()) == "#ffffff"


def test_plane_panels_sit_side_by_side_in_one_column(plane_drawn):
    figure = plane_drawn
    width, height = figure.get_size_inches()
    assert width == pytest.approx(3.4) and height < width  # stacked, this plane's two panels took 4.3 in
    left, right = (ax.get_window_extent() for ax in figure.axes if ax.get_xlabel().startswith("u"))
    assert left.x1 < right.x0 and left.y0 < right.y1 and right.y0 < left.y1  # side by side, level
    assert suptitle(figure).count("\n") <= 1  # the data, the loss and the model: two lines at most


def round_step(values):
    """The common step of evenly spaced values when it is 1, 2, 2.5 or 5 times a power of ten and every value
    a multiple of it (10, 20, 30, not 18, 30, 42); None otherwise."""
    steps = np.diff(values)
    if not np.allclose(steps, steps[0]):
        return None
    power = 10 ** math.floor(math.log10(steps[0]))
    multiples = np.array(values) / steps[0]
    return steps[0] if round(steps[0] / power, 6) in (1, 2, 2.5, 5) and np.allclose(multiples, np.round(multiples)) \
        else None


def test_plane_colour_bars_tick_at_round_values(tmp_path):
    folder = plane_output(tmp_path / "abc")  # test error 14 % to 50 %: 12 levels of 3 where any step goes
    for columns in (("test_err",), ("train_loss", "test_err")):  # even levels: a bar beside, a bar above
        contours = contour_sets(render(draw_plane(folder, columns)))[-1]
        assert round_step(contours.levels), contours.levels
        ticks = bar_ticks(contours)
        assert len(ticks) >= 3 and round_step(ticks), ticks
        axis = contours.colorbar.ax.xaxis if len(columns) > 1 else contours.colorbar.ax.yaxis
        labels = [label.get_window_extent() for label in axis.get_majorticklabels() if label.get_text()]
        assert not any(a.overlaps(b) for a, b in zip(labels, labels[1:])), ticks  # readable side by side


def test_a_coarse_planes_contours_are_not_its_grids_facets(plane_drawn):
    """Contours interpolated linearly between grid points have every vertex on a grid line (each cell's
    edges): straight facets. Drawn from a finer interpolated surface, few lie there."""
    loss, _ = contour_sets(plane_drawn)
    inner = np.array([vertex for band in loss.allsegs for polygon in band for vertex in polygon
                      if PLANE_US[0] < vertex[0] < PLANE_US[-1] and PLANE_VS[0] < vertex[1] < PLANE_VS[-1]])
    on_grid = np.isclose(inner[:, :1], PLANE_US).any(axis=1) | np.isclose(inner[:, 1:], PLANE_VS).any(axis=1)
    assert len(inner) > 100 and on_grid.mean() < 0.2, (len(inner), on_grid.mean())
    legend = [t.get_text() for t in plane_drawn.legends[0].get_texts()]
    assert any("5 x 4 grid, interpolated" in text for text in legend)  # the grid measured, said


def test_plane_kind_draws_the_column_asked(tmp_path):
    folder = plane_output(tmp_path / "abc")
    out = plot([folder], "plane", out=str(tmp_path / "gm.png"), y="gm")
    assert drawn(out)
    figure = render(draw_plane(folder, ("gm",)))
    (gm,) = contour_sets(figure)
    assert gm.levels[0] == pytest.approx(1.25) and gm.levels[-1] == pytest.approx(26.0)  # 1 + u^2
    with pytest.raises(SphrunError, match="has no column nosuch"):
        plot([folder], "plane", out=str(tmp_path / "x.png"), y="nosuch")
    with pytest.raises(SphrunError, match="--x applies to the phase and curvature kinds, not to plane"):
        plot([folder], "plane", out=str(tmp_path / "x.png"), x="u")
    assert sorted(os.listdir(tmp_path)) == ["abc", "gm.png"]


def write_density(run, curves):
    """RUN/hessian-density.csv of {step: (eigenvalues, densities)}."""
    write_csv(os.path.join(run, "hessian-density.csv"),
              [{"iter": step, "eigenvalue": e, "density": d} for step, curve in sorted(curves.items())
               for e, d in zip(*curve)])


def bump(centre, height, count=51):
    """A curve peaking at `centre`, its values spanning 10 decades below `height`."""
    eigenvalues = np.linspace(centre - 5, centre + 5, count)
    return list(eigenvalues), list(height * np.exp(-(eigenvalues - centre) ** 2 / 1.1))


def drawn_curve(ax, line):
    """(x, y) of a density's line within the axis, and its two ends (x, y) as drawn."""
    floor = ax.get_ylim()[0]
    x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
    return x[y >= floor], y[y >= floor], (x[0], y[0]), (x[-1], y[-1])


def test_spectrum_of_several_runs_draws_each_at_its_last_step_in_its_elrs_colour(handmade, capsys):
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    root, _ = handmade
    runs = [r for r in sweep_runs(root) if "-ft-" not in r.path]
    measured = {runs[0].path: {100: bump(0, 1.0), 1100: bump(1, 2.0)}, runs[-1].path: {500: bump(3, 0.5)}}
    for path, curves in measured.items():
        write_density(path, curves)
    figure = render(spectrum_figure(runs))
    ax = figure.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 2
    norm, colours = LogNorm(min(SWEEP), max(SWEEP)), colormaps["viridis"]
    for line, run, step in zip(lines, (runs[0], runs[-1]), (1100, 500)):
        eigenvalues, density = np.array(measured[run.path][step])
        x, y, _, _ = drawn_curve(ax, line)
        above = density >= 2e-6
        assert list(x) == pytest.approx(eigenvalues[above]) and list(y) == pytest.approx(density[above])
        assert to_hex(line.get_color()) == to_hex(colours(norm(run.elr)))
    assert ax.get_yscale() == "log" and ax.get_ylim() == pytest.approx((2e-6, 4.0))  # 1e-6 of the peak
    assert ax.get_xlabel() == r"Hessian eigenvalue $\lambda$" and "density" in ax.get_ylabel()
    legend = [" ".join(t.get_text().split()) for t in figure.legends[0].get_texts()]
    assert legend == ["each run at its last step: 500 to 1100 (epochs 20 to 44)"]
    assert len(figure.axes) == 2 and figure.axes[1].get_ylabel() == "ELR"  # a colour bar of the ELRs
    assert "has no hessian-density.csv and is left out" in capsys.readouterr().err


def test_spectrum_of_one_run_at_one_step_names_it_without_a_colour_bar(handmade):
    root, _ = handmade
    run = [r for r in sweep_runs(root) if "-ft-" not in r.path][1]
    write_density(run.path, {1100: bump(1, 2.0)})
    figure = render(spectrum_figure([run]))
    assert len(figure.axes) == 1  # one ELR: no colour bar to read it off
    (line,) = figure.axes[0].get_lines()
    legend = figure.legends[0]
    # the step and its epoch (25 steps per epoch), and the run's ELR
    assert [t.get_text() for t in legend.get_texts()] == ["ELR 0.0003 at step 1100 (epoch 44)"]
    assert to_hex(legend.legend_handles[0].get_color()) == to_hex(line.get_color())
    assert "step" not in suptitle(figure) + figure.axes[0].get_title()  # said once


def test_every_spectrum_tail_reaches_the_axis_floor(handmade):
    """A density sampled only down to 1e-5 of its peak on its left (as sphrun's grid, 5 smoothing widths past
    the outermost Ritz values, may stop above the floor 1e-6 of the peak): the line still meets the floor."""
    root, _ = handmade
    run = [r for r in sweep_runs(root) if "-ft-" not in r.path][1]
    eigenvalues, density = bump(0, 1.0, count=101)
    cut = next(i for i, d in enumerate(density) if d >= 1e-5)
    write_density(run.path, {1100: (eigenvalues[cut:], density[cut:])})
    ax = render(spectrum_figure([run])).axes[0]
    (line,) = ax.get_lines()
    floor = ax.get_ylim()[0]
    x, y, first, last = drawn_curve(ax, line)
    assert first[0] == pytest.approx(eigenvalues[cut]) and first[1] <= floor  # dropped to the floor where it stops
    assert last[0] == pytest.approx(eigenvalues[-1]) and last[1] <= floor
    assert list(y) == pytest.approx([d for d in density[cut:] if d >= floor])  # the curve itself as measured


def test_spectrum_of_one_run_draws_each_step_early_to_late(handmade):
    from matplotlib import colormaps

    root, _ = handmade
    run = [r for r in sweep_runs(root) if "-ft-" not in r.path][1]
    curves = {0: bump(0, 1.0), 600: bump(2, 1.0), 1100: bump(4, 1.0)}
    write_density(run.path, curves)
    figure = render(spectrum_figure([run]))
    lines = figure.axes[0].get_lines()
    assert [line.get_xdata()[26] for line in lines] == pytest.approx([bump(c, 1)[0][25] for c in (0, 2, 4)])
    early_to_late = [to_hex(colormaps["plasma"](f)) for f in (0.0, 600 / 1100, 1.0)]
    assert [to_hex(line.get_color()) for line in lines] == early_to_late
    assert figure.axes[1].get_ylabel() == "SGD steps"  # the colour bar of the steps
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["ELR 0.0003, one line per measured step"]


def test_spectrum_without_densities_is_one_line(handmade):
    root, _ = handmade
    with pytest.raises(SphrunError, match="no run has a hessian-density.csv"):
        spectrum_figure(sweep_runs(root))


def test_gm_axes_say_their_unit(handmade, tmp_path):
    """GM is the norm of the gradient of the loss by the SI weights theta: the loss's unit (nats for
    cross-entropy) per unit of theta, on every figure that draws it."""
    root, _ = handmade
    runs = sweep_runs(root)
    connect = connect_output(tmp_path / "ab", {"a": end("a", 0), "b": end("b", 1), "train_size": 500})
    labels = {"phase": render(phase_figure(runs)).axes[0].get_ylabel(),
              "metrics": render(metrics_figure(runs, group_table(runs))).axes[3].get_ylabel(),
              "connect": render(draw_connect([connect])).axes[3].get_ylabel(),
              "plane": bar_label(contour_sets(render(draw_plane(plane_output(tmp_path / "abc"), ("gm",))))[0])}
    for figure, label in labels.items():
        assert label.startswith("GM") and label.endswith(r"(nats per unit $\theta$)"), (figure, label)
    assert axis_label("gm", ["mse"], short=True) == r"GM (MSE per unit $\theta$)"
    assert axis_label("gm", ["ce", "mse"], short=True) == r"GM (loss per unit $\theta$)"  # two units: none


def test_projection_figure_draws_the_mean_over_steps(handmade):
    root, written = handmade
    runs = [r for r in sweep_runs(root) if "-ft-" not in r.path]
    ax = render(projection_figure(runs)).axes[0]
    line = [l for l in ax.get_lines() if len(l.get_xdata()) == len(SWEEP)][0]
    # the first row is the start: no step was taken before it
    means = [100 * np.mean([r["proj_err"] for r in written[str(root / run_name(e))][1:]])
             for e in sorted(SWEEP)]
    assert list(line.get_ydata()) == pytest.approx(means)


def test_projection_writes_elrs_as_metrics_does(handmade):
    """Over 3e-4 to 1e-1 both axes label 10^-3, 10^-2, 10^-1, in one style (not 0.001 on one of them)."""
    root, _ = handmade
    runs = [r for r in sweep_runs(root) if "-ft-" not in r.path and r.elr > 1e-4]
    projection = render(projection_figure(runs)).axes[0]
    metrics = render(metrics_figure(runs, group_table(runs))).axes
    expected = ["$10^{-3}$", "$10^{-2}$", "$10^{-1}$"]
    assert labelled_ticks(projection.xaxis) == expected
    assert all(labelled_ticks(ax.xaxis) == expected for ax in metrics)


# --- readable figures -------------------------------------------------------------------------------
@pytest.mark.parametrize("low, high", [(11, 19), (0.95, 1.05), (0.6, 1.4), (1.5, 2.5), (12, 35), (2, 15),
                                       (3, 500), (1e-5, 3e-5), (5e4, 9e4), (1e-7, 1e5)])
def test_every_log_axis_has_labelled_ticks(low, high):
    with matplotlib.rc_context(STYLE):
        figure, axes = new_figure()
    ax = axes[0, 0]
    ax.plot([0, 1], [low, high])
    set_scale(ax, "y", [low, high])
    render(figure)
    assert ax.get_yscale() == "log"
    labels = labelled_ticks(ax.yaxis)
    assert len(labels) >= 2 and len(set(labels)) == len(labels), labels


@pytest.mark.parametrize("low, high", [(2.8, 7.2), (2.7, 4.6), (11, 19), (0.6, 1.4), (116, 685), (1.1, 9.6),
                                       (0.17, 1.6), (12, 35), (2, 15), (3e-4, 8e-3)])
def test_a_value_under_two_decades_reads_off_a_label_near_it(low, high):
    """Labels bracket the values within a third under a decade (2.8 is not read off labels 4 and 6), within
    a factor 2 over one to two, neighbours at most 2.5 times apart (1, 2, 5), and no two labels overlap on
    a panel of the 2x2 grid."""
    with matplotlib.rc_context(STYLE):
        figure, axes = new_figure(2, 2, height=3.3)
    ax = axes[1, 1]
    ax.plot([0, 1], [low, high])
    set_scale(ax, "y", [low, high])
    render(figure)
    shown_low, shown_high = ax.get_ylim()
    ticks = [(loc, label) for loc, label in zip(ax.yaxis.get_majorticklocs(), ax.yaxis.get_majorticklabels())
             if shown_low <= loc <= shown_high and label.get_text()]
    values = [loc for loc, _ in ticks]
    near = 4 / 3 if high / low < 10 else 2
    assert values[0] <= low * near and values[-1] >= high / near, values
    assert all(b / a <= 2.5 for a, b in zip(values, values[1:])), values
    boxes = [label.get_window_extent() for _, label in ticks]
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:])), values


@pytest.mark.parametrize("labels", [
    ["from init", "fine-tuned from " + "cifar10-convnet32-ce-elr0.0005-s0-bdd2eb58-ft-elr5e-05-from7800" * 2],
    [f"fine-tuned from run{k} at step {k * 1000}" for k in range(6)],
    ["phase 1", "phase 2", "phase 3"],
])
def test_figure_legends_stay_inside_the_figure(labels):
    with matplotlib.rc_context(STYLE):  # as the figures are drawn
        figure, axes = new_figure(2, 2, height=3.3)
        handles = [axes[0, 0].plot([1, 2], [k, k + 1], label=label)[0] for k, label in enumerate(labels)]
        legend = figure_legend(figure, handles)
    render(figure)
    assert inside(legend.get_window_extent(), figure.bbox)
    for ax in axes.flat:  # below the panels, not over them
        assert not legend.get_window_extent().overlaps(ax.get_window_extent())


def test_metrics_figure_axes_are_labelled_and_its_legend_fits(handmade):
    root, _ = handmade
    runs = sweep_runs(root)
    figure = render(metrics_figure(runs, group_table(runs)))
    for ax in figure.axes:
        assert len(labelled_ticks(ax.xaxis)) >= 2 and len(labelled_ticks(ax.yaxis)) >= 2, ax.get_ylabel()
    legend = figure.legends[0]
    assert inside(legend.get_window_extent(), figure.bbox)
    assert any("fine-tuned from" in t.get_text() for t in legend.get_texts())


# --- every kind from tiny real runs -------------------------------------------------------------------
ELRS = (1e-3, 3e-2, 1.0)
TINY_RUN = dict(dataset="synthetic", subset=256, width=4, batch_size=32, iters=20, eval_every=5, device="cpu")
FORK = 10


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Three tiny runs from one init, a fine-tune of the first (faked: a run whose config.json names a
    parent and whose rows start at the fork, as `sphrun finetune` writes), curvature.csv and
    hessian-density.csv files, and a connect output and a plane output (hand-written) beside them."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("plot")
    runs = root / "runs"
    for elr in ELRS:
        train(TrainConfig(elr=elr, **TINY_RUN), out=str(runs / f"elr{elr:g}"))
    parent, child = runs / "elr0.001", runs / "elr0.001-ft"
    copy_run(runs / "elr0.03", child)
    config = json.loads((child / "config.json").read_text())
    config["parent"] = {"run": str(parent), "iter": FORK}
    (child / "config.json").write_text(json.dumps(config))
    rows = RunDir(child).read_metrics()
    write_csv(child / "metrics.csv", [r for r in rows if r["iter"] >= FORK])
    for run in runs.iterdir():
        write_csv(run / "curvature.csv", [{"iter": r["iter"], "fisher-trace": 3 * r["gm"],
                                           "hessian-eig": r["gm"] ** 2} for r in RunDir(run).read_metrics()])
    connect = root / "connect" / "elr0.001@20--elr0.03@20"
    connect.mkdir(parents=True)
    write_csv(connect / "connect.csv", [{"alpha": a / 10, "train_loss": 1 + a * (10 - a) / 25,
                                         "train_err": 0.2 + a * (10 - a) / 100, "test_loss": 1.5,
                                         "test_err": 0.4, "gm": 2.0} for a in range(11)])
    connect_config = {"command": "connect", "a": {"settings": config["settings"]}}
    (connect / "config.json").write_text(json.dumps(connect_config))
    plane_output(root / "plane" / "elr0.001@20--elr0.03@20--elr1@20")
    for run in runs.iterdir():
        write_density(run, {0: bump(0, 1.0), 20: bump(1, 2.0)})
    return root


def copy_run(source, target):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", ".lock"))


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def drawn(path):
    """True when the file is an image with something on it (not one flat colour); what is drawn is
    checked on the figure's artists above."""
    pixels = matplotlib.image.imread(path)
    return os.path.getsize(path) > 0 and pixels.ndim == 3 and float(np.ptp(pixels[..., :3])) > 0


def run_cli(monkeypatch, capsys, *args):
    from sphrun.cli import main

    monkeypatch.setattr(sys, "argv", ["sphrun", "plot", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_draws_an_image(sweep, tmp_path, kind):
    source = sweep / (kind if kind in ("connect", "plane") else "runs")
    out = plot([str(source)], kind, out=str(tmp_path / f"{kind}.png"))
    assert drawn(out)


@pytest.mark.parametrize("extension, magic", [(".svg", b"<?xml"), (".pdf", b"%PDF-")])
def test_vector_formats(sweep, tmp_path, extension, magic):
    out = plot([str(sweep / "runs")], "phase", out=str(tmp_path / f"phase{extension}"))
    assert open(out, "rb").read(5) == magic


def test_default_names_beside_the_runs(sweep, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, sweep / "runs", "--kind", "projection")
    assert code == 0 and f"wrote {sweep / 'runs' / 'projection.png'}" in err
    assert drawn(sweep / "runs" / "projection.png")
    single = sweep / "runs" / "elr1"
    code, _, err = run_cli(monkeypatch, capsys, single, "--kind", "phase")
    assert code == 0 and drawn(sweep / "runs" / "elr1-phase.png")


def test_phase_diagram_with_curvature_columns(sweep, tmp_path):
    runs = sweep_runs(sweep / "runs")
    ax = render(phase_figure(runs, "gm", "fisher-trace")).axes[0]
    trajectories = [list(l.get_ydata()) for l in ax.get_lines() if len(l.get_xdata()) > 1]
    for run in runs:  # curvature.csv has fisher-trace = 3 GM at every step of the run
        assert any(y == pytest.approx([3 * r["gm"] for r in run.rows]) for y in trajectories), run.path
    with pytest.raises(SphrunError, match="no column nosuch"):
        plot([str(sweep / "runs")], "phase", out=str(tmp_path / "c.png"), y="nosuch")


def test_curvature_kind_leaves_out_runs_without_curvature(sweep, tmp_path, monkeypatch, capsys):
    for name in ("elr0.001", "elr1"):
        copy_run(sweep / "runs" / name, tmp_path / "runs" / name)
    os.remove(tmp_path / "runs" / "elr1" / "curvature.csv")
    code, _, err = run_cli(monkeypatch, capsys, tmp_path / "runs", "--kind", "curvature")
    assert code == 0 and drawn(tmp_path / "runs" / "curvature.png")
    assert f"note: {tmp_path / 'runs' / 'elr1'} has no curvature.csv" in err
    measured = with_curvature(sweep_runs(tmp_path / "runs"))
    assert [r.path for r in measured] == [str(tmp_path / "runs" / "elr0.001")]


def test_fine_tune_continues_from_its_parent_at_the_fork(sweep):
    child = load_run(str(sweep / "runs" / "elr0.001-ft"))
    path, rows = parent_rows(child, {})
    parent = RunDir(sweep / "runs" / "elr0.001").read_metrics()
    assert path == str(sweep / "runs" / "elr0.001")
    assert rows == [r for r in parent if r["iter"] <= FORK] and rows[-1]["iter"] == FORK
    assert child.rows[0]["iter"] == FORK  # so its line continues from the parent's point at the fork


def test_parent_recorded_from_another_folder_is_found_beside_the_fine_tune(sweep, tmp_path):
    copy_run(sweep / "runs" / "elr0.001", tmp_path / "elr0.001")
    copy_run(sweep / "runs" / "elr0.001-ft", tmp_path / "ft")
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    config["parent"]["run"] = "some/other/folder/elr0.001"
    (tmp_path / "ft" / "config.json").write_text(json.dumps(config))
    path, rows = parent_rows(load_run(str(tmp_path / "ft")), {})
    assert path == str(tmp_path / "elr0.001") and rows[-1]["iter"] == FORK


def test_mixed_losses_are_drawn_together(sweep, tmp_path):
    runs = tmp_path / "runs"
    copy_run(sweep / "runs" / "elr0.001", runs / "a")
    copy_run(sweep / "runs" / "elr1", runs / "b")
    set_setting(runs / "b", loss="mse")
    figure = render(phase_figure(sweep_runs(runs)))
    ax = figure.axes[0]
    markers = {l.get_marker() for l in ax.get_lines() if len(l.get_xdata()) == 1}
    assert {"o", "s"} <= markers  # one marker shape per loss
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert {"cross-entropy", "MSE"} <= set(legend)  # named in the legend, and so not in the title again
    assert "cross-entropy" not in ax.get_title() and "MSE" not in ax.get_title(), ax.get_title()
    assert "synthetic data" in ax.get_title() and "ConvNet c=4" in ax.get_title()  # what all the runs share


def test_runs_from_an_older_sphrun_join_the_same_line(sweep, tmp_path):
    # a config.json written before a setting existed means that setting's default
    copy_run(sweep / "runs" / "elr1", tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["settings"]["head_seed"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    runs = [load_run(str(sweep / "runs" / "elr0.001")), load_run(str(tmp_path / "old"))]
    assert len(group_series(runs)) == 1
    set_setting(tmp_path / "old", head_seed=1)
    assert len(group_series([runs[0], load_run(str(tmp_path / "old"))])) == 2


def set_setting(run, **changes):
    config = json.loads((run / "config.json").read_text())
    config["settings"].update(changes)
    (run / "config.json").write_text(json.dumps(config))


def bad_inputs(sweep, tmp):
    (tmp / "empty").mkdir()
    copy_run(sweep / "runs" / "elr1", tmp / "nometrics")
    os.remove(tmp / "nometrics" / "metrics.csv")
    copy_run(sweep / "runs" / "elr1", tmp / "nocos")
    write_csv(tmp / "nocos" / "metrics.csv",
              [{k: v for k, v in r.items() if k != "cos_prev"} for r in RunDir(tmp / "nocos").read_metrics()])
    copy_run(sweep / "runs" / "elr1", tmp / "nocurvature")  # a whole metrics.csv: nocos's is refused first
    os.remove(tmp / "nocurvature" / "curvature.csv")
    copy_run(sweep / "runs" / "elr1", tmp / "mixed" / "a")
    copy_run(sweep / "runs" / "elr0.03", tmp / "mixed" / "b")
    set_setting(tmp / "mixed" / "b", dataset="cifar10")
    copy_run(sweep / "runs" / "elr1", tmp / "uneven")
    rows = RunDir(tmp / "uneven").read_metrics()
    write_csv(tmp / "uneven" / "metrics.csv", [r for r in rows if r["iter"] != 5])  # gaps 10, 5, 5
    runs = sweep / "runs"
    return {
        "no runs": ([tmp / "empty"], [], "no sphrun runs in"),
        "no metrics.csv": ([tmp / "nometrics"], [], "has no metrics.csv"),
        "missing column": ([tmp / "nocos"], ["--kind", "cosine"], "has no column cos_prev"),
        "missing column in the table": ([tmp / "nocos"], ["--kind", "metrics"], "has no column cos_prev"),
        "two data sets": ([tmp / "mixed"], [], "different data sets"),
        "unknown kind": ([runs], ["--kind", "loss"], "unknown kind 'loss'"),
        "unknown extension": ([runs], ["--out", tmp / "x.jpg"], "must end in .png, .svg, .pdf"),
        "uneven spacing": ([tmp / "uneven"], ["--kind", "cosine"], "not equally spaced"),
        "no curvature.csv": ([tmp / "nocurvature"], ["--kind", "curvature"], "no run has a curvature.csv"),
        "not a folder": ([tmp / "missing"], [], "is not a directory"),
    }


def test_bad_inputs_are_one_line_errors(sweep, tmp_path, monkeypatch, capsys):
    cases = bad_inputs(sweep, tmp_path)
    os.remove(tmp_path / "nocos" / "curvature.csv")
    for name, (paths, options, expected) in cases.items():
        code, _, err = run_cli(monkeypatch, capsys, *paths, *options)
        assert code == 2, name
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, (name, err)
    assert not any(p.endswith(".png") for p in os.listdir(tmp_path))  # nothing half-drawn
