"""Nothing lost, whatever happens: damaged checkpoints and metrics, a full disk, a scheduler's signals,
two curvature processes, outputs aimed at runs, other data, and bad paths or seeds met in one line."""

import builtins
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import sphrun.curvature as curvature
from conftest import REPO, TINY
from sphrun.config import TrainConfig
from sphrun.rundir import RunDir
from sphrun.train import train
from test_lifecycle import small_cifar
from test_train import assert_same_weights, final_state, rows_without_wall_time

TINY_ARGS = ["--dataset", "synthetic", "--subset", "256", "--width", "4", "--batch-size", "32",
             "--device", "cpu", "--elr", "1e-3", "--eval-every", "8"]
TINY_RUN = dict(TINY, elr=1e-3, eval_every=8)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """runs/a, a run of 24 steps (checkpoints at 0, 8, 16, 24), and the same run trained straight to 32
    steps, to compare resumed runs with."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("made")
    train(TrainConfig(**TINY_RUN, iters=24), str(root / "runs" / "a"))
    train(TrainConfig(**TINY_RUN, iters=32), str(root / "straight32"))
    return root


@pytest.fixture
def run(made, tmp_path):
    """A fresh copy of run a, to damage."""
    return str(shutil.copytree(made / "runs" / "a", tmp_path / "run"))


def snapshot(path):
    """Every file below `path` and its bytes, lock files aside."""
    files = {}
    for folder, _, names in os.walk(path):
        for name in names:
            if not name.endswith(".lock"):
                with open(os.path.join(folder, name), "rb") as f:
                    files[os.path.relpath(os.path.join(folder, name), path)] = f.read()
    return files


def temporaries(path):
    return [name for _, _, names in os.walk(path) for name in names if name.startswith(".tmp-")]


def one_error(code, err, says, exit_code=2, alone=True):
    """Exit `exit_code` with one error line that says `says`: the only line, or after `alone` False the
    last, after progress lines (a failure met while working)."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert code == exit_code and errors == lines[-1:] and "Traceback" not in err, err
    assert alone is False or len(lines) == 1, err
    assert says in errors[0], err
    return errors[0]


def status(path):
    return RunDir(path).read_config()["status"]


# --- a damaged or missing last.pt, a metrics.csv cut short -------------------------------------------
def test_a_missing_last_checkpoint_resumes_from_the_newest_iter_checkpoint(run, made, cli):
    rows_before = open(os.path.join(run, "metrics.csv"), "rb").read()
    os.unlink(os.path.join(run, "checkpoints", "last.pt"))
    code, err = cli("train", *TINY_ARGS, "--iters", "32", "--out", run)
    assert code == 0, err
    assert "last.pt is missing: resuming" in err and "from step 24" in err
    assert open(os.path.join(run, "metrics.csv"), "rb").read().startswith(rows_before)  # its history kept
    assert rows_without_wall_time(run) == rows_without_wall_time(made / "straight32")
    assert_same_weights(final_state(run), final_state(made / "straight32"))


def test_corrupt_checkpoints_resume_from_the_newest_sound_one_and_leave_nothing_stale(run, made, cli):
    for name in ("last.pt", "iter-0000024.pt"):
        with open(os.path.join(run, "checkpoints", name), "wb") as f:
            f.write(b"garbage")
    first_rows = b"".join(open(os.path.join(run, "metrics.csv"), "rb").readlines()[:4])  # header, 0, 8, 16
    code, err = cli("train", *TINY_ARGS, "--iters", "32", "--keep", "2", "--out", run)
    assert code == 0, err
    assert "last.pt is unreadable" in err and "from step 16" in err and "steps 24 go" in err
    assert open(os.path.join(run, "metrics.csv"), "rb").read().startswith(first_rows)
    assert rows_without_wall_time(run) == rows_without_wall_time(made / "straight32")
    assert_same_weights(final_state(run), final_state(made / "straight32"))
    # --keep 2 keeps 16 and 32 of the new steps: the corrupt iter-24 does not stay beside them
    assert RunDir(run).checkpoint_iters() == [0, 8, 16, 32]


