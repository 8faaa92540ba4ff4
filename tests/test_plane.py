"""sphrun connect A B C: the plane through three runs. Its basis is orthonormal and finds B and C, its
points on A, on the edge AB and at C measure what `sphrun connect` measures there, its grid reaches where
the margin says, the radius moves as on each segment, packed points equal single ones, and collinear
ends are refused."""

import csv
import json
import math
import os
import shutil
import signal
import time

import pytest
import torch

from sphrun.config import TrainConfig
from sphrun.connect import flat_weights, load_end, measure_plane, parameter_names
from sphrun.lifecycle import restore
from sphrun.metrics import full_batches
from sphrun.plane import Plane, grid, span_plane
from sphrun.train import train

from conftest import TINY

COLUMNS = ("train_loss", "train_err", "test_loss", "test_err", "gm")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs that differ in the seed of their trainable weights only."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("plane")
    for name, seed in (("a", 0), ("b", 1), ("c", 2)):
        train(TrainConfig(seed=seed, elr=1e-3, iters=8, eval_every=8, **TINY), str(root / name))
    return [str(root / name) for name in "abc"]


@pytest.fixture(scope="module")
def plane3(runs, tmp_path_factory):
    """`sphrun connect a b c --grid 3 --margin 0`'s output folder."""
    from sphrun.connect import connect_plane

    out = str(tmp_path_factory.mktemp("plane3") / "abc")
    connect_plane(runs, ["last"] * 3, points=3, margin=0, out=out, device="cpu")
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def weights(runs):
    ends = [load_end(run, "last") for run in runs]
    names = parameter_names(ends[0], trainable=True)
    return [flat_weights(end, names).double() for end in ends]


def test_the_basis_is_orthonormal_and_finds_b_and_c(runs):
    a, b, c = weights(runs)
    plane = span_plane(a, b, c)
    assert plane.e_u.norm().item() == pytest.approx(1, abs=1e-12)
    assert plane.e_v.norm().item() == pytest.approx(1, abs=1e-12)
    assert abs(torch.dot(plane.e_u, plane.e_v).item()) < 1e-12
    assert torch.allclose(a + plane.b * plane.e_u, b, rtol=0, atol=1e-12)
    assert torch.allclose(a + plane.c[0] * plane.e_u + plane.c[1] * plane.e_v, c, rtol=0, atol=1e-12)
    assert plane.c[1] > 0 and plane.b == pytest.approx((b - a).norm().item(), rel=1e-12)
    cos = torch.dot(b - a, c - a).item() / ((b - a).norm() * (c - a).norm()).item()
    assert plane.cos_a == pytest.approx(cos, rel=1e-12)
    assert plane.radii == pytest.approx([t.norm().item() for t in (a, b, c)], rel=1e-12)


def hand_plane(b, c, radii=(1.0, 2.0, 4.0)):
    """A plane whose geometry is given (its vectors play no part in grid and radius)."""
    empty = torch.zeros(1, dtype=torch.float64)
    return Plane(empty, empty, empty, b, c, radii)


@pytest.mark.parametrize("c,corners", [
    ((1.0, 3.0), ((-0.8, -0.6), (4.8, 3.6))),  # u over [0, 4] and v over [0, 3], each widened by 20 %
    ((-1.0, 2.0), ((-2.0, -0.4), (5.0, 2.4))),  # an obtuse angle at A: u over [-1, 4]
])
def test_the_grid_reaches_past_the_triangle_by_the_margin(c, corners):
    points = grid(hand_plane(4.0, c), 5, 0.2)
    assert len(points) == 25
    assert points[0] == pytest.approx(corners[0]) and points[-1] == pytest.approx(corners[1])
    assert points[4] == pytest.approx((corners[1][0], corners[0][1]))  # u varies fastest
    assert points[1][0] - points[0][0] == pytest.approx((corners[1][0] - corners[0][0]) / 4)


def test_the_radius_keeps_each_end_and_moves_along_each_edge_as_on_its_segment():
    plane = hand_plane(4.0, (1.0, 3.0), radii=(1.0, 2.0, 4.0))
    assert plane.radius(0, 0) == pytest.approx(1.0)
    assert plane.radius(4, 0) == pytest.approx(2.0)
    assert plane.radius(1, 3) == pytest.approx(4.0)
    assert plane.radius(1, 0) == pytest.approx(0.75 * 1.0 + 0.25 * 2.0)  # a quarter of the way to B
    assert plane.radius(2.5, 1.5) == pytest.approx((2.0 + 4.0) / 2)  # half way from B to C
    assert plane.radius(0.5, 1.5) == pytest.approx((1.0 + 4.0) / 2)  # half way from A to C


