"""`sphrun train` end to end: determinism, resume, extension, divergence, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sphrun.rundir import METRICS_COLUMNS, RunDir
from sphrun.train import evaluation_steps, train

TINY_ARGS = ["--dataset", "synthetic", "--subset", "256", "--width", "4", "--batch-size", "32",
             "--device", "cpu"]


def rows_without_wall_time(path):
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in RunDir(path).read_metrics()]


def final_state(path):
    return RunDir(path).load_checkpoint("last")["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_seeds_give_identical_metrics(tmp_path, tiny):
    for name in ("a", "b"):
        train(tiny(), tmp_path / name)
    rows = rows_without_wall_time(tmp_path / "a")
    assert [r["iter"] for r in rows] == [0, 8, 16, 24]
    assert rows == rows_without_wall_time(tmp_path / "b")
    header = open(tmp_path / "a" / "metrics.csv").readline().strip().split(",")
    assert header == list(METRICS_COLUMNS)
    config = json.load(open(tmp_path / "a" / "config.json"))
    assert config["status"] == "done" and config["settings"]["elr"] == 1e-3
    assert sorted(RunDir(tmp_path / "a").checkpoint_iters()) == [0, 8, 16, 24]


def test_evaluation_does_not_change_training(tmp_path, tiny):
    train(tiny(eval_every=3), tmp_path / "dense")
    train(tiny(eval_every=24), tmp_path / "sparse")
    assert_same_weights(final_state(tmp_path / "dense"), final_state(tmp_path / "sparse"))


def test_extending_a_finished_run_is_bit_identical(tmp_path, tiny):
    train(tiny(iters=16), tmp_path / "extended")
    train(tiny(iters=24), tmp_path / "extended")
    train(tiny(iters=24), tmp_path / "straight")
    assert_same_weights(final_state(tmp_path / "extended"), final_state(tmp_path / "straight"))
    assert rows_without_wall_time(tmp_path / "extended") == rows_without_wall_time(tmp_path / "straight")


def test_ctrl_c_saves_and_the_rerun_is_bit_identical(tmp_path):
    args = [sys.executable, "-m", "sphrun", "train", "--elr", "1e-3", "--iters", "160", "--eval-every", "40",
            *TINY_ARGS, "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(args, stderr=subprocess.PIPE, env=env)
    metrics = tmp_path / "run" / "metrics.csv"
    deadline = time.time() + 120
    while (not metrics.exists() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err.decode()
    run = RunDir(tmp_path / "run")
    assert run.read_config()["status"] == "interrupted"
    stopped_at = run.load_checkpoint("last")["iter"]
    assert 40 <= stopped_at < 160
    assert subprocess.run(args, env=env, capture_output=True).returncode == 0
    assert run.read_config()["status"] == "done"
    straight = [*args[:-1], str(tmp_path / "straight")]
    assert subprocess.run(straight, env=env, capture_output=True).returncode == 0
    assert_same_weights(final_state(tmp_path / "run"), final_state(tmp_path / "straight"))
    assert rows_without_wall_time(tmp_path / "run") == rows_without_wall_time(tmp_path / "straight")


def test_divergence_ends_cleanly(tmp_path, cli):
    # a step this long overflows float32: the weights turn non-finite on the first step
    code, err = cli("train", "--elr", "1e300", "--iters", "16", "--eval-every", "8", *TINY_ARGS,
                    "--out", tmp_path / "run")
    assert code == 0 and "diverged" in err
    run = RunDir(tmp_path / "run")
    assert run.read_config()["status"] == "diverged"
    assert [r["iter"] for r in run.read_metrics()] == [0]


def test_log_spaced_evaluation_points():
    steps = evaluation_steps(0, 1000 * 39, 39)
    assert steps[:12] == [39 * e for e in range(12) if e <= 10] + [39 * 13]
    assert steps[-1] == 39_000 and len(steps) < 60
    assert evaluation_steps(0, 30, 39) == [0, 30]  # a run shorter than an epoch: start and end
    assert evaluation_steps(100, 130, 4, eval_every=10) == [100, 110, 120, 130]


@pytest.mark.parametrize("args, complaint", [
    (["--elr", "0"], "--elr must be a positive"),
    (["--elr", "-1e-3"], "--elr must be a positive"),
    (["--elr", "nan"], "--elr must be a positive"),
    (["--elr", "inf"], "--elr must be a positive"),
    (["--elr", "fast"], "--elr must be a number"),
    (["--elr", "1e-3", "--loss", "hinge"], "unknown loss"),
    (["--elr", "1e-3", "--dataset", "mnist"], "unknown dataset"),
    (["--elr", "1e-3", "--subset", "0"], "--subset"),
    (["--elr", "1e-3", "--subset", "1.5"], "--subset"),
    (["--elr", "1e-3", "--subset", "99999"], "larger than the train set"),
    (["--elr", "1e-3", "--width", "0"], "--width"),
    (["--elr", "1e-3", "--epochs", "2", "--iters", "5"], "not both"),
])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, monkeypatch, cli, args, complaint):
    monkeypatch.chdir(tmp_path)
    # the tiny settings, less the options the case sets itself
    base = [x for option, value in zip(TINY_ARGS[::2], TINY_ARGS[1::2]) if option not in args
            for x in (option, value)]
    code, err = cli("train", *args, *base, "--iters", "8")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and complaint in lines[0], err
    assert os.listdir(tmp_path) == []


def test_unreadable_or_foreign_data_folder(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a folder")
    code, err = cli("train", "--elr", "1e-3", "--data-dir", "afile", "--iters", "8")
    assert code == 2 and "not a folder" in err
    for split in ("train", "test"):
        (tmp_path / "foreign" / split / "x").mkdir(parents=True)
        (tmp_path / "foreign" / split / "x" / "img.png").write_text("no image")
    code, err = cli("train", "--elr", "1e-3", "--data-dir", "foreign", "--iters", "8")
    assert code == 2 and "class folders" in err
    assert sorted(os.listdir(tmp_path)) == ["afile", "foreign"]


def test_run_directory_of_another_configuration_is_refused(tmp_path, tiny, cli):
    train(tiny(), tmp_path / "run")
    before = (tmp_path / "run" / "config.json").read_text()
    code, err = cli("train", "--elr", "2e-3", "--iters", "24", "--eval-every", "8", *TINY_ARGS,
                    "--out", tmp_path / "run")
    assert code == 2 and "another configuration" in err and "elr" in err
    assert (tmp_path / "run" / "config.json").read_text() == before


def test_default_run_name_comes_from_the_settings(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    code, _ = cli("train", "--elr", "1e-3", "--iters", "8", "--eval-every", "8", *TINY_ARGS)
    assert code == 0
    [name] = os.listdir(tmp_path / "runs")
    # the readable settings, then a digest of the other non-default ones (batch size, eval spacing)
    assert name.startswith("synthetic-sub256-convnet4-ce-elr0.001-s0-")
    code, err = cli("train", "--elr", "1e-3", "--iters", "8", "--eval-every", "8", *TINY_ARGS)
    assert code == 0 and "complete" in err  # the same command again finds the run finished
