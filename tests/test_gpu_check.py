"""benchmarks/gpu_check.py on the emulated GPU (tests/emulated_cuda.py): its checks pass on a sound
sphrun, and a diverged pack, a stale learning rate or a stale batch in the captured step, and the plane's
packed points rescaled jointly each make it print FAIL, so its PASS can be trusted on a GPU."""

import os
import sys

import pytest

from conftest import REPO
from sphrun import connect
from sphrun.packed import Step
from test_emulated_gpu import rebinding_batch, rebinding_rate

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import gpu_check  # noqa: E402

sys.path.pop(0)


@pytest.fixture(autouse=True)
def tiny_runs(monkeypatch):
    """The checks' runs, smaller (256 images, width 4, 12 steps): the harness is under test here, and its
    tolerances hold at these sizes too."""
    monkeypatch.setattr(gpu_check, "SMALL", ["--dataset", "synthetic", "--subset", "256", "--width", "4",
                                             "--batch-size", "32"])
    monkeypatch.setattr(gpu_check, "SHORT", ["--iters", "12", "--eval-every", "6"])


def lines(capsys, names, root):
    failures = gpu_check.run_checks("cuda", names, root=str(root))
    return failures, capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("name", ["train single, --device auto", "transition past the capture",
                                  "a member diverging after capture", "connect, curvature fp32",
                                  "plane, hessian-density fp32"])
def test_a_sound_sphrun_passes(cuda, capsys, tmp_path, name):
    failures, [line] = lines(capsys, [name], tmp_path)
    assert failures == 0 and line.endswith("PASS"), line
    assert name.startswith(("connect", "plane")) or cuda.graphs and all(g.replays for g in cuda.graphs)


def test_a_diverged_pack_fails(cuda, capsys, tmp_path, monkeypatch):
    real_forward = gpu_check.PackedConvNet.forward
    monkeypatch.setattr(gpu_check.PackedConvNet, "forward", lambda self, x: real_forward(self, x) * float("nan"))
    failures, [line] = lines(capsys, ["train packed"], tmp_path)
    assert failures == 1 and "FAIL" in line and "ended diverged, diverged, diverged, expected done" in line


@pytest.mark.parametrize("bug,name", [(rebinding_rate, "transition past the capture"),
                                      (rebinding_batch, "train single, --device auto")], ids=["rate", "batch"])
def test_a_graph_replaying_a_stale_input_fails(cuda, capsys, tmp_path, monkeypatch, bug, name):
    monkeypatch.setattr(Step, "take", bug)
    failures, [line] = lines(capsys, [name], tmp_path)
    assert failures == 1 and "FAIL" in line and "graph against eager" in line, line


def test_packed_plane_points_rescaled_jointly_fail(cuda, capsys, tmp_path, monkeypatch):
    """The plane's points packed on the GPU but rescaled by their joint norm, not each by its own: every
    point's radius, hence its GM, is off."""
    real_project = connect.project_
    monkeypatch.setattr(connect, "project_", lambda params, rho, members=False: real_project(params, rho))
    failures, [line] = lines(capsys, ["plane, hessian-density fp32"], tmp_path)
    assert failures == 1 and "FAIL" in line and "plane at u" in line and "gm " in line, line


def test_every_check_has_a_line_and_the_script_exits_1_on_failure(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "CHECKS", {"fine": lambda c: None, "broken": lambda c: c.problems.append("x")})
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--skip-throughput"])
    with pytest.raises(SystemExit) as stop:
        gpu_check.main()
    out = capsys.readouterr().out.splitlines()
    assert stop.value.code == 1 and out[1].endswith("PASS") and out[2].endswith("FAIL  x")
    assert out[-1] == "1 of 2 checks failed"