def test_points_on_a_on_the_edge_and_at_c_measure_what_connect_measures(runs, plane3, cli, tmp_path):
    a, b, c = runs
    out = plane3  # measured in packs of 4, 4 and 1 points, against connect's one by one
    config = json.load(open(os.path.join(out, "config.json")))
    (b_u, _), (c_u, c_v) = config["basis"]["b"], config["basis"]["c"]
    assert 0 < c_u < b_u  # acute at A and B: with no margin the grid's corners are (0, 0) and (b_u, c_v)
    rows = read_csv(os.path.join(out, "plane.csv"))
    assert [c for r in rows[:3] for c in (r["u"], r["v"])] == pytest.approx([0, 0, b_u / 2, 0, b_u, 0], abs=1e-6)
    assert (rows[-1]["u"], rows[-1]["v"]) == pytest.approx((b_u, c_v))
    assert os.path.getsize(os.path.join(out, "plane.png")) > 0

    code, err = cli("connect", a, b, "--points", "3", "--out", tmp_path / "ab")
    assert code == 0, err
    code, err = cli("connect", a, c, "--points", "2", "--out", tmp_path / "ac")
    assert code == 0, err
    segment, to_c = read_csv(tmp_path / "ab" / "connect.csv"), read_csv(tmp_path / "ac" / "connect.csv")
    # A, the middle of AB, B. The plane's points are theta_A + u e_u, the segment's lerp(theta_A, theta_B,
    # alpha): the same weights to float32 rounding (1e-7), which the batch statistics amplify to 2e-5 in GM
    # on some CPUs; a wrong radius or basis is off by percents.
    for on_plane, on_segment in zip(rows[:3], segment):
        assert on_plane == pytest.approx({"u": on_plane["u"], "v": 0, **{k: on_segment[k] for k in COLUMNS}},
                                         rel=1e-4, abs=1e-6)

    # C lies on no grid point here: measure the plane at its coordinates as the command does
    _, settings, data, model, params, order, _ = restore(a, "last", "cpu")
    plane = span_plane(*weights(runs))
    permutation = order.permutation(0)
    at = [(0.0, 0.0), (c_u, c_v)]
    measured = measure_plane(model, settings, data, permutation, full_batches(permutation, 32), plane, at,
                             [plane.radius(u, v) for u, v in at], per_pass=1)
    for on_plane, on_segment in zip(measured, to_c):
        assert {k: on_plane[k] for k in COLUMNS} == pytest.approx({k: on_segment[k] for k in COLUMNS},
                                                                   rel=1e-5, abs=1e-6)


def test_packed_points_on_the_gpu_measure_what_single_points_measure(runs, cuda):
    _, settings, data, model, params, order, _ = restore(runs[0], "last", "cuda")
    plane = span_plane(*weights(runs))
    plane = plane._replace(origin=plane.origin.to(params[0].device), e_u=plane.e_u.to(params[0].device),
                           e_v=plane.e_v.to(params[0].device))
    at = [(0.0, 0.0), (plane.b, -0.5), (plane.c[0] / 2, plane.c[1] / 3)]
    radii = [plane.radius(u, v) for u, v in at]
    permutation = order.permutation(0)
    measure = lambda per_pass: measure_plane(model, settings, data, permutation, full_batches(permutation, 32)[:3],
                                             plane, at, radii, per_pass)
    packed, single = measure(2), measure(1)  # a pack of 2 points, then the third alone; then one by one
    assert [(r["u"], r["v"]) for r in packed] == [(r["u"], r["v"]) for r in single] == list(at)
    for p, s in zip(packed, single):
        assert {k: p[k] for k in COLUMNS} == pytest.approx({k: s[k] for k in COLUMNS}, rel=1e-4, abs=1e-5)


def collinear_copy(runs, tmp_path):
    """A copy of run B whose weights are A + 2 (B - A), on the line through A and B."""
    a, b = (torch.load(os.path.join(run, "checkpoints", "last.pt"), weights_only=True)["model"] for run in runs[:2])
    names = parameter_names(load_end(runs[0], "last"), trainable=True)
    copy = str(tmp_path / "on-the-line")
    shutil.copytree(runs[1], copy)
    for name in os.listdir(os.path.join(copy, "checkpoints")):
        file = os.path.join(copy, "checkpoints", name)
        state = torch.load(file, weights_only=True)
        for key in names:
            state["model"][key] = a[key] + 2 * (b[key] - a[key])
        torch.save(state, file)
    return copy


@pytest.mark.parametrize("ends,expected", [
    ("a b line", "A, B and C are collinear"),
    ("a b a", "A, B and C are collinear"),
    ("a a b", "B has A's weights"),
])
def test_collinear_ends_are_one_line_and_write_nothing(runs, cli, tmp_path, monkeypatch, ends, expected):
    monkeypatch.chdir(tmp_path)
    paths = {"a": runs[0], "b": runs[1], "line": collinear_copy(runs, tmp_path) if "line" in ends else None}
    code, err = cli("connect", *(paths[e] for e in ends.split()), "--grid", "2")
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and expected in err, err
    assert not os.path.exists("connect")


