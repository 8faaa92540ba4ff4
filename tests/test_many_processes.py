"""Many processes, one sweep: launches released together never both train a run (the lock is taken before
the run is first looked at); the one that comes second is refused in one line."""

import csv
import json
import os
import subprocess
import sys

from conftest import REPO, TINY
from sphrun.config import TrainConfig
from sphrun.rundir import RunDir
from test_faults import made  # noqa: F401 (a fixture: a finished run of 24 steps)

ARGS = ["train", "--dataset", "synthetic", "--subset", "256", "--width", "4", "--batch-size", "32",
        "--device", "cpu", "--iters", "16", "--eval-every", "4"]
ROUNDS = 4


# A child: imports done, it waits for the go file (the barrier), then runs `sphrun ARGV`.
WAIT_THEN_RUN = """
import os, sys, time
import sphrun.cli, sphrun.train, torch
go = sys.argv[1]
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.0002)
sys.argv = ["sphrun", *sys.argv[2:]]
sphrun.cli.main()
"""


def launch_together(commands, go):
    """Run the commands in processes released together (by creating the file `go`) once all have started;
    [(argv, exit code, stderr)]."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    processes = [subprocess.Popen([sys.executable, "-c", WAIT_THEN_RUN, go, *argv], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for argv in commands]
    for p in processes:
        assert p.stdout.readline().strip() == "ready"
    open(go, "w").close()
    return [(argv, p.wait(timeout=120), p.stderr.read()) for argv, p in zip(commands, processes)]


def raw_steps(run):
    """metrics.csv's iter column as written, without sphrun's reader (which refuses repeated steps)."""
    with open(os.path.join(run, "metrics.csv"), newline="") as f:
        return [int(row["iter"]) for row in csv.DictReader(f)]


def test_launches_released_together_never_both_train_a_run(tmp_path):
    """Two single runs and a packed sweep holding the same setting, released together, ROUNDS times: each
    run is trained by one process, its rows written once; the others are refused in one line (exit 2)."""
    name = TrainConfig(**{**TINY, "elr": 1e-3}, iters=16, eval_every=4).default_run_name()
    for round_ in range(ROUNDS):
        out = tmp_path / f"round{round_}"
        single = [*ARGS, "--elr", "1e-3", "--out", str(out / name)]
        sweep = [*ARGS, "--elr", "1e-3,2e-3", "--out", str(out)]
        outcome = launch_together([single, single, sweep], str(tmp_path / f"go{round_}"))
        for argv, code, err in outcome:
            assert code in (0, 2), err
            if code == 2:
                lines = [line for line in err.splitlines() if line.strip()]
                assert len(lines) == 1 and "is being written by pid" in lines[0], err
        trained = [argv for argv, code, err in outcome if code == 0 and "is complete" not in err]
        assert trained, outcome
        for run in (out / name, *[p for p in out.iterdir() if p.is_dir() and p.name != name]):
            if (run / "metrics.csv").exists():
                assert raw_steps(run) == [0, 4, 8, 12, 16], (round_, run, outcome)
                assert json.loads((run / "config.json").read_text())["status"] == "done"


def test_fine_tunes_of_one_parent_read_it_together_but_not_while_it_is_written(made, cli, tmp_path):
    """A fine-tune holds its parent's lock shared while it reads it: another fine-tune reading it at that
    moment (the paper's stages start several from one parent) goes on; a process writing the parent
    (its own training) makes it wait for that one."""
    parent = made / "runs" / "a"
    args = ["finetune", parent, "--elr", "2e-3", "--iters", "8", "--device", "cpu"]
    with RunDir(parent).lock(shared=True):  # another fine-tune, reading the parent
        code, err = cli(*args, "--out", tmp_path / "ft1")
    assert code == 0, err
    with RunDir(parent).lock():  # the parent being trained
        code, err = cli(*args, "--out", tmp_path / "ft2")
    assert code == 2 and "is being written by pid" in err and not (tmp_path / "ft2").exists(), err