def test_a_history_without_a_checkpoint_is_refused_not_restarted(run, cli):
    shutil.rmtree(os.path.join(run, "checkpoints"))
    before = snapshot(run)
    code, err = cli("train", *TINY_ARGS, "--iters", "32", "--out", run)
    one_error(code, err, "has a history but no checkpoint to resume it from")
    assert f"delete {run} to train it again" in err
    assert snapshot(run) == before


def test_a_history_without_its_config_is_refused_not_overwritten(run, cli):
    os.unlink(os.path.join(run, "config.json"))
    before = snapshot(run)
    code, err = cli("train", *TINY_ARGS, "--iters", "32", "--out", run)
    one_error(code, err, "holds a run's metrics or checkpoints but no config.json")
    assert snapshot(run) == before


def test_a_corrupt_last_checkpoint_names_the_others_to_other_commands(run, cli, tmp_path):
    with open(os.path.join(run, "checkpoints", "last.pt"), "wb") as f:
        f.write(b"garbage")
    code, err = cli("finetune", run, "--elr", "2e-3", "--iters", "8", "--device", "cpu",
                    "--out", tmp_path / "ft")
    one_error(code, err, "last.pt is unreadable (UnpicklingError): name another checkpoint of the run "
                         "(steps 0, 8, 16, 24)")
    code, err = cli("finetune", run, "--elr", "2e-3", "--iters", "8", "--from", "24", "--device", "cpu",
                    "--out", tmp_path / "ft")
    assert code == 0, err


def test_a_metrics_file_cut_short_is_refused_before_anything_is_written(run, cli):
    metrics = os.path.join(run, "metrics.csv")
    with open(metrics, "rb") as f:
        header, row0, row8 = f.readlines()[:3]
    os.truncate(metrics, len(header + row0 + row8) + 20)  # the row of step 16 cut, 24 gone
    before = snapshot(run)
    code, err = cli("train", *TINY_ARGS, "--iters", "32", "--out", run)
    one_error(code, err, "lacks the rows of steps 16, 24")
    assert snapshot(run) == before


def test_a_dead_writers_temporaries_are_removed_when_the_run_is_opened(run, cli):
    dead = [os.path.join("checkpoints", ".tmp-iter-0000024.pt-a1b2c3d4"),
            os.path.join("checkpoints", ".tmp-x9y8z7w6"),  # an older version's name
            ".tmp-config.json-k3j4h5g6"]
    for name in dead + [".tmp-curvature.csv-q1w2e3r4"]:  # curvature's: a curvature process may be alive
        with open(os.path.join(run, name), "wb") as f:
            f.write(b"half a file")
    code, err = cli("train", *TINY_ARGS, "--iters", "32", "--out", run)
    assert code == 0, err
    assert temporaries(run) == [".tmp-curvature.csv-q1w2e3r4"]


