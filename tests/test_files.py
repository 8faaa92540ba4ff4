"""Files of a run directory: damaged metrics.csv, permissions under the umask, runs inside runs."""

import os
import shutil
import stat

import pytest
import torch

from conftest import TINY
from sphrun import SphrunError
from sphrun.config import TrainConfig
from sphrun.files import atomic_write
from sphrun.rundir import RunDir, check_run_location
from sphrun.train import train

TINY_ARGS = ["--dataset", "synthetic", "--subset", "256", "--width", "4", "--batch-size", "32",
             "--device", "cpu", "--elr", "1e-3", "--eval-every", "8"]
UMASK = 0o027  # group may read, others nothing: neither the default 022 nor mkstemp's 077

DAMAGE = {
    "empty": b"",
    "random bytes": bytes(range(256)) * 4,
    "foreign header": b"step,loss,accuracy\n0,2.3,0.1\n8,1.2,0.5\n",
    "header only": b"iter,epoch,elr,train_loss,train_err,test_loss,test_err,gm,si_norm,cos_prev,cos_init,"
                   b"proj_err,wall_s\n",
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny run of 24 steps (checkpoints at 0, 8, 16, 24), trained under UMASK."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("made") / "run"
    before = os.umask(UMASK)
    try:
        train(TrainConfig(**TINY, elr=1e-3, iters=24, eval_every=8), str(path))
    finally:
        os.umask(before)
    return path


@pytest.fixture
def run(made, tmp_path):
    """A fresh copy of the made run, to damage."""
    return str(shutil.copytree(made, tmp_path / "run"))


def snapshot(path):
    """Every file below `path` and its bytes (the lock file aside), to show nothing was overwritten."""
    files = {}
    for folder, _, names in os.walk(path):
        for name in names:
            if name != ".lock":
                with open(os.path.join(folder, name), "rb") as f:
                    files[os.path.relpath(os.path.join(folder, name), path)] = f.read()
    return files


def assert_one_line_naming(code, err, path):
    """Exit 2 and one error line, the last, naming the file and what to do (a progress line such as
    'resuming RUN' may come before it)."""
    assert code == 2, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in err, err
    assert path in errors[0] and "restore it" in errors[0]


@pytest.mark.parametrize("damage", DAMAGE)
def test_extending_a_run_with_damaged_metrics_refuses_and_keeps_everything(run, cli, damage):
    metrics = os.path.join(run, "metrics.csv")
    with open(metrics, "wb") as f:
        f.write(DAMAGE[damage])
    before = snapshot(run)
    code, err = cli("train", *TINY_ARGS, "--iters", "32", "--out", run)
    assert_one_line_naming(code, err, metrics)
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["random bytes", "foreign header"])
def test_finetune_and_plot_name_a_damaged_metrics_file(run, cli, tmp_path, damage):
    metrics = os.path.join(run, "metrics.csv")
    with open(metrics, "wb") as f:
        f.write(DAMAGE[damage])
    before = snapshot(run)
    code, err = cli("finetune", run, "--elr", "1e-4", "--iters", "8", "--device", "cpu",
                    "--out", tmp_path / "child")
    assert_one_line_naming(code, err, metrics)
    code, err = cli("plot", run, "--kind", "metrics", "--out", tmp_path / "metrics.png")
    assert_one_line_naming(code, err, metrics)
    assert snapshot(run) == before
    assert not os.path.exists(tmp_path / "metrics.png")


def test_a_row_cut_by_a_kill_is_dropped_on_resume(run, cli):
    metrics = os.path.join(run, "metrics.csv")
    rows = RunDir(run).read_metrics()
    with open(metrics, "a") as f:
        f.write("32,4,0.001,0.12")  # the start of a row, no newline: the writer died mid-row
    assert RunDir(run).read_metrics() == rows
    code, err = cli("train", *TINY_ARGS, "--iters", "32", "--out", run)
    assert code == 0, err
    assert [r["iter"] for r in RunDir(run).read_metrics()] == [0, 8, 16, 24, 32]


def test_a_malformed_row_is_named_by_its_line(run):
    metrics = os.path.join(run, "metrics.csv")
    with open(metrics) as f:
        lines = f.readlines()
    lines[2] = lines[2].replace(",", ",x", 1)
    with open(metrics, "w") as f:
        f.writelines(lines)
    with pytest.raises(SphrunError, match="malformed row at line 3"):
        RunDir(run).read_metrics()


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_every_file_of_a_run_follows_the_umask(made):
    expected = 0o666 & ~UMASK
    files = ["config.json", "metrics.csv", "checkpoints/last.pt", "checkpoints/iter-0000024.pt"]
    assert {name: mode(os.path.join(made, name)) for name in files} == {name: expected for name in files}


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, umask):
    before = os.umask(umask)
    try:
        atomic_write(tmp_path / "figure.png", lambda f: f.write(b"pixels"))
    finally:
        os.umask(before)
    assert mode(tmp_path / "figure.png") == 0o666 & ~umask
    assert os.listdir(tmp_path) == ["figure.png"]


def test_a_run_may_not_go_inside_another_run(made):
    check_run_location(made)  # the run itself: resumed or extended
    check_run_location(os.path.join(os.path.dirname(made), "beside"))
    for inside in ("child", "a/b", "checkpoints"):
        with pytest.raises(SphrunError, match=f"{made} is a run directory"):
            check_run_location(os.path.join(made, inside))


def test_a_folder_of_runs_is_no_run_directory(made, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(made, sweep / "one")
    check_run_location(sweep / "two")  # a new run in the folder
    check_run_location(sweep / "one")
    with pytest.raises(SphrunError, match="holds run directories"):
        check_run_location(sweep)
    (tmp_path / "plain").mkdir()
    check_run_location(tmp_path / "plain")  # an existing empty folder may become a run
    (tmp_path / "file").write_text("")
    with pytest.raises(SphrunError, match="not a folder"):
        check_run_location(tmp_path / "file")
