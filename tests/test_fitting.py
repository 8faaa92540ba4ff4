"""A default sweep fits the device (sphrun.fitting), on the emulated GPU with a memory limit: the pass
size comes from the free memory and one model's measured footprint, and a pack that runs out of memory
at its start trains again in halves, as those halves would have trained. On the CPU nothing changes."""

import gc

import pytest
import torch

import sphrun.fitting as fitting
from sphrun.config import TrainConfig
from sphrun.train import train, train_sweep

from conftest import TINY
from test_emulated_gpu import same_history

# 4 steps: 3 eager warm-up steps and the capture, then an evaluation beside the captured step's memory
SETTINGS = dict(TINY, subset=128, device="cuda", iters=4, eval_every=4)
ELRS = (1e-4, 3e-4, 1e-3)
IMAGE = 3 * 32 * 32 * 4 + 8  # bytes: a float32 CIFAR-shaped image and its int64 label
DATA = (128 + 1000) * IMAGE  # the train subset and the synthetic set's 1,000 test images, on the device


def configs(elrs=ELRS):
    return [TrainConfig(**{**SETTINGS, "elr": e}) for e in elrs]


def one_model_pass(cuda, tmp_path):
    """What a pass of one model holds at its peak beyond the data, as the device counts it (no sizing
    involved: a single run is a pass of one)."""
    gc.collect()
    base = cuda.peak = cuda.allocated
    train(configs()[0], str(tmp_path / "single"))
    return cuda.peak - base - DATA


def test_a_default_sweep_packs_what_fits_and_halves_a_pack_that_does_not(cuda, tmp_path, capsys, monkeypatch):
    per_model = one_model_pass(cuda, tmp_path)
    gc.collect()
    # room for 2.5 models: 2 fit with the 10 % margin, 3 do not (today's one pass of 3 ran out of memory)
    cuda.total_memory = cuda.allocated + DATA + int(2.5 * per_model)
    fitted = train_sweep(configs(), str(tmp_path / "fitted"))
    err = capsys.readouterr().err
    assert "pass 1 of 2, 2 per pass: what fits" in err and "MiB per model (measured; --pack K to choose)" in err
    assert "out of device memory" not in err and [status for _, status in fitted] == ["done"] * 3

    monkeypatch.setattr(fitting, "footprint", lambda *args: 1)  # a device that holds more than measured
    halved = train_sweep(configs(), str(tmp_path / "halved"))
    notes = [line for line in capsys.readouterr().err.splitlines() if "note" in line]
    assert len(notes) == 1 and notes[0].startswith("note: 3 models packed ran out of device memory at the start "
                                                  "of their pass (CUDA out of memory. Tried to allocate")
    assert notes[0].endswith("training them 2 at a time")
    for (a, _), (b, _) in zip(fitted, halved):  # the halves trained as the passes of 2 did, bit for bit
        assert same_history(a, b)


def test_the_cpu_packs_every_model_of_a_data_seed_as_before(monkeypatch):
    monkeypatch.setattr(fitting, "footprint", lambda *args: pytest.fail("measured on the CPU"))
    assert fitting.pass_size(configs(), None, torch.device("cpu"), None) == (3, "")
    assert fitting.pass_size(configs(), None, torch.device("cpu"), 2) == (2, "")
