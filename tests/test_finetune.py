"""`sphrun finetune`: a child continues its parent's lineage exactly; bad input leaves nothing behind."""

import os

import pytest
import torch

from conftest import TINY
from sphrun.config import TrainConfig
from sphrun.rundir import RunDir
from sphrun.lifecycle import restore
from sphrun.train import train


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A tiny run of 24 steps with checkpoints at 0, 8, 16 and 24."""
    torch.set_num_threads(1)
    path = str(tmp_path_factory.mktemp("lineage") / "parent")
    train(TrainConfig(**TINY, elr=1e-3, iters=24, eval_every=8), path)
    return path


def without_wall_time(rows):
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in rows]


def assert_same_state(run_a, run_b, which):
    a, b = RunDir(run_a).load_checkpoint(which), RunDir(run_b).load_checkpoint(which)
    assert a["iter"] == b["iter"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:  # weights and BatchNorm running statistics, bit for bit
        assert torch.equal(a["model"][name], b["model"][name]), name
    for x, y in zip(a["theta_prev"] + a["theta_init"], b["theta_prev"] + b["theta_init"]):
        assert torch.equal(x, y)
    assert torch.equal(a["proj_err_sum"], b["proj_err_sum"])


def test_finetune_at_the_parents_elr_reproduces_the_parent(parent, cli):
    args = ["finetune", parent, "--elr", "1e-3", "--from", "8", "--eval-every", "8", "--device", "cpu"]
    code, err = cli(*args, "--iters", "8")
    assert code == 0, err
    code, err = cli(*args, "--iters", "16")  # the same command, longer: extends the child
    assert code == 0, err
    assert "resuming" in err
    child = f"{parent}-ft-elr0.001-from8-every8"
    rows = RunDir(child).read_metrics()
    assert [r["iter"] for r in rows] == [8, 16, 24]
    theirs = [r for r in RunDir(parent).read_metrics() if r["iter"] >= 8]
    assert without_wall_time(rows) == without_wall_time(theirs)
    for which in (16, 24, "last"):
        assert_same_state(child, parent, which)
    record = RunDir(child).read_config()
    assert record["parent"] == {"run": parent, "iter": 8}
    assert record["command"] == "finetune" and record["status"] == "done"
    _, config, *_ = restore(child, which=16)  # other commands read a child like any run
    assert (config.origin, config.elr_from, config.transition) == (8, 1e-3, 0)


def test_random_geodesic_lineage_survives_resume_and_finetune(tmp_path, cli):
    # random directions are drawn from (seed, step) alone, so no random state crosses the boundary
    settings = dict(**TINY, elr=2e-2, step="random", geodesic=True, eval_every=4)
    parent = str(tmp_path / "walk")
    train(TrainConfig(**settings, iters=8), parent)
    code, err = cli("finetune", parent, "--elr", "2e-2", "--iters", "8", "--step", "random", "--geodesic",
                    "--eval-every", "4", "--device", "cpu")  # --from last: step 8
    assert code == 0, err
    train(TrainConfig(**settings, iters=16), parent)  # resumes the parent to step 16
    child = f"{parent}-ft-elr0.02-from8-random-geo-every4"
    assert_same_state(child, parent, "last")
    rows = RunDir(child).read_metrics()
    assert without_wall_time(rows) == without_wall_time(RunDir(parent).read_metrics()[2:])
    rho0 = RunDir(parent).read_config()["rho0"]
    assert all(r["proj_err"] == 0 and r["si_norm"] == pytest.approx(rho0, rel=1e-6) for r in rows)


def test_transition_moves_the_elr_linearly_then_holds(parent, cli):
    code, err = cli("finetune", parent, "--elr", "1e-4", "--from", "8", "--transition", "4", "--iters", "5",
                    "--eval-every", "1", "--device", "cpu")
    assert code == 0, err
    rows = RunDir(f"{parent}-ft-elr0.0001-from8-D4-every1").read_metrics()
    assert [r["iter"] for r in rows] == [8, 9, 10, 11, 12, 13]
    # the row at step s shows the ELR of the step that led to it: the k-th transition step uses
    # 1e-3 + (1e-4 - 1e-3) * k / 4
    expected = [1e-3, 7.75e-4, 5.5e-4, 3.25e-4, 1e-4, 1e-4]
    assert [r["elr"] for r in rows] == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("args, says", [
    (["--elr", "1e-3", "--iters", "8", "--from", "5"], "no checkpoint 5 (checkpoints at steps: 0, 8, 16, 24)"),
    (["--elr", "1e-3", "--iters", "8", "--from", "first"], "--from must be last or a step number"),
    (["--elr", "1e-3", "--iters", "8", "--transition", "-1"], "--transition must be at least 0"),
    (["--elr", "0", "--iters", "8"], "--elr must be a positive"),
    (["--elr", "-1e-3", "--iters", "8"], "--elr must be a positive"),
    (["--elr", "1e-3", "--iters", "8", "--epochs", "1"], "not both"),
    (["--elr", "1e-3", "--iters", "8", "--step", "sideways"], "unknown step 'sideways'"),
])
def test_bad_input_is_one_line_and_leaves_nothing(parent, cli, args, says):
    folder = os.path.dirname(parent)
    before = sorted(os.listdir(folder))
    code, err = cli("finetune", parent, *args, "--device", "cpu")
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and says in err, err
    assert sorted(os.listdir(folder)) == before


def test_unknown_run(tmp_path, cli):
    code, err = cli("finetune", tmp_path / "nowhere", "--elr", "1e-3", "--iters", "8")
    assert code == 2 and err.count("\n") == 1 and "is not a sphrun run" in err, err
    assert os.listdir(tmp_path) == []


def test_locked_run_names_its_holder(parent, cli):
    folder = os.path.dirname(parent)
    before = sorted(os.listdir(folder))
    with RunDir(parent).lock():
        code, err = cli("finetune", parent, "--elr", "1e-4", "--iters", "8", "--device", "cpu")
    assert code == 2 and err.count("\n") == 1, err
    assert f"is being written by pid {os.getpid()}" in err
    assert sorted(os.listdir(folder)) == before
