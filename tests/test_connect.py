"""sphrun connect: the ends are the runs, a run with itself is flat, only GM feels the projection,
and runs of different function spaces are refused."""

import csv
import json
import os
import shutil
import signal

import pytest
import torch

from sphrun.config import TrainConfig
from sphrun.train import train

TINY = dict(elr=1e-3, iters=8, eval_every=8, dataset="synthetic", subset=256, width=4, batch_size=32,
            device="cpu")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs that differ in the seed of their trainable weights only."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("connect")
    for name, seed in (("a", 0), ("b", 1)):
        train(TrainConfig(seed=seed, **TINY), str(root / name))
    return str(root / "a"), str(root / "b")


@pytest.fixture(scope="module")
def segment(runs, tmp_path_factory):
    """`sphrun connect a b --points 3`'s output folder."""
    from sphrun.connect import connect

    out = str(tmp_path_factory.mktemp("segment") / "ab")
    connect(*runs, points=3, out=out, device="cpu")
    return out


def read_csv(path):
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def close(a, b, rel=1e-5):
    return abs(a - b) <= rel * abs(b)


def test_ends_are_the_runs_own_metrics(runs, segment):
    a, b = runs
    out = segment
    rows = read_csv(os.path.join(out, "connect.csv"))
    assert [r["alpha"] for r in rows] == [0, 0.5, 1]
    for row, run in ((rows[0], a), (rows[-1], b)):
        own = read_csv(os.path.join(run, "metrics.csv"))[-1]  # BN train mode, like the train columns
        assert all(close(row[k], own[k]) for k in ("train_loss", "train_err", "gm"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert (config["a"]["iter"], config["b"]["iter"], config["points"], config["project"]) == (8, 8, 3, True)
    assert config["train_size"] == 256  # the figure's title says it, as the runs' figures do
    line = lambda k: (rows[0][k] + rows[-1][k]) / 2
    assert close(config["barrier"]["train_loss"], max(0, rows[1]["train_loss"] - line("train_loss")))
    assert close(config["barrier"]["test_err"], max(0, rows[1]["test_err"] - line("test_err")), 1e-6)
    assert os.path.getsize(os.path.join(out, "connect.png")) > 0


def test_run_connected_with_itself_is_flat(runs, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, _ = runs
    code, err = cli("connect", a, a, "--from-b", "8", "--points", "3", "--bn-batches", "2")
    assert code == 0, err
    out = os.path.join("connect", "a@8--a@8-p3-bn2")  # the default name, from the runs and options
    rows = read_csv(os.path.join(out, "connect.csv"))
    assert all(r == {**rows[0], "alpha": r["alpha"]} for r in rows)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["barrier"] == {"train_loss": 0.0, "test_err": 0.0} and config["bn_batches"] == 2


def test_projection_changes_gm_alone(runs):
    """A fully SI net computes the same function at any radius; its gradients scale with 1 / radius.
    (Up to BatchNorm's eps, added to variances that scale with radius^2: hence 1e-4.)"""
    from sphrun.connect import move_to_, recompute_bn_statistics
    from sphrun.metrics import eval_metrics, full_batches, train_metrics
    from sphrun.sphere import global_norm
    from sphrun.lifecycle import restore

    a, b = runs
    _, config, data, model, params, order, _ = restore(a, "last", "cpu")
    theta_a = [p.detach().clone() for p in params]
    theta_b = [p.detach().clone() for p in restore(b, "last", "cpu")[4]]
    radius = (global_norm(theta_a) + global_norm(theta_b)).item() / 2
    permutation = order.permutation(0)
    metrics = {}
    for target in (radius, None):
        move_to_(params, theta_a, theta_b, 0.5, target)
        recompute_bn_statistics(model, data.train_x, full_batches(permutation, config.batch_size))
        metrics[target] = (*train_metrics(model, params, data.train_x, data.train_y, config.loss,
                                          config.batch_size, permutation),
                           *eval_metrics(model, data.test_x, data.test_y, config.loss))
    middle = global_norm(params).item()
    assert middle < 0.99 * radius
    projected, unprojected = metrics[radius], metrics[None]  # (loss, err, gm, test loss, test err)
    assert all(close(unprojected[i], projected[i], 1e-4) for i in (0, 1, 3, 4))
    assert close(unprojected[2] * middle, projected[2] * radius, 1e-4)


def edited_copy(run, tmp_path, settings=None, head=None):
    """A copy of `run` whose settings (config.json's and its checkpoints', which must agree) or frozen last
    layer are changed."""
    copy = str(tmp_path / "other")
    shutil.copytree(run, copy)
    path = os.path.join(copy, "config.json")
    config = json.load(open(path))
    config["settings"].update(settings or {})
    json.dump(config, open(path, "w"))
    for name in os.listdir(os.path.join(copy, "checkpoints")):
        file = os.path.join(copy, "checkpoints", name)
        state = torch.load(file, weights_only=True)
        state["settings"].update(settings or {})
        if head is not None:
            state["model"]["head.weight"] = head(state["model"]["head.weight"])
        torch.save(state, file)
    return copy


@pytest.mark.parametrize("change,args,expected", [
    (None, ["--points", "1"], "--points must be at least 2"),
    (None, ["--from-b", "5"], "has no checkpoint 5"),
    (None, ["--from-a", "latest"], "--from-a must be last or a step"),
    (None, ["--bn-batches", "0"], "--bn-batches must be at least 1"),
    (None, ["--bn-batches", "99"], "more than the 8 train batches"),
    ({"settings": {"loss": "mse"}}, [], "another loss"),
    ({"settings": {"width": 8}}, [], "another width"),
    ({"settings": {"subset": 128}}, [], "another subset"),
    ({"head": lambda w: 2 * w}, [], "a different frozen layer"),
])
def test_refusals_are_one_line_and_write_nothing(runs, cli, tmp_path, monkeypatch, change, args, expected):
    monkeypatch.chdir(tmp_path)
    a, b = runs
    other = edited_copy(b, tmp_path, **change) if change else b
    code, err = cli("connect", a, other, *args)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and expected in err, err
    assert not os.path.exists("connect")


def test_missing_run_is_refused(runs, cli, tmp_path):
    code, err = cli("connect", runs[0], str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert code == 2 and "not a sphrun run" in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "out")


# --- a long measurement stops and resumes; its folder has one writer ------------------------------------
# `sphrun ARGS` that sends itself the signal sys.argv[1] as point_metrics begins its sys.argv[2]-th point.
SIGNALLED = """
import os, sys
import sphrun.connect as connect
signum, when = int(sys.argv[1]), int(sys.argv[2])
real, calls = connect.point_metrics, []
def point_metrics(*args, **kwargs):
    calls.append(1)
    if len(calls) == when:
        os.kill(os.getpid(), signum)
    return real(*args, **kwargs)
connect.point_metrics = point_metrics
from sphrun.cli import main
sys.argv = ["sphrun", *sys.argv[3:]]
main()
"""


def without_argv(path):
    record = json.load(open(path))
    del record["argv"]
    return record


def test_a_connect_stopped_by_a_signal_resumes_and_ends_with_the_uninterrupted_output(runs, segment, cli, tmp_path):
    from test_faults import sphrun_process

    a, b = runs
    out = tmp_path / "ab"
    args = ["connect", a, b, "--points", "3", "--out", out]

    # SIGTERM as the second point begins: it is given up at its first batch, the first is kept
    done = sphrun_process(str(int(signal.SIGTERM)), "2", *map(str, args), script=SIGNALLED)
    assert done.returncode == 143 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"interrupted by SIGTERM at point 2 of 3: the 1 point measured "
                                                    f"kept in {out / 'unfinished.jsonl'}; run the same command to "
                                                    f"resume")
    assert sorted(os.listdir(out)) == [".lock", "unfinished.jsonl"]  # no table, record or figure yet
    assert len((out / "unfinished.jsonl").read_text().splitlines()) == 2  # what is measured, then point 1
    code, err = cli("plot", out, "--kind", "connect")  # never taken for an output
    assert code == 2 and "no sphrun connect outputs" in err

    code, err = cli("connect", a, b, "--points", "2", "--out", out)  # other options: refused, nothing touched
    assert code == 2 and err.count("\n") == 1 and "(points 3 there, 2 here): repeat its command" in err, err
    code, err = cli(*args)
    assert code == 0 and "resuming at point 2 (1 kept in" in err, err
    assert (out / "connect.csv").read_bytes() == open(os.path.join(segment, "connect.csv"), "rb").read()
    assert without_argv(out / "config.json") == without_argv(os.path.join(segment, "config.json"))
    assert sorted(os.listdir(out)) == [".lock", "config.json", "connect.csv", "connect.png"]


def test_a_second_connect_into_one_folder_is_refused_in_one_line(runs, cli, tmp_path):
    from sphrun.rundir import RunDir

    out = tmp_path / "ab"
    with RunDir(str(out)).lock():  # another connect writes there
        code, err = cli("connect", *runs, "--points", "2", "--out", out)
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1, err
    assert "is being written by pid" in err and "give this connect another --out" in err
    assert os.listdir(out) == [".lock"]


def test_a_signal_as_the_last_point_ends_lets_the_output_be_written(runs, cli, tmp_path, monkeypatch):
    """As train's last step: every point is measured, so a scheduler's notice then costs no requeue."""
    import sphrun.connect as connect

    real = connect.write_output

    def write_output(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args)
    monkeypatch.setattr(connect, "write_output", write_output)
    code, err = cli("connect", *runs, "--points", "2", "--out", tmp_path / "ab")
    assert code == 0 and "note: SIGTERM came as the last point ended: the output is written" in err, err
    assert sorted(os.listdir(tmp_path / "ab")) == [".lock", "config.json", "connect.csv", "connect.png"]
