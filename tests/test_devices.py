"""Device placement without a GPU: the whole loop (steps, evaluation, checkpoints) run on PyTorch's
`meta` device, where any tensor left on the CPU and mixed with the data's device raises, as it would
on CUDA. Plus --device checks, the announced capture failure, and a CUDA test where a GPU is present."""

import pytest
import torch

import sphrun.lifecycle as lifecycle
from sphrun.config import TrainConfig
from sphrun.rundir import RunDir
from sphrun.train import train, train_sweep

from conftest import TINY

SHORT = dict(TINY, iters=4, eval_every=2)
REAL_TOLIST, REAL_ITEM = torch.Tensor.tolist, torch.Tensor.item


@pytest.fixture
def on_meta(monkeypatch):
    """Train on the meta device: shapes and devices are checked, values are not computed. Reads of the
    device (the loop's few host syncs) give ones: finite losses, norms, live models."""
    monkeypatch.setattr(lifecycle, "use_device", lambda name: torch.device("meta"))

    def as_ones(real):
        return lambda t: real(torch.ones(t.shape, dtype=t.dtype)) if t.is_meta else real(t)

    monkeypatch.setattr(torch.Tensor, "tolist", as_ones(REAL_TOLIST))
    monkeypatch.setattr(torch.Tensor, "item", as_ones(REAL_ITEM))


def meta_checkpoint(run):
    return torch.load(RunDir(run).checkpoint_path("last"), map_location="meta", weights_only=True)


@pytest.mark.parametrize("variant", [{}, {"step": "random"}, {"geodesic": True}, {"step": "ascent"}])
def test_a_packed_sweep_runs_on_another_device(tmp_path, on_meta, variant):
    configs = [TrainConfig(**{**SHORT, **variant, "elr": elr}) for elr in (1e-3, 1e-2)]
    results = train_sweep(configs, str(tmp_path))
    assert [status for _, status in results] == ["done", "done"]
    for run, _ in results:
        assert [r["iter"] for r in RunDir(run).read_metrics()] == [0, 2, 4]
        state = meta_checkpoint(run)
        assert state["iter"] == 4 and state["model"]["features.0.weight"].shape == (4, 3, 3, 3)


@pytest.mark.parametrize("settings", [
    dict(),  # the ConvNet on the sphere: a pack of one
    dict(precision="fp32", step="random"),
    dict(model="vgg16bn", width=2),  # any other model: a pack of one through functional_call
    dict(model="resnet18", width=2),
    dict(sphere=False, elr=0.05, momentum=0.9, wd=1e-3),  # off the sphere, momentum buffers on the device
])
def test_single_runs_of_every_kind_run_on_another_device(tmp_path, on_meta, settings):
    run, status = train(TrainConfig(**{**SHORT, "elr": 1e-3, **settings}), tmp_path / "run")
    assert status == "done" and [r["iter"] for r in run.read_metrics()] == [0, 2, 4]
    state = meta_checkpoint(run)
    if settings.get("sphere") is False:
        assert len(state["momentum"]) == len([k for k in state["model"] if "running" not in k
                                              and "num_batches" not in k])


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
    from sphrun.packed import Step

    class NoGraphs:
        def __init__(self):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", NoGraphs)
    step = Step.__new__(Step)
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
    from sphrun.packed import Step
    real_capture = Step.capture
    monkeypatch.setattr(Step, "capture", lambda self: (real_capture(self), captured.append(self.graph)))
    train_sweep([TrainConfig(**{**cuda, "elr": e, "iters": 12}) for e in (1e-3, 1e-2)], str(tmp_path / "graph"))
    assert captured and all(g is not None for g in captured)
    monkeypatch.setattr(Step, "capture", lambda self: setattr(self, "eager_only", True))
    eager = train_sweep([TrainConfig(**{**cuda, "elr": e}) for e in (1e-3, 1e-2)], str(tmp_path / "eager"))
    for (a, _), (b, _) in zip(graphed, eager):
        rows_a, rows_b = RunDir(a).read_metrics()[:3], RunDir(b).read_metrics()
        for ra, rb in zip(rows_a, rows_b):
            assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-3)
    assert [r["iter"] for r in single.read_metrics()] == [0, 4, 8]


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_curvature_runs_on_another_device(tmp_path, tiny, monkeypatch):
    """(connect is left out: BatchNorm's cumulative average, which it recomputes with, reads a count
    from the device, which the meta device cannot give.)"""
    from sphrun.curvature import run_curvature

    run, _ = train(tiny(iters=4, eval_every=4), tmp_path / "a")  # on the CPU: real checkpoints to read
    monkeypatch.setattr(lifecycle, "use_device", lambda name: torch.device("meta"))
    for name, real in (("tolist", REAL_TOLIST), ("item", REAL_ITEM)):
        monkeypatch.setattr(torch.Tensor, name, lambda t, real=real: real(torch.ones(t.shape, dtype=t.dtype))
                            if t.is_meta else real(t))
    run_curvature(run.path, "last", "gm,fisher-trace,hessian-trace,hessian-eig", probes=1, lanczos=2, batches=2)
    assert open(tmp_path / "a" / "curvature.csv").read().splitlines()[0].startswith("iter,gm")