# --- a full disk ------------------------------------------------------------------------------------
class FullFile:
    """A file on a full disk: a write gets half its bytes out, then fails with ENOSPC."""

    def __init__(self, file):
        self.file = file

    def write(self, data):
        self.file.write(data[:len(data) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def fill_disk(monkeypatch, name, after=0):
    """From the (after + 1)-th time on that the file `name` (or a temporary of it) is opened for writing,
    its writes fail as on a full disk."""
    real_open, opened = builtins.open, []

    def opening(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
        base = os.path.basename(path)
        if any(c in mode for c in "wax+") and (base == name or base.startswith(f".tmp-{name}-")):
            opened.append(path)
            if len(opened) > after:
                return FullFile(f)
        return f
    monkeypatch.setattr(builtins, "open", opening)
    monkeypatch.setattr(io, "open", opening)


@pytest.mark.parametrize("name, after, rows_left", [
    ("metrics.csv", 2, [0, 8]),  # the row of step 16
    ("iter-0000016.pt", 0, [0, 8, 16]),
    ("last.pt", 2, [0, 8, 16]),  # at step 16, after iter-0000016.pt
    ("config.json", 1, [0, 8, 16, 24]),  # status done at the end; interrupted cannot be written either
])
def test_a_full_disk_is_one_line_keeps_what_was_there_and_the_same_command_resumes(
        tmp_path, made, monkeypatch, cli, name, after, rows_left):
    run = str(tmp_path / "run")
    args = ["train", *TINY_ARGS, "--iters", "24", "--out", run]
    with monkeypatch.context() as patch:
        fill_disk(patch, name, after)
        code, err = cli(*args)
    path = os.path.join(run, "checkpoints", name) if name.endswith(".pt") else os.path.join(run, name)
    line = one_error(code, err, f"cannot write {path}: No space left on device", exit_code=1, alone=False)
    assert temporaries(run) == []
    assert [r["iter"] for r in RunDir(run).read_metrics()] == rows_left  # whole rows only
    if name == "config.json":
        assert "status of" in line and "not updated" in line and status(run) == "running"
    else:
        assert "marked interrupted" in line and status(run) == "interrupted"
    code, err = cli(*args)  # space freed
    assert code == 0, err
    assert status(run) == "done"
    assert rows_without_wall_time(run) == rows_without_wall_time(made / "runs" / "a")
    assert_same_weights(final_state(run), final_state(made / "runs" / "a"))


def test_a_full_disk_under_curvature_keeps_the_values_measured(run, monkeypatch, cli):
    args = ["curvature", run, "--at", "0,8", "--measures", "gm", "--device", "cpu"]
    with monkeypatch.context() as patch:
        fill_disk(patch, "curvature.csv", after=1)
        code, err = cli(*args)
    one_error(code, err, f"cannot write {os.path.join(run, 'curvature.csv')}: No space left on device: gm at "
                         f"step 8", exit_code=1, alone=False)
    assert temporaries(run) == []
    assert list(curvature.CurvatureFile(RunDir(run)).read()[0]) == [0]
    code, err = cli(*args)
    assert code == 0 and "measuring 1 checkpoint" in err, err
    assert list(curvature.CurvatureFile(RunDir(run)).read()[0]) == [0, 8]


def test_a_full_disk_under_a_figure_leaves_no_file(made, monkeypatch, cli, tmp_path):
    with monkeypatch.context() as patch:
        fill_disk(patch, "fig.png")
        code, err = cli("plot", made / "runs", "--out", tmp_path / "fig.png")
    one_error(code, err, f"cannot write {tmp_path / 'fig.png'}: No space left on device", exit_code=1,
              alone=False)
    assert os.listdir(tmp_path) == []


# An earlier output's files, as the test plants them: a new one must replace all of them or none.
EARLIER_SEGMENT = {"connect.csv": b"alpha\n0\n1\n", "config.json": b'{"points": 5}\n', "connect.png": b"figure"}


@pytest.mark.parametrize("failing", ["config.json", "connect.png"])  # the table is written first
def test_a_full_disk_under_a_connect_output_keeps_the_earlier_one_whole_and_the_points(
        made, monkeypatch, cli, tmp_path, failing):
    out = tmp_path / "ab"
    out.mkdir()
    for name, data in EARLIER_SEGMENT.items():
        (out / name).write_bytes(data)
    args = ["connect", made / "runs" / "a", made / "runs" / "a", "--from-b", "8", "--points", "2", "--device", "cpu",
            "--out", out]
    with monkeypatch.context() as patch:
        fill_disk(patch, failing)
        code, err = cli(*args)
    one_error(code, err, f"cannot write {out / failing}: No space left on device: {out} keeps its earlier files, and "
                         f"the 2 points measured stay in {out / 'unfinished.jsonl'}", exit_code=1, alone=False)
    assert {name: (out / name).read_bytes() for name in EARLIER_SEGMENT} == EARLIER_SEGMENT
    assert temporaries(out) == []
    if failing == "connect.png":  # space freed: the same command writes the output from the points kept
        code, err = cli(*args)
        assert code == 0 and "every one kept in" in err, err
        assert json.load(open(out / "config.json"))["points"] == 2
        assert len((out / "connect.csv").read_text().split()) == 3  # the header and two points
        assert (out / "connect.png").read_bytes().startswith(b"\x89PNG") and not (out / "unfinished.jsonl").exists()


def test_a_full_disk_under_a_figure_keeps_its_earlier_table(made, monkeypatch, cli, tmp_path):
    earlier = {"fig.png": b"figure", "fig-phases.csv": b"series,elr\n"}  # the table is written before the figure
    for name, data in earlier.items():
        (tmp_path / name).write_bytes(data)
    with monkeypatch.context() as patch:
        fill_disk(patch, "fig.png")
        code, err = cli("plot", made / "runs", "--kind", "metrics", "--out", tmp_path / "fig.png")
    one_error(code, err, f"cannot write {tmp_path / 'fig.png'}: No space left on device", exit_code=1, alone=False)
    assert {name: (tmp_path / name).read_bytes() for name in earlier} == earlier and temporaries(tmp_path) == []
    assert "wrote" not in err


# --- a scheduler's signals, and a second Ctrl-C ------------------------------------------------------
# `sphrun ARGS` that sends itself `signals` while it measures its `when`-th evaluation point (1: the first,
# at step 0, before the loop; 2: step 8).
SIGNALLED = """
import os, sys
import sphrun.train as training
when, signals = sys.argv[1].split(":")
real, calls = training.record, []
def record(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(when):
        for signum in signals.split(","):
            os.kill(os.getpid(), int(signum))
    return real(*args, **kwargs)
training.record = record
from sphrun.cli import main
sys.argv = ["sphrun", *sys.argv[2:]]
main()
"""


def sphrun_process(*args, script=None):
    path = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    command = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "sphrun", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("when, signals, elrs, exit_code, says, saved_at", [
    (2, ["SIGTERM"], "1e-3", 143, "interrupted by SIGTERM at step 8: checkpoint saved", 8),
    (2, ["SIGUSR1"], "1e-3,2e-3", 138, "interrupted by SIGUSR1 at step 8: checkpoints saved", 8),
    (2, ["SIGINT", "SIGINT"], "1e-3", 130, "stopped at once, without saving", 0),  # a second Ctrl-C
    # SLURM's time limit: SIGTERM to a job step twice (slurmstepd's, srun's), one stop that saves
    (2, ["SIGTERM", "SIGTERM"], "1e-3", 143, "interrupted by SIGTERM at step 8: checkpoint saved", 8),
    (1, ["SIGTERM"], "1e-3", 143, "stopped at once, without saving", None),  # before the loop: no checkpoint
])
def test_a_stop_signal_saves_marks_interrupted_and_exits_with_its_status(tmp_path, made, when, signals, elrs,
                                                                         exit_code, says, saved_at):
    args = ["train", *TINY_ARGS, "--elr", elrs, "--iters", "24", "--out", str(tmp_path / "out")]
    numbers = ",".join(str(int(getattr(signal, s))) for s in signals)
    done = sphrun_process(f"{when}:{numbers}", *args, script=SIGNALLED)
    assert done.returncode == exit_code and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    runs = [str(tmp_path / "out")] if "," not in elrs else [str(p) for p in (tmp_path / "out").iterdir()]
    assert [status(r) for r in runs] == ["interrupted"] * len(runs)
    assert [RunDir(r).read_checkpoint("last")[0] and RunDir(r).read_checkpoint("last")[0]["iter"]
            for r in runs] == [saved_at] * len(runs)
    if signals == ["SIGTERM"] and saved_at:  # a requeued job: the same command goes on
        again = sphrun_process(*args)
        assert again.returncode == 0 and "resuming" in again.stderr, again.stderr
        assert rows_without_wall_time(runs[0]) == rows_without_wall_time(made / "runs" / "a")


def test_a_signal_during_the_last_evaluation_ends_the_run_done(tmp_path, made):
    """SIGUSR1 (a scheduler's notice) during the evaluation of the last step: the run finished every step,
    so it ends done (exit 0), not interrupted with one more leg to run. In a sweep of two passes (--pack 1)
    the same signal at the end of the first pass stops before the second (138), which the same command
    then trains."""
    args = ["train", *TINY_ARGS, "--iters", "24", "--out", str(tmp_path / "one")]
    done = sphrun_process(f"4:{int(signal.SIGUSR1)}", *args, script=SIGNALLED)  # record calls: 0, 8, 16, 24
    assert done.returncode == 0 and "SIGUSR1 came as the last step ended: every run is done" in done.stderr, \
        done.stderr
    assert status(tmp_path / "one") == "done"
    assert rows_without_wall_time(tmp_path / "one") == rows_without_wall_time(made / "runs" / "a")
    sweep = ["train", *TINY_ARGS[:-4], "--elr", "1e-3,2e-3", "--eval-every", "8", "--iters", "24", "--pack", "1",
             "--out", str(tmp_path / "two")]
    done = sphrun_process(f"4:{int(signal.SIGUSR1)}", *sweep, script=SIGNALLED)
    assert done.returncode == 138 and "stopped by SIGUSR1 after pass 1 of 2, its runs done" in done.stderr, \
        done.stderr
    assert sorted(status(p) for p in (tmp_path / "two").iterdir()) == ["done"]  # the second never began
    again = sphrun_process(*sweep)
    assert again.returncode == 0 and sorted(status(p) for p in (tmp_path / "two").iterdir()) == ["done", "done"]


# Ctrl-C while `module` is imported, in the command's first second.
CTRL_C_ON_IMPORT = """
import sys
module = sys.argv[1]
class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == module:
            raise KeyboardInterrupt
sys.meta_path.insert(0, CtrlC())
from sphrun.cli import main
sys.argv = ["sphrun", "train", "--help"]
main()
"""


@pytest.mark.parametrize("module", ["typer", "torch"])
def test_ctrl_c_while_starting_is_one_line(module):
    done = sphrun_process(module, script=CTRL_C_ON_IMPORT)
    assert done.returncode == 130 and done.stderr == "interrupted\n", done.stderr


# --- outputs aimed at runs, unwritable places, out-of-range seeds --------------------------------------
def test_connect_never_writes_into_a_run_or_over_a_folder_of_runs(run, made, cli, tmp_path):
    a, b = made / "runs" / "a", run  # b: a copy of a
    before = snapshot(tmp_path), snapshot(made / "runs")
    for out, says in ((b, "holds a run's config.json"), (a, "holds a run's config.json"),
                      (a / "inside", "is a run directory"), (made / "runs", "is a folder of runs")):
        code, err = cli("connect", a, b, "--points", "2", "--device", "cpu", "--out", out)
        one_error(code, err, says)
    assert (snapshot(tmp_path), snapshot(made / "runs")) == before
    code, err = cli("connect", a, b, "--points", "2", "--device", "cpu", "--out", tmp_path / "ab")
    assert code == 0, err


READ_ONLY = pytest.param("read-only", marks=pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders"))


@pytest.mark.parametrize("command", ["train", "connect", "plot"])
@pytest.mark.parametrize("where", ["/proc", READ_ONLY])
def test_an_unwritable_out_is_one_line_and_nothing_written(made, cli, tmp_path, command, where):
    if where == "read-only":
        where = tmp_path / "locked"
        where.mkdir()
        where.chmod(0o555)
    out = os.path.join(where, "x.png" if command == "plot" else "x")
    runs = made / "runs"
    before = snapshot(runs)
    args = {"train": ["train", *TINY_ARGS, "--iters", "8", "--out", out],
            "connect": ["connect", runs / "a", runs / "a", "--points", "2", "--device", "cpu", "--out", out],
            "plot": ["plot", runs, "--out", out]}[command]
    code, err = cli(*args)
    one_error(code, err, f"cannot write {out}")
    assert snapshot(runs) == before and not os.path.exists(out)


def test_a_figure_named_like_a_folder_is_one_line(made, cli, tmp_path):
    (tmp_path / "d.png").mkdir()
    code, err = cli("plot", made / "runs", "--out", tmp_path / "d.png")
    one_error(code, err, "d.png is a folder")
    assert os.listdir(tmp_path / "d.png") == []


@pytest.mark.parametrize("args, says", [
    (["train", *TINY_ARGS, "--iters", "8", "--seed", str(2 ** 64)], "--seed must be below 2^64"),
    (["train", *TINY_ARGS, "--iters", "8", "--head-seed", str(2 ** 64)],
     "--head-seed must be a whole number 0 or more and below 2^64"),
    (["train", *TINY_ARGS, "--iters", "8", "--seed", f"0:{2 ** 64}"], "gives more than 10000 seeds"),
])
def test_seeds_out_of_range_are_one_line(cli, tmp_path, monkeypatch, args, says):
    monkeypatch.chdir(tmp_path)
    one_error(*cli(*args), says)
    assert os.listdir(tmp_path) == []


def test_a_negative_curvature_seed_is_one_line(run, cli):
    before = snapshot(run)
    one_error(*cli("curvature", run, "--seed", "-1", "--device", "cpu"), "--seed must be 0 or more")
    assert snapshot(run) == before


# --- two curvature processes, other data ---------------------------------------------------------------
def test_two_curvature_processes_keep_each_others_rows(run, monkeypatch):
    real, calls = curvature.measure, []

    def measure(*args, **kwargs):  # while the first process measures step 0, a second one measures 16, 24
        calls.append(1)
        if len(calls) == 1:
            curvature.run_curvature(run, at=[16, 24], measures="gm", device="cpu")
        return real(*args, **kwargs)
    monkeypatch.setattr(curvature, "measure", measure)
    curvature.run_curvature(run, at=[0, 8], measures="gm", device="cpu")
    assert sorted(curvature.CurvatureFile(RunDir(run)).read()[0]) == [0, 8, 16, 24]


def test_curvature_and_density_written_meanwhile_keep_each_others_rows(run, monkeypatch):
    real, calls = curvature.measure, []
    density = dict(measures="hessian-density", probes=1, lanczos=2, batches=1, device="cpu")

    def measure(*args, **kwargs):  # while one process measures gm at 0 and 8, others add densities at 16, 8
        calls.append(1)
        if len(calls) == 1:
            curvature.run_curvature(run, at=[16], **density)
        if len(calls) == 2:
            curvature.run_curvature(run, at=[8], **density)
        return real(*args, **kwargs)
    monkeypatch.setattr(curvature, "measure", measure)
    curvature.run_curvature(run, at=[0, 8], measures="gm", device="cpu")
    rows = curvature.CurvatureFile(RunDir(run)).read()[0]
    assert {it: sorted(values) for it, values in rows.items()} == {
        0: ["gm"], 8: ["gm", "hessian-density"], 16: ["hessian-density"]}


def test_connect_and_curvature_refuse_other_data_unless_asked_and_record_it(tmp_path, cli):
    own, other = small_cifar(tmp_path / "own", 40), small_cifar(tmp_path / "other", 40, touch=True)
    run = tmp_path / "run"
    code, err = cli("train", "--elr", "1e-3", "--dataset", "cifar10", "--data-dir", own, "--width", "4",
                    "--batch-size", "32", "--iters", "4", "--eval-every", "4", "--device", "cpu",
                    "--out", run)
    assert code == 0, err
    before = snapshot(tmp_path)
    connect = ["connect", run, run, "--points", "2", "--device", "cpu", "--data-dir", other, "--out",
               tmp_path / "self"]
    one_error(*cli(*connect), "was trained on other data (the same sizes but other images")
    measure = ["curvature", run, "--at", "4", "--measures", "gm", "--device", "cpu"]
    one_error(*cli(*measure, "--data-dir", other), "pass --other-data")
    assert snapshot(tmp_path) == before
    code, err = cli(*connect, "--other-data")
    assert code == 0, err
    record = json.load(open(tmp_path / "self" / "config.json"))
    assert record["other_data"] is True
    assert record["data"]["fingerprint"] != json.load(open(run / "config.json"))["data"]["fingerprint"]
    code, err = cli(*measure, "--data-dir", other, "--other-data")
    assert code == 0, err
    options = json.load(open(run / "curvature.json"))["options"]["gm"]
    assert options["data"] == record["data"]["fingerprint"]
    # a value on the run's own data never joins the column measured on other data
    one_error(*cli(*measure, "--data-dir", own), "measured with other options")


# --- what a command says, and when ----------------------------------------------------------------------
def test_a_refusal_is_its_only_line(run, cli):
    with RunDir(run).lock():  # another process writes the run
        code, err = cli("train", *TINY_ARGS, "--iters", "32", "--out", run)
    one_error(code, err, "is being written by")


def test_a_pack_stopped_at_its_last_step_is_complete_without_a_pass(tmp_path, cli):
    args = ["train", *TINY_ARGS, "--elr", "1e-3,2e-3", "--iters", "1", "--out", tmp_path]
    assert cli(*args)[0] == 0
    runs = sorted(str(p) for p in tmp_path.iterdir())
    for path in runs:  # as a Ctrl-C at the last step leaves them
        RunDir(path).set_status("interrupted")
    code, err = cli(*args)
    assert code == 0 and "packed" not in err and err.count("is complete") == 2, err
    assert [status(r) for r in runs] == ["done", "done"]
