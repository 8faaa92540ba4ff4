"""`sphrun plot` over several seeds: hand-written runs at 2 ELRs x 3 seeds whose final values and phases are
known here; the drawn means and min-max bands, the pooled cosine boxes, the lines of the phase diagram
and the phase table (counts, each seed's phase, agreement, mean and std) are checked against values
computed in the test; --no-aggregate draws every run alone."""

import csv
import json
import math
import os
import random
import statistics

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_hex

from test_plot import band_colour, inside, labelled_ticks, render, run_cli, suptitle
from sphrun.phase_table import group_table
from sphrun.plot import cosine_figure, metrics_figure, phase_figure, projection_figure
from sphrun.runs import find_dirs, load_runs
from sphrun.style import PHASE_COLORS

# 25 steps per epoch: 44 epochs (a fine-tune from step 500, 24), long enough for the phase rules
STEPS = [100 * k for k in range(12)]
# the phase of seeds 0, 1, 2 at each ELR: all converge at 1e-3; at 1e-2 seed 0 random-walks and the others
# settle in an equilibrium, so the group's majority phase is 2 with agreement 2/3 (and not seed 0's)
SEED_PHASES = {1e-3: "111", 1e-2: "322"}
SEEDS = (0, 1, 2)
COLUMNS = ("train_loss", "train_err", "test_err", "gm")
UNITS = {"train_loss": 1, "train_err": 100, "test_err": 100, "gm": 1}  # errors drawn in %


def metrics_row(phase, elr, seed, k, scale=1.0):
    """The k-th evaluation point of a run in `phase`; every seed, ELR and loss (`scale`) has its own level,
    so a mean over the wrong runs shows other numbers. Phase 1: the train error falls by 0.7 per point;
    phase 2: the error stuck at a level, checkpoints 53 degrees apart; phase 3: chance, uncorrelated."""
    level = scale * (1 + seed / 4 + (math.log10(elr) + 3) / 10)
    wiggle = (-1) ** k
    if phase == "1":
        loss, err, gm, cos = level * 2 / (1 + k), 0.5 * level * 0.7 ** k, level * 10 / math.sqrt(1 + k), 0.9999
    elif phase == "2":
        loss, err, gm = level * (1 + 0.02 * wiggle), 0.3 * level + 0.01 * wiggle, level * 3 * (1 + 0.02 * wiggle)
        cos = 0.6 + 0.02 * wiggle
    else:
        loss, err, gm, cos = level * 8 * (1 + 0.03 * wiggle), 0.9 + 0.003 * wiggle, level * 2000, 0.01 * wiggle
    return {"iter": STEPS[k], "epoch": 4 * k, "elr": elr, "train_loss": loss, "train_err": err,
            "test_loss": loss + 0.5, "test_err": min(1.0, err + 0.05 + 0.02 * seed), "gm": gm, "si_norm": 40.0,
            "cos_prev": 1.0 if k == 0 else cos, "cos_init": 1 - 0.01 * k,
            "proj_err": 1e-3 * level * (1 + k % 3), "wall_s": 10.0 * k}


