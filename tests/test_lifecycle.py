"""A run's life: crashes at any moment leave a directory the same command resumes or restarts, and a
run's identity includes its data."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

import sphrun.train as training
from sphrun.config import TrainConfig
from sphrun.rundir import RunDir
from sphrun.train import train, train_sweep
from test_data import write_torchvision_cifar
from test_train import TINY_ARGS, assert_same_weights, final_state, rows_without_wall_time

from conftest import TINY

SHORT = dict(TINY, iters=16, eval_every=8)


class Crash(Exception):
    pass


def crash_on_call(monkeypatch, target, name, when=1):
    """Make target.name raise Crash on its `when`-th call (as a bug or a dying machine would)."""
    real, calls = getattr(target, name), []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == when:
            raise Crash(name)
        return real(*args, **kwargs)
    monkeypatch.setattr(target, name, crashing)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    torch.set_num_threads(1)  # as the tests (conftest's one_thread), so the runs agree to the bit
    folder = tmp_path_factory.mktemp("straight")
    train(TrainConfig(**{**SHORT, "elr": 1e-3}), folder / "single")
    train_sweep([TrainConfig(**{**SHORT, "elr": e}) for e in (1e-3, 1e-2)], str(folder / "sweep"))
    return folder


@pytest.mark.parametrize("where, when", [
    ("record", 1),  # a crash in the first evaluation: config.json written, no row, no checkpoint
    ("save_checkpoint", 1),  # the first row written, its checkpoint not
    ("save_checkpoint", 2),  # after the first checkpoint: an ordinary resume
])
def test_a_crashed_run_is_resumed_or_restarted_by_the_same_command(tmp_path, monkeypatch, straight, where,
                                                                    when):
    target = training if where == "record" else RunDir
    config = TrainConfig(**{**SHORT, "elr": 1e-3})
    with monkeypatch.context() as patch:
        crash_on_call(patch, target, where, when)
        with pytest.raises(Crash):
            train(config, tmp_path / "run")
    assert os.path.isfile(tmp_path / "run" / "config.json")
    run, status = train(config, tmp_path / "run")
    assert status == "done"
    assert rows_without_wall_time(run.path) == rows_without_wall_time(straight / "single")
    assert_same_weights(final_state(run.path), final_state(straight / "single"))


def test_a_crashed_sweep_is_resumed_or_restarted_by_the_same_command(tmp_path, monkeypatch, straight):
    configs = [TrainConfig(**{**SHORT, "elr": e}) for e in (1e-3, 1e-2)]
    with monkeypatch.context() as patch:
        crash_on_call(patch, RunDir, "save_checkpoint", when=2)  # the first member saved, the second not
        with pytest.raises(Crash):
            train_sweep(configs, str(tmp_path))
    assert [status for _, status in train_sweep(configs, str(tmp_path))] == ["done", "done"]
    for name in os.listdir(straight / "sweep"):
        assert rows_without_wall_time(tmp_path / name) == rows_without_wall_time(straight / "sweep" / name)
        assert_same_weights(final_state(tmp_path / name), final_state(straight / "sweep" / name))


def test_kill_9_at_its_first_second_leaves_a_run_the_same_command_finishes(tmp_path, straight):
    args = [sys.executable, "-m", "sphrun", "train", "--elr", "1e-3", "--iters", "16", "--eval-every", "8",
            *TINY_ARGS, "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(args, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 60
    while not (tmp_path / "run" / "config.json").exists() and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)  # as soon as the run directory exists, before or after a checkpoint
    process.wait()
    finished = subprocess.run(args, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert rows_without_wall_time(tmp_path / "run") == rows_without_wall_time(straight / "single")


def small_cifar(root, per_split, touch=False):
    """A torchvision-format CIFAR-10 folder; touch: one pixel of one train image changed."""
    write_torchvision_cifar(root, "cifar10", per_split)
    if touch:
        path = os.path.join(root, "cifar-10-batches-py", "data_batch_1")
        with open(path, "rb") as f:
            batch = pickle.load(f)
        batch["data"][0, 0] ^= 1
        with open(path, "wb") as f:
            pickle.dump(batch, f)
    return str(root)


@pytest.mark.parametrize("other", ["bigger", "touched"])
def test_resuming_or_extending_on_other_data_is_refused(tmp_path, cli, other):
    small = small_cifar(tmp_path / "small", 40)
    changed = small_cifar(tmp_path / "other", 80) if other == "bigger" else \
        small_cifar(tmp_path / "other", 40, touch=True)
    common = ["--elr", "1e-3", "--dataset", "cifar10", "--width", "4", "--batch-size", "32", "--device", "cpu",
              "--eval-every", "4", "--out", tmp_path / "run"]
    code, err = cli("train", *common, "--iters", "4", "--data-dir", small)
    assert code == 0, err
    before = (tmp_path / "run" / "metrics.csv").read_text()
    code, err = cli("train", *common, "--iters", "8", "--data-dir", changed)
    assert code == 2 and "other data" in err and len(err.strip().splitlines()) == 1
    what = "train size 200 there, 400 here" if other == "bigger" else "the same sizes but other images"
    assert what in err
    assert (tmp_path / "run" / "metrics.csv").read_text() == before
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["train_size"] == 200
    # the same data under another folder name is the same data: extending goes on
    os.rename(small, tmp_path / "moved")
    code, err = cli("train", *common, "--iters", "8", "--data-dir", tmp_path / "moved")
    assert code == 0, err
    # a fine-tune on other data goes on, and says so
    code, err = cli("finetune", tmp_path / "run", "--elr", "2e-3", "--iters", "4", "--data-dir", changed,
                    "--device", "cpu", "--out", tmp_path / "child")
    assert code == 0 and "other data" in err


def test_a_run_is_never_written_inside_another_run_or_over_a_folder_of_runs(tmp_path, cli):
    tiny = [*TINY_ARGS, "--iters", "2", "--eval-every", "2"]
    assert cli("train", "--elr", "1e-3,2e-3", *tiny, "--out", tmp_path / "sweep")[0] == 0
    run = tmp_path / "sweep" / os.listdir(tmp_path / "sweep")[0]
    for out, says in ((run / "nested", "is a run directory"), (tmp_path / "sweep", "is a folder of runs")):
        code, err = cli("train", "--elr", "5e-3", *tiny, "--out", out)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1
    code, err = cli("finetune", run, "--elr", "5e-3", "--iters", "2", "--device", "cpu", "--out", run / "ft")
    assert code == 2 and "is a run directory" in err
    assert sorted(os.listdir(run)) == sorted(os.listdir(tmp_path / "sweep" / os.listdir(tmp_path / "sweep")[1]))