@pytest.mark.parametrize("args,expected", [
    (["--grid", "3"], "--grid, --margin and --from-c set the plane"),
    (["--margin", "0.1"], "--grid, --margin and --from-c set the plane"),
    (["C", "--points", "3"], "--points sets the segment"),
    (["C", "--grid", "1"], "--grid must be at least 2"),
    (["C", "--margin", "-0.1"], "--margin must be 0 or more"),
    (["C", "--from-c", "5"], "has no checkpoint 5"),
])
def test_options_of_the_other_shape_are_one_line(runs, cli, tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    args = [runs[2] if arg == "C" else arg for arg in args]
    code, err = cli("connect", runs[0], runs[1], *args)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and expected in err, err
    assert not os.path.exists("connect")


def test_a_plane_never_replaces_a_segments_output(runs, cli, tmp_path):
    out = tmp_path / "ab"
    code, err = cli("connect", runs[0], runs[1], "--points", "2", "--out", out)
    assert code == 0, err
    before = sorted(os.listdir(out))
    code, err = cli("connect", *runs, "--grid", "2", "--out", out)
    assert code == 2 and "another connect output's config.json (connect.csv beside it)" in err, err
    assert sorted(os.listdir(out)) == before
    assert math.isclose(json.load(open(out / "config.json"))["points"], 2)


def test_a_plane_never_goes_into_a_run(runs, cli, tmp_path):
    for out, says in ((runs[0], "holds a run's config.json"), (os.path.join(runs[0], "plane"), "is a run directory"),
                      (os.path.dirname(runs[0]), "holds run directories")):
        before = sorted(os.listdir(out)) if os.path.isdir(out) else None
        code, err = cli("connect", *runs, "--grid", "2", "--out", out)
        assert code == 2 and err.count("\n") == 1 and says in err, err
        assert (sorted(os.listdir(out)) if os.path.isdir(out) else None) == before


# --- a long plane stops and resumes, and says how long it takes ---------------------------------------------
def without_argv(path):
    record = json.load(open(path))
    del record["argv"]
    return record


def signalling(monkeypatch, signum, when):
    """Make the command send itself `signum` as measure_plane begins its `when`-th pass."""
    import sphrun.connect as connect

    real, calls = connect.measure_plane, []

    def measure_plane(*args, **kwargs):
        calls.append(1)
        if len(calls) == when:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)
    monkeypatch.setattr(connect, "measure_plane", measure_plane)


def test_a_plane_stopped_by_a_signal_resumes_and_ends_with_the_uninterrupted_output(runs, plane3, cli, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "abc"
    args = ["connect", *runs, "--grid", "3", "--margin", "0", "--out", out]
    with monkeypatch.context() as patch:
        signalling(patch, signal.SIGUSR1, 2)  # the second pack of 4 points is given up at its first batch
        code, err = cli(*args)
    assert code == 138 and "4 per pass" in err, err
    assert err.strip().splitlines()[-1] == (f"interrupted by SIGUSR1 at point 5 of 9: the 4 points measured kept in "
                                            f"{out / 'unfinished.jsonl'}; run the same command to resume")
    assert not (out / "plane.csv").exists()
    code, err = cli(*args)
    assert code == 0 and "resuming at point 5 (4 kept in" in err, err
    assert (out / "plane.csv").read_bytes() == open(os.path.join(plane3, "plane.csv"), "rb").read()
    assert without_argv(out / "config.json") == without_argv(os.path.join(plane3, "config.json"))
    assert not (out / "unfinished.jsonl").exists()


def test_a_large_grid_says_how_many_points_and_how_long_from_its_first_pass(runs, cli, tmp_path, monkeypatch):
    """The first pack of 4 points takes 8 s on a clock of the test's: 2 s a point, so 99,999,996 more take
    199,999,992 s, 6.3 years. (Then a SIGTERM stops it.) Log lines begin with the date and time."""
    import types

    import sphrun.connect as connect
    import sphrun.progress as progress

    clock = [1000.0]
    fake = types.SimpleNamespace(monotonic=lambda: clock[0], strftime=time.strftime)
    real = connect.measure_plane

    def measure_plane(*args, **kwargs):
        rows = real(*args, **kwargs)
        clock[0] += 8.0
        os.kill(os.getpid(), signal.SIGTERM)
        return rows
    with monkeypatch.context() as patch:
        patch.setattr(connect, "time", fake)
        patch.setattr(progress, "time", fake)
        patch.setattr(connect, "measure_plane", measure_plane)
        code, err = cli("connect", *runs, "--grid", "10000", "--out", tmp_path / "big")
    lines = [line.split(" ", 2)[2] if line[:2] == "20" else line for line in err.splitlines()]  # less the time
    assert code == 143 and lines[0].endswith(": 10,000 x 10,000 = 100,000,000 points, 4 per pass"), err
    assert lines[1] == "4 points took 8 s: 6 years left for the other 99,999,996 at that pace"
    assert lines[2].startswith("1/100,000,000  u ") and lines[2].endswith("(6 years left)")
    assert lines[-1].startswith("interrupted by SIGTERM at point 5 of 100,000,000: the 4 points measured kept in")
