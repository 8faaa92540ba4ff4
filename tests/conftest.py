import os
import sys

import pytest
import torch

from sphrun.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_SUBSET = os.path.join(REPO, "..", "shared", "data", "cifar10-10pct")

# A run small enough for a test: 256 synthetic images, width 4, 8 steps per epoch.
TINY = dict(dataset="synthetic", subset=256, width=4, batch_size=32, device="cpu")


@pytest.fixture(autouse=True)
def one_thread():
    # bit-identical comparisons and fair sharing of the CI's two cores
    torch.set_num_threads(1)


@pytest.fixture
def tiny():
    def make(**overrides):
        return TrainConfig(**{"elr": 1e-3, "iters": 24, "eval_every": 8, **TINY, **overrides})
    return make


@pytest.fixture
def shared_subset():
    if not os.path.isdir(SHARED_SUBSET):
        pytest.skip("the shared CIFAR-10 subset (../shared/data/cifar10-10pct) is not beside the checkout")
    return SHARED_SUBSET


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run `sphrun ARGS` in this process; returns (exit code, stderr)."""
    from sphrun.cli import main

    def run(*args):
        capsys.readouterr()  # drop what came before, so the caller sees this command's output alone
        monkeypatch.setattr(sys, "argv", ["sphrun", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code or 0
        return code, capsys.readouterr().err
    return run


@pytest.fixture
def cuda(monkeypatch):
    """One emulated CUDA device (tests/emulated_cuda.py): sphrun takes its CUDA path on the CPU, CUDA
    graphs replay recorded aten calls; yields the Emulator (its counts, graphs and injected faults)."""
    from emulated_cuda import emulated_cuda

    with emulated_cuda(monkeypatch) as emulator:
        yield emulator
