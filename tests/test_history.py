"""A run's history is one run's: rows written twice or out of order are refused by every reader, a setting
edited into config.json is caught by the checkpoints, and run directories of earlier versions still open."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO
from test_faults import TINY_ARGS, made, one_error, snapshot  # noqa: F401 (made: a fixture)


@pytest.fixture
def copies(made, tmp_path):
    """Two copies of run a (24 steps, rows at 0, 8, 16, 24): one to damage, one to connect it with."""
    return [str(shutil.copytree(made / "runs" / "a", tmp_path / name)) for name in ("run", "other")]


def rewrite_rows(run, order):
    """Write metrics.csv again with its data lines in `order` (indices into the rows as written)."""
    path = os.path.join(run, "metrics.csv")
    with open(path, newline="") as f:
        header, *rows = f.readlines()
    with open(path, "w", newline="") as f:
        f.writelines([header, *(rows[i] for i in order)])


def every_reader(run, other, tmp_path):
    """The commands that read a run's metrics.csv, each with arguments that work on a sound run."""
    return {
        "resume": ["train", *TINY_ARGS, "--iters", "24", "--out", run],
        "extend": ["train", *TINY_ARGS, "--iters", "32", "--out", run],
        "finetune": ["finetune", run, "--elr", "2e-3", "--iters", "8", "--device", "cpu", "--out",
                     tmp_path / "ft"],
        "connect": ["connect", run, other, "--points", "2", "--device", "cpu", "--out", tmp_path / "c"],
        "curvature": ["curvature", run, "--at", "last", "--measures", "gm", "--device", "cpu"],
        "plot": ["plot", run, "--kind", "metrics", "--out", tmp_path / "m.png"],
    }


@pytest.mark.parametrize("order, line, step, before", [
    ([0, 0, 1, 1, 2, 2, 3, 3], 3, 0, 0),  # two processes wrote every row
    ([0, 2, 1, 3], 4, 8, 16),  # rows pasted out of order
])
def test_rows_that_do_not_strictly_increase_are_refused_by_every_reader(copies, tmp_path, cli, order, line,
                                                                         step, before):
    run, other = copies
    rewrite_rows(run, order)
    kept = snapshot(run)
    for command, args in every_reader(run, other, tmp_path).items():
        code, err = cli(*args)
        one_error(code, err, f"metrics.csv has step {step} at line {line} after step {before}: its steps must "
                             f"strictly increase")
        assert snapshot(run) == kept, command
    assert not (tmp_path / "ft").exists() and not (tmp_path / "c").exists()


def test_a_setting_edited_in_config_json_is_refused_by_the_checkpoints(copies, tmp_path, cli):
    """The README's example: elr 0.001 edited to 0.01 in a finished run, then the run extended at 0.01."""
    run, other = copies
    config_path = os.path.join(run, "config.json")
    config = json.load(open(config_path))
    config["settings"]["elr"] = 0.01
    with open(config_path, "w") as f:
        json.dump(config, f)
    kept = snapshot(run)
    readers = every_reader(run, other, tmp_path)
    readers["extend"][readers["extend"].index("1e-3")] = "1e-2"
    del readers["resume"], readers["plot"]  # resume: --elr 1e-3 is another run; plot reads no checkpoint
    for command, args in readers.items():
        code, err = cli(*args)
        one_error(code, err, "was trained under other settings than")
        assert "elr=0.001 in the checkpoint, 0.01 in config.json" in err, command
        assert snapshot(run) == kept, command
    config["settings"]["elr"] = 0.001  # put back as the message advises: it trains on
    with open(config_path, "w") as f:
        json.dump(config, f)
    code, err = cli("train", *TINY_ARGS, "--iters", "32", "--out", run)
    assert code == 0, err


def test_a_run_written_before_checkpoints_carried_settings_still_opens(copies, tmp_path, cli):
    """Checkpoints of sphrun 0.1 had no settings: such a run resumes, extends, fine-tunes, connects,
    is measured and plotted as before."""
    run, other = copies
    for folder in (run, other):
        for name in os.listdir(os.path.join(folder, "checkpoints")):
            path = os.path.join(folder, "checkpoints", name)
            stored = torch.load(path, weights_only=True)
            assert stored.pop("settings")["elr"] == 1e-3
            torch.save(stored, path)
    for command, args in every_reader(run, other, tmp_path).items():
        code, err = cli(*args)
        assert code == 0, (command, err)


SPHRUN_0_1 = "ed99bcc"  # the last commit of sphrun 0.1, before checkpoints carried their settings


def test_runs_made_by_sphrun_0_1_still_resume_plot_connect_and_measure(tmp_path, cli):
    """Two runs trained by sphrun 0.1 itself (its code taken from this repository's history): today's
    sphrun extends, fine-tunes, connects, measures and plots them."""
    old = tmp_path / "sphrun-0.1"
    old.mkdir()
    archive = subprocess.run(["git", "-C", REPO, "archive", SPHRUN_0_1, "sphrun"], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"sphrun 0.1 ({SPHRUN_0_1}) is not in this clone's history (a shallow clone?)")
    subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(old)}
    runs = [str(tmp_path / name) for name in ("a", "b")]
    for run, seed in zip(runs, ("0", "1")):
        made = subprocess.run([sys.executable, "-m", "sphrun", "train", *TINY_ARGS, "--seed", seed, "--iters", "16",
                               "--out", run], env=env, capture_output=True, text=True, cwd=old)
        assert made.returncode == 0, made.stderr
    assert "settings" not in torch.load(os.path.join(runs[0], "checkpoints", "last.pt"), weights_only=True)
    for command, args in every_reader(*runs, tmp_path).items():
        code, err = cli(*args)
        assert code == 0, (command, err)
