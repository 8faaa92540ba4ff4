"""--device checks, the announced capture failure, and a CUDA test where a GPU is present. (The CUDA
path without a GPU: tests/test_emulated_gpu.py.)"""

import pytest
import torch

from sphrun.config import TrainConfig
from sphrun.rundir import RunDir
from sphrun.train import train, train_sweep

from conftest import TINY

SHORT = dict(TINY, iters=4, eval_every=2)


def test_cuda_without_cuda_is_one_line_and_writes_nothing(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = cli("train", "--elr", "1e-3", "--iters", "2", "--dataset", "synthetic", "--device", "cuda",
                    "--out", tmp_path / "run")
    assert code == 2 and "no CUDA device" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_gpu_past_the_count_is_one_line_and_writes_nothing(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for command in (["train", "--elr", "1e-3,2e-3", "--iters", "2", "--dataset", "synthetic"],
                    ["train", "--elr", "1e-3", "--iters", "2", "--dataset", "synthetic"]):
        code, err = cli(*command, "--device", "cuda:7", "--out", tmp_path / "run")
        assert code == 2 and "cuda:0 to cuda:0" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "run").exists()


def test_a_failed_capture_says_why_and_trains_on(monkeypatch, capsys):
    from sphrun.packed import TrainingStep

    class NoGraphs:
        def __init__(self):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", NoGraphs)
    step = TrainingStep.__new__(TrainingStep)
    step.graph, step.eager_only = None, False
    step.capture()
    assert step.eager_only and step.graph is None
    err = capsys.readouterr().err
    assert "CUDA graph capture failed (RuntimeError: operation not permitted" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_steps_match_eager_steps(tmp_path, monkeypatch):
    """A few captured steps, packed and single, against the same steps without the graph."""
    cuda = dict(SHORT, device="cuda", iters=8, eval_every=4)
    graphed = train_sweep([TrainConfig(**{**cuda, "elr": e}) for e in (1e-3, 1e-2)], str(tmp_path / "graph"))
    single, _ = train(TrainConfig(**{**cuda, "elr": 1e-3}), tmp_path / "single")
    captured = []
    from sphrun.packed import TrainingStep
    real_capture = TrainingStep.capture
    monkeypatch.setattr(TrainingStep, "capture", lambda self: (real_capture(self), captured.append(self.graph)))
    train_sweep([TrainConfig(**{**cuda, "elr": e, "iters": 12}) for e in (1e-3, 1e-2)], str(tmp_path / "graph"))
    assert captured and all(g is not None for g in captured)
    monkeypatch.setattr(TrainingStep, "capture", lambda self: setattr(self, "eager_only", True))
    eager = train_sweep([TrainConfig(**{**cuda, "elr": e}) for e in (1e-3, 1e-2)], str(tmp_path / "eager"))
    for (a, _), (b, _) in zip(graphed, eager):
        rows_a, rows_b = RunDir(a).read_metrics()[:3], RunDir(b).read_metrics()
        for ra, rb in zip(rows_a, rows_b):
            assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-3)
    assert [r["iter"] for r in single.read_metrics()] == [0, 4, 8]