def write_run(folder, settings, rows, parent=None):
    os.makedirs(folder, exist_ok=True)
    settings = {"dataset": "cifar10", "model": "convnet", "width": 32, "eval_every": 100, **settings}
    config = {"command": "train", "settings": settings, "num_classes": 10, "train_size": 50000,
              "parent": parent, "status": "done"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "metrics.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_sweep(root, loss="ce", scale=1.0, data_seed=0, seeds=SEEDS, seed_phases=SEED_PHASES):
    """The runs of `seed_phases` for one loss; returns {run path: (elr, seed, its rows by step)}."""
    written = {}
    for elr, phases in seed_phases.items():
        for seed in seeds:
            path = str(root / f"cifar10-convnet32-{loss}-elr{elr:g}-s{seed}-d{data_seed}")
            rows = [metrics_row(phases[seed], elr, seed, k, scale) for k in range(len(STEPS))]
            write_run(path, {"elr": elr, "loss": loss, "seed": seed, "data_seed": data_seed}, rows)
            written[path] = (elr, seed, rows)
    return written


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "runs"
    return root, write_sweep(root)


def loaded(root):
    return load_runs(find_dirs([str(root)], "config.json"))


def finals(written, column, elr, loss="ce"):
    """The column at the last step of the runs at `elr`, by seed, read here from the rows as written."""
    return [rows[-1][column] for path, (e, seed, rows) in sorted(written.items(), key=lambda w: w[1][1])
            if e == elr and f"-{loss}-" in path]


# --- what is drawn ----------------------------------------------------------------------------------
def data_lines(ax):
    """The lines through the points (not the legend's or the phase bands')."""
    return [line for line in ax.get_lines() if len(line.get_xdata()) > 0]


def band_edges(ax):
    """{x: (lowest y, highest y)} of each fill_between band on the axes, one dict per band."""
    bands = []
    for collection in ax.collections:
        if isinstance(collection, PolyCollection):
            vertices = collection.get_paths()[0].vertices
            edges = {}
            for x, y in vertices:
                low, high = edges.get(x, (y, y))
                edges[x] = (min(low, y), max(high, y))
            bands.append(edges)
    return bands


def test_metrics_draw_the_mean_over_seeds_and_a_min_max_band(sweep):
    root, written = sweep
    runs = loaded(root)
    figure = metrics_figure(runs, group_table(runs))
    elrs = sorted(SEED_PHASES)
    for ax, column in zip(figure.axes, COLUMNS):
        unit = UNITS[column]
        lines = data_lines(ax)
        assert len(lines) == 1, column  # one line for the sweep, not one per seed
        seeds = [finals(written, column, elr) for elr in elrs]
        assert list(lines[0].get_xdata()) == pytest.approx(elrs)
        assert list(lines[0].get_ydata()) == pytest.approx([unit * sum(v) / 3 for v in seeds]), column
        bands = band_edges(ax)
        assert len(bands) == 1, column
        for elr, values in zip(elrs, seeds):
            assert bands[0][elr] == pytest.approx((unit * min(values), unit * max(values))), (column, elr)
        # the phase behind each ELR is its group's majority: 1 (3/3) and 2 (2/3)
        assert band_colour(ax, 1e-3) == PHASE_COLORS["1"] and band_colour(ax, 1e-2) == PHASE_COLORS["2"]
    legend = " ".join(t.get_text() for t in figure.legends[0].get_texts())
    assert "mean over 3 seeds" in legend and "lowest to highest" in legend


def test_the_band_is_drawn_in_its_lines_colour(sweep):
    root, _ = sweep
    runs = loaded(root)
    for ax in metrics_figure(runs, group_table(runs)).axes:
        line, band = data_lines(ax)[0], [c for c in ax.collections if isinstance(c, PolyCollection)][0]
        colour = to_hex(line.get_color())
        assert to_hex(band.get_facecolor()[0]) == colour and band.get_facecolor()[0][3] < 0.5  # seen through
        assert to_hex(band.get_edgecolor()[0]) == colour  # outlined: over a phase's shading a fill turns muddy


def test_gm_within_a_decade_reads_off_labels_near_every_value(tmp_path):
    """GM of phases 1 and 2 only (2.9 to 4.8): a value near 2.9 has a label near it, not just 4 and 6."""
    write_sweep(tmp_path, seed_phases={1e-3: "111", 1e-2: "222"})
    runs = loaded(tmp_path)
    ax = render(metrics_figure(runs, group_table(runs))).axes[3]
    labels = [float(text) for text in labelled_ticks(ax.yaxis)]
    drawn = [y for line in data_lines(ax) for y in line.get_ydata()] + [y for band in band_edges(ax)
                                                                        for edge in band.values() for y in edge]
    assert max(drawn) / min(drawn) < 10 and len(labels) >= 3
    for value in drawn:
        assert min(abs(math.log(value / label)) for label in labels) <= math.log(4 / 3), (value, labels)


def test_phase_diagram_legend_hides_no_point(tmp_path):
    """Nine trajectories that wander over the whole axes: no corner of them is free for a legend."""
    rng = random.Random(0)
    for elr in (1e-3, 1e-2, 1e-1):
        for seed in SEEDS:
            rows = [dict(metrics_row("2", elr, seed, k), train_loss=10 ** rng.uniform(-1, 1),
                         gm=10 ** rng.uniform(0, 3)) for k in range(len(STEPS))]
            write_run(tmp_path / f"elr{elr:g}-s{seed}", {"elr": elr, "loss": "ce", "seed": seed}, rows)
    figure = render(phase_figure(loaded(tmp_path)))
    ax = figure.axes[0]
    legend = (figure.legends or [ax.get_legend()])[0].get_window_extent()
    points = [point for line in ax.get_lines() for point in ax.transData.transform(line.get_xydata())]
    assert len(points) > 9 * len(STEPS) and not any(legend.contains(x, y) for x, y in points)
    assert inside(legend, figure.bbox)


def test_phase_table_has_one_row_per_group(sweep):
    root, written = sweep
    table = group_table(loaded(root))
    assert [row["elr"] for row in table] == sorted(SEED_PHASES)
    for row in table:
        elr = row["elr"]
        assert row["seeds"] == 3
        assert row["phases"] == " ".join(f"s{s}:{p}" for s, p in zip(SEEDS, SEED_PHASES[elr]))
        for column in COLUMNS:
            values = finals(written, column, elr)
            assert row[column] == pytest.approx(statistics.mean(values)), column
            assert row[f"{column}_std"] == pytest.approx(statistics.stdev(values)), column  # n - 1
        assert row["steps"] == STEPS[-1]
        assert sorted(row["runs"].split(";")) == sorted(p for p, w in written.items() if w[0] == elr)
    assert [(row["phase"], row["agreement"]) for row in table] == [("1", "1 (3/3)"), ("2", "2 (2/3)")]


def read_table(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_command_writes_and_prints_the_group_table(sweep, tmp_path, monkeypatch, capsys):
    root, written = sweep
    code, out, err = run_cli(monkeypatch, capsys, root, "--kind", "metrics", "--out", tmp_path / "m.png")
    assert code == 0, err
    table = read_table(tmp_path / "m-phases.csv")
    assert [(r["elr"], r["seeds"], r["phase"], r["agreement"], r["phases"]) for r in table] == [
        ("0.001", "3", "1", "1 (3/3)", "s0:1 s1:1 s2:1"), ("0.01", "3", "2", "2 (2/3)", "s0:3 s1:2 s2:2")]
    for row in table:
        values = finals(written, "gm", float(row["elr"]))
        assert float(row["gm"]) == pytest.approx(statistics.mean(values), rel=1e-5)
        assert float(row["gm_std"]) == pytest.approx(statistics.stdev(values), rel=1e-5)
    assert "2 (2/3)" in out and "s0: random walk" in out and "s1 s2: equilibrium" in out
    assert "1|2 between ELR 0.001 and 0.01" in out  # between the groups' majority phases


def test_no_aggregate_draws_every_run_alone(sweep, tmp_path, monkeypatch, capsys):
    root, written = sweep
    runs = loaded(root)
    figure = metrics_figure(runs, group_table(runs, aggregate=False), aggregate=False)
    ax = figure.axes[0]
    assert not band_edges(ax)
    drawn = sorted((x, y) for line in data_lines(ax) for x, y in zip(line.get_xdata(), line.get_ydata()))
    expected = sorted((w[0], w[2][-1]["train_loss"]) for w in written.values())
    assert len(drawn) == len(expected)
    for point, want in zip(drawn, expected):  # pairs one by one: pytest.approx takes no nested lists
        assert list(point) == pytest.approx(list(want)), (point, want)
    assert len(data_lines(ax)) == 3  # a line per seed, through its 2 ELRs: 6 points
    code, _, err = run_cli(monkeypatch, capsys, root, "--kind", "metrics", "--no-aggregate",
                           "--out", tmp_path / "alone.png")
    assert code == 0, err
    table = read_table(tmp_path / "alone-phases.csv")
    assert len(table) == 6 and {r["seeds"] for r in table} == {"1"}
    assert sorted(r["phase"] for r in table) == sorted("111322")
    assert {r["gm_std"] for r in table} == {""}  # no spread from a single seed


def later_cosines(rows):
    return [r["cos_prev"] for r in rows if r["iter"] >= STEPS[-1] / 2]


def box_x(box):
    return box.get_path().vertices[:, 0]


def test_cosine_boxes_pool_the_seeds(sweep):
    root, written = sweep
    ax = cosine_figure(loaded(root)).axes[0]
    assert len(ax.patches) == 2  # one box per ELR
    for slot, elr in enumerate(sorted(SEED_PHASES)):
        pooled = [c for e, _, rows in written.values() if e == elr for c in later_cosines(rows)]
        box = [b for b in ax.patches if min(box_x(b)) <= slot <= max(box_x(b))]
        assert len(box) == 1
        y = box[0].get_path().vertices[:, 1]
        assert (y.min(), y.max()) == pytest.approx(tuple(np.percentile(pooled, [25, 75]))), elr
        assert to_hex(box[0].get_facecolor()) == PHASE_COLORS[SEED_PHASES[elr][-1]]  # the majority's
    alone = cosine_figure(loaded(root), aggregate=False).axes[0]
    assert len(alone.patches) == 6


def trajectories(ax):
    return [line for line in ax.get_lines() if len(line.get_xdata()) > 1]


@pytest.mark.parametrize("aggregate", [True, False])
def test_phase_diagram_draws_a_line_per_seed_in_its_groups_colour(sweep, aggregate):
    root, written = sweep
    ax = phase_figure(loaded(root), aggregate=aggregate).axes[0]
    lines = trajectories(ax)
    assert len(lines) == 6
    colours = {}
    for elr, seed, rows in written.values():
        drawn = [l for l in lines if list(l.get_xdata()) == pytest.approx([r["train_loss"] for r in rows])
                 and list(l.get_ydata()) == pytest.approx([r["gm"] for r in rows])]
        assert len(drawn) == 1, (elr, seed)
        colours.setdefault(elr, set()).add(to_hex(drawn[0].get_color()))
    assert all(len(c) == 1 for c in colours.values()) and len(set.union(*colours.values())) == 2
    labels = [t.get_text() for t in ax.figure.legends[0].get_texts()]
    assert any("one line per seed" in label for label in labels) == aggregate


def test_projection_pools_the_seeds(sweep):
    root, written = sweep
    ax = projection_figure(loaded(root)).axes[0]
    line = [l for l in ax.get_lines() if len(l.get_xdata()) == 2][0]
    means = [100 * np.mean([r["proj_err"] for e, _, rows in written.values() if e == elr for r in rows[1:]])
             for elr in sorted(SEED_PHASES)]
    assert list(line.get_ydata()) == pytest.approx(means)


def test_two_losses_stay_two_groups_at_each_elr(sweep):
    root, written = sweep
    written.update(write_sweep(root, loss="mse", scale=0.5))
    runs = loaded(root)
    table = group_table(runs)
    assert len(table) == 4 and {r["seeds"] for r in table} == {3}
    figure = metrics_figure(runs, table)
    lines = {line.get_label(): line for line in data_lines(figure.axes[3])}
    assert set(lines) == {"cross-entropy", "MSE"}
    for loss, label in (("ce", "cross-entropy"), ("mse", "MSE")):
        means = [np.mean(finals(written, "gm", elr, loss)) for elr in sorted(SEED_PHASES)]
        assert list(lines[label].get_ydata()) == pytest.approx(means), loss
    legend = [t.get_text() for t in render(figure).legends[0].get_texts()]
    title = suptitle(figure)
    assert {"cross-entropy", "MSE"} <= set(legend) and "cross-entropy" not in title and "MSE" not in title, title
    assert "CIFAR-10" in title and "ConvNet c=32" in title  # what every line shares
    assert figure.axes[3].get_ylabel() == r"GM (loss per unit $\theta$)"  # two losses: no one unit


def test_data_seeds_join_the_group(sweep):
    root, written = sweep
    written.update(write_sweep(root, data_seed=1, seeds=(0,)))
    table = group_table(loaded(root))
    assert [row["seeds"] for row in table] == [4, 4]
    assert table[0]["phases"] == "s0/d0:1 s0/d1:1 s1/d0:1 s2/d0:1"
    # at 1e-2 the new seed random-walks as seed 0 does: 2 seeds in phase 2, 2 in phase 3, no majority
    assert (table[1]["phase"], table[1]["agreement"]) == ("undecided", "2 or 3 (2/4 each)")


def test_fine_tunes_of_each_seeds_parent_form_one_group(sweep):
    root, written = sweep
    fork, elr = 500, 3e-3
    for seed in SEEDS:
        parent = str(root / f"cifar10-convnet32-ce-elr0.001-s{seed}-d0")
        rows = [metrics_row("2", elr, seed, k) for k in range(STEPS.index(fork), len(STEPS))]
        write_run(f"{parent}-ft-elr{elr:g}-from{fork}",
                  {"elr": elr, "loss": "ce", "seed": seed, "origin": fork, "elr_from": 1e-3}, rows,
                  parent={"run": parent, "iter": fork})
    table = group_table(loaded(root))
    tuned = [row for row in table if row["series"].startswith("fine-tuned")]
    assert len(tuned) == 1 and tuned[0]["seeds"] == 3 and tuned[0]["agreement"] == "2 (3/3)"
    assert "s0-d0 at step 500 (and 2 other seeds' runs)" in tuned[0]["series"]
    assert [row["seeds"] for row in table if row not in tuned] == [3, 3]
    alone = group_table(loaded(root), aggregate=False)
    assert len([row for row in alone if row["series"].startswith("fine-tuned")]) == 3


def test_runs_with_the_same_seeds_are_named_in_a_note(sweep, tmp_path, monkeypatch, capsys):
    root, written = sweep
    first = next(iter(written))
    copy = root / "again"
    os.makedirs(copy)
    for name in ("config.json", "metrics.csv"):
        with open(os.path.join(first, name)) as source, open(copy / name, "w") as target:
            target.write(source.read())
    code, _, err = run_cli(monkeypatch, capsys, root, "--kind", "phase", "--out", tmp_path / "p.png")
    assert code == 0 and "note: runs with the same seeds at ELR 0.001" in err and str(copy) in err
