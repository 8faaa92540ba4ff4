"""Options that must never fall back to a default: zero counts and empty folder names are refused."""

import os

import pytest

TINY = ["--dataset", "synthetic", "--subset", "256", "--width", "4", "--batch-size", "32", "--device", "cpu"]
TINY_ARGS = [*TINY, "--elr", "1e-3"]


def assert_refused(code, err, expected):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


@pytest.mark.parametrize("args, expected", [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--iters", "0"], "--iters must be at least 1, got 0"),
    (["--iters", "8", "--eval-every", "0"], "--eval-every must be at least 1, got 0"),
    (["--iters", "8", "--keep", "0"], "--keep must be at least 1, got 0"),
    (["--iters", "8", "--width", "0"], "--width must be at least 1, got 0"),
    (["--iters", "8", "--data-dir", ""], "--data-dir is empty"),
])
def test_train_refuses_zero_and_empty_values(cli, tmp_path, args, expected):
    code, err = cli("train", *TINY_ARGS, *args, "--out", tmp_path / "run")
    assert_refused(code, err, expected)
    assert not os.path.exists(tmp_path / "run")


def test_train_refuses_an_empty_out(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = cli("train", *TINY_ARGS, "--iters", "8", "--out", "")
    assert_refused(code, err, "--out is empty")
    assert os.listdir(tmp_path) == []


def test_a_sweep_refuses_zero_models_per_pass(cli, tmp_path):
    code, err = cli("train", *TINY, "--elr", "1e-3,1e-2", "--iters", "8", "--pack", "0", "--out", tmp_path / "sweep")
    assert_refused(code, err, "--pack must be at least 1, got 0")


@pytest.mark.parametrize("option", ["--batches", "--probes", "--lanczos"])
def test_curvature_refuses_zero_counts(cli, tmp_path, option):
    code, err = cli("curvature", tmp_path / "nowhere", option, "0")
    assert_refused(code, err, f"{option} must be at least 1, got 0")


def test_connect_and_finetune_refuse_zero_counts(cli, tmp_path):
    code, err = cli("connect", tmp_path / "a", tmp_path / "b", "--bn-batches", "0")
    assert_refused(code, err, "--bn-batches must be at least 1, got 0")
    code, err = cli("finetune", tmp_path / "a", "--elr", "1e-3", "--iters", "8", "--data-dir", "")
    assert_refused(code, err, "--data-dir is empty")
