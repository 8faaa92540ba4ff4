"""benchmarks/gpu_check.py on the emulated GPU (tests/emulated_cuda.py): its checks pass on a sound
sphrun, each alone, and a diverged pack, a stale learning rate or a stale batch in the captured step,
and the plane's packed points rescaled jointly each make it print FAIL, so its PASS can be trusted on a
GPU. The harness itself: every check can be named with --only, a child process imports the sphrun the
parent did, and --budget runs the telling checks first and lists what it skipped."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO
from sphrun import connect
from sphrun.packed import TrainingStep
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


@pytest.mark.parametrize("name", ["train single --device auto", "transition past the capture",
                                  "a member diverging after capture", "connect and curvature fp32",
                                  "plane and hessian-density fp32", "plot"])
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
                                      (rebinding_batch, "train single --device auto")], ids=["rate", "batch"])
def test_a_graph_replaying_a_stale_input_fails(cuda, capsys, tmp_path, monkeypatch, bug, name):
    monkeypatch.setattr(TrainingStep, "take", bug)
    failures, [line] = lines(capsys, [name], tmp_path)
    assert failures == 1 and "FAIL" in line and "graph against eager" in line, line


def test_packed_plane_points_rescaled_jointly_fail(cuda, capsys, tmp_path, monkeypatch):
    """The plane's points packed on the GPU but rescaled by their joint norm, not each by its own: every
    point's radius, hence its GM, is off."""
    real_project = connect.project_
    monkeypatch.setattr(connect, "project_", lambda params, rho, members=False: real_project(params, rho))
    failures, [line] = lines(capsys, ["plane and hessian-density fp32"], tmp_path)
    assert failures == 1 and "FAIL" in line and "plane at u" in line and "gm " in line, line


def test_every_check_has_a_line_and_the_script_exits_1_on_failure(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "CHECKS", {"fine": lambda c: None, "broken": lambda c: c.problems.append("x")})
    monkeypatch.setattr(gpu_check, "ESTIMATES", {"fine": 1, "broken": 1})
    monkeypatch.setattr(gpu_check, "START", time.monotonic())  # the budget counts from the script's start
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--skip-throughput"])
    with pytest.raises(SystemExit) as stop:
        gpu_check.main()
    out = capsys.readouterr().out.splitlines()
    assert stop.value.code == 1 and out[1].endswith("PASS") and out[2].endswith("FAIL  x")
    assert out[3] == "1 of 2 checks failed" and out[4].endswith("s in all")


def test_every_check_can_be_named_with_only():
    names = list(gpu_check.CHECKS)
    for name in names:
        assert gpu_check.plan(name, skip_throughput=True) == [name]
    assert gpu_check.plan(",".join(reversed(names)), skip_throughput=True) == names  # in the script's order
    with pytest.raises(ValueError, match="no check named 'packed'"):
        gpu_check.plan("packed", skip_throughput=True)


def test_the_telling_checks_come_first_then_the_throughput_table():
    assert gpu_check.plan(None, skip_throughput=False)[:gpu_check.FIRST + 1] == [
        "train packed", "train single --device auto", "a member diverging after capture", "random steps",
        "transition past the capture", "VGG-16-BN bf16", gpu_check.THROUGHPUT]


def test_the_budget_skips_what_would_not_fit_and_lists_it(monkeypatch, capsys):
    """Estimates 1, 100, 1 s against a budget of 50 s: the second is skipped, the third runs; a first check
    that takes 3x its estimate makes the next estimates 3x too."""
    ran = []
    checks = {name: (lambda c, name=name: ran.append(name)) for name in ("a", "b", "c")}
    monkeypatch.setattr(gpu_check, "CHECKS", checks)
    monkeypatch.setattr(gpu_check, "ESTIMATES", {"a": 1, "b": 100, "c": 1})
    monkeypatch.setattr(gpu_check, "START", time.monotonic())
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--skip-throughput", "--budget", "50"])
    with pytest.raises(SystemExit) as stop:
        gpu_check.main()
    out = capsys.readouterr().out.splitlines()
    assert stop.value.code == 0 and ran == ["a", "c"]
    assert "all 2 checks passed" in out and "skipped to stay within --budget 50 s: b" in out
    budget = gpu_check.Budget(50)
    budget.spent(10, 30)  # 3x slower than estimated
    assert budget.fits(13) and not budget.fits(17)


def test_the_estimates_fit_eight_minutes_on_an_h200():
    """Every item has an estimate, and all of them with the start-up fit the default budget, 480 s."""
    assert set(gpu_check.ESTIMATES) == set(gpu_check.CHECKS) | {gpu_check.THROUGHPUT}
    assert gpu_check.START_UP + sum(gpu_check.ESTIMATES.values()) <= 480


def test_a_child_process_imports_the_sphrun_this_process_imports(tmp_path, monkeypatch):
    """A copy of sphrun first on this process's import path and no PYTHONPATH: the child, started as
    kill -9's are, imports the copy (a plain `python -m sphrun` imported an installed sphrun, or none)."""
    shutil.copytree(os.path.join(REPO, "sphrun"), tmp_path / "copy" / "sphrun")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "copy"), *sys.path])
    monkeypatch.delenv("PYTHONPATH", raising=False)
    python, env = gpu_check.as_parent()
    child = subprocess.run([*python, "-c", "import sphrun; print(sphrun.__file__)"], env=env, cwd=tmp_path,
                           capture_output=True, text=True)
    assert child.stdout.strip() == str(tmp_path / "copy" / "sphrun" / "__init__.py"), child.stderr
