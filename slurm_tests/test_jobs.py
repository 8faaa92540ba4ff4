"""sphrun as a cluster user runs it: README.md's SLURM scripts, sizes swapped for tiny ones, submitted with
sbatch to a real slurmctld and slurmd (conftest.py). Every run a job finishes, however often it was stopped
and requeued, must equal the same run trained here without interruption (metrics rows, wall_s aside).

Timings the tests lean on (SLURM 22.05): the minimum time limit is 1 minute, and slurmctld looks at time
limits every 30 s, so a 1-minute job is cut 60 to 90 s after it starts and `--signal=USR1@45` comes 15 to
45 s after. The run that SLURM stops therefore trains for some 40 s of CPU, its jobs lift their time limit
once requeued (one stop each), and they are submitted together, so that their waits overlap."""

import csv
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from slurmjobs import REPO, exit_status, log

TINY = "--dataset synthetic --subset 256 --width 4 --batch-size 32 --device cpu"
SWEEP = f"{TINY} --elr 1e-4:1e-2:8 --iters 16 --eval-every 8"  # the job array's grid: 8 runs, 2 a task
SAME_SHARD = f"{TINY} --elr 1e-4:1e-2:8 --iters 400 --eval-every 200"  # long enough for two tasks to meet
PACKED = f"{TINY} --elr 1e-3,3e-3 --iters 1200 --eval-every 300"  # requeued at its first row past step 0
# One run stopped by the scheduler once: more than one leg can train (a notice 15 to 45 s after the start,
# or a time limit's cut at 60 to 90 s after an idle 40 s: some 40 s of training at the most, at about 75
# steps a second alone on a core).
SINGLE = f"{TINY} --elr 1e-3 --iters 3400 --eval-every 400"
PAIR = f"{TINY} --elr 1e-3 --seed 0:2 --iters 16 --eval-every 8"  # the two ends of a connect
POINTS = 200  # on the segment between them: about 0.2 s of CPU a point, longer than one leg too


# --- README.md's scripts ----------------------------------------------------------------------------
def readme_script(job_name):
    """The indented script in README.md whose `#SBATCH --job-name=` is `job_name`, as written there."""
    blocks, block = [], []
    for line in (REPO / "README.md").read_text().splitlines() + [""]:
        if line.startswith("    ") or (block and not line.strip()):
            block.append(line)
        else:
            blocks.append(textwrap.dedent("\n".join(block)).strip() + "\n")
            block = []
    [script] = [b for b in blocks if f"#SBATCH --job-name={job_name}\n" in b]
    return script


def swap(script, old, new):
    """`script` with its one `old` replaced: README.md changing under the test fails it, saying what."""
    assert script.count(old) == 1, f"README.md's script no longer has {old!r} once:\n{script}"
    return script.replace(old, new)


def without_line(script, start):
    """`script` without its one line that starts with `start`."""
    lines = script.splitlines(keepends=True)
    [line] = [line for line in lines if line.startswith(start)]
    return "".join(l for l in lines if l is not line)


def before_the_commands(script, lines):
    """`script` with `lines` after its #SBATCH lines (sbatch reads none after the first command)."""
    head = script.splitlines(keepends=True)
    first = next(i for i, line in enumerate(head) if not line.startswith("#"))
    return "".join(head[:first]) + lines + "".join(head[first:])


def one_stop(script):
    """`script` whose second leg has the time limit lifted to 10 minutes, so that SLURM stops the run once:
    with a 1-minute limit every leg would be stopped, and how far each trains depends on the time-limit
    checks and on the other jobs, too loosely to size a run that takes two legs and not ten."""
    return before_the_commands(script, '[ "${SLURM_RESTART_COUNT:-0}" -eq 0 ] || '
                                       'scontrol update JobId="$SLURM_JOB_ID" TimeLimit=10  # test only\n')


def tiny(script, settings, minutes=None, notice=None, tasks=None):
    """A README script with a tiny run (`settings` for the ELRs and data, on the CPU: no GPU here), a time
    limit (minutes), the notice's N and the array's tasks swapped in where given."""
    script = swap(script, "--loss ce --elr 1e-5:1:16 --data-dir data", settings)
    script = swap(without_line(script, "#SBATCH --gres=gpu:1"), "--cpus-per-task=4", "--cpus-per-task=1")
    if minutes is not None:
        script = swap(script, "--time=04:00:00", f"--time={minutes}")
    if notice is not None:
        script = swap(script, "USR1@120", f"USR1@{notice}")
    if tasks is not None:
        script = swap(script, "--array=0-3", f"--array={tasks}")
    return script


# --- runs trained here, and runs compared --------------------------------------------------------------
def sphrun_here(arguments, out):
    """`sphrun ARGUMENTS --out OUT` in the background, outside SLURM: an uninterrupted reference. Its messages
    go to OUT.log (a pipe nobody reads until the end could fill and stop it)."""
    with open(f"{out}.log", "w") as messages:
        process = subprocess.Popen([sys.executable, "-m", "sphrun", *arguments.split(), "--out", str(out)],
                                   stdout=messages, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    process.log = f"{out}.log"
    return process


def train_here(settings, out):
    return sphrun_here(f"train {settings}", out)


def finished(process):
    process.wait(timeout=600)
    assert process.returncode == 0, open(process.log).read()


def table(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def runs(folder):
    """{run directory's name: its metrics rows without wall_s} for every run in `folder` (or `folder` itself),
    read as plain CSV (not through sphrun)."""
    found = {}
    for metrics in sorted(Path(folder).rglob("metrics.csv")):
        with open(metrics, newline="") as f:
            found[metrics.parent.name] = [{k: v for k, v in row.items() if k != "wall_s"}
                                          for row in csv.DictReader(f)]
    return found


def only_run(folder):
    [rows] = runs(folder).values()
    return rows


def status(run):
    return re.search(r'"status": "(\w+)"', (Path(run) / "config.json").read_text()).group(1)


def sphrun_lines(text):
    """A job log's lines that sphrun wrote (not srun's, slurmstepd's or the shell's)."""
    return [line for line in text.splitlines() if not re.match(r"(srun|slurmstepd\S*):|/.*line \d+:", line)]


def legs(task, text, stopped_by):
    """Checks that the log keeps every leg of a requeued job: one start line per leg (training, then
    resuming), each leg but the last stopped by `stopped_by` after saving, the last one done."""
    restarts = int(task["Restarts"])
    starts = [line for line in sphrun_lines(text) if re.match(r"(training|resuming) ", line)]
    assert len(starts) == restarts + 1 and starts[0].startswith("training"), text
    assert all(line.startswith("resuming") for line in starts[1:]), text
    saved = re.findall(rf"interrupted by {stopped_by} at step \d+: checkpoint saved", text)
    assert len(saved) == restarts and "stopped at once" not in text, text
    assert sphrun_lines(text)[-1].endswith(": done"), text
    return restarts


# --- the job array -------------------------------------------------------------------------------------
def test_the_readme_job_array_covers_the_grid_once_and_equals_the_unsharded_sweep(cluster, tmp_path):
    reference = train_here(SWEEP, tmp_path / "reference")
    job = cluster.sbatch(tiny(readme_script("sphrun-sweep"), SWEEP), tmp_path / "job")
    tasks = cluster.wait(job, timeout=300)
    finished(reference)
    assert sorted(int(t["ArrayTaskId"]) for t in tasks) == [0, 1, 2, 3]
    assert [(t["JobState"], exit_status(t)) for t in tasks] == [("COMPLETED", 0)] * 4, [log(t) for t in tasks]
    trained = runs(tmp_path / "job" / "sweeps" / "ce")
    expected = runs(tmp_path / "reference")
    assert len(expected) == 8 and trained == expected
    # each run made by one task, the task its place in the grid says: run i by task i mod 4
    grid = sorted(expected, key=lambda name: float(re.search(r"-elr([\d.e-]+)-", name).group(1)))
    for i, name in enumerate(grid):
        config = (tmp_path / "job" / "sweeps" / "ce" / name / "config.json").read_text()
        assert re.findall(r'"(\d)/4"', config) == [str(i % 4)], (name, config)
        assert status(tmp_path / "job" / "sweeps" / "ce" / name) == "done"


def test_two_tasks_with_the_same_shard_one_trains_the_other_is_refused(cluster, tmp_path):
    """An array whose tasks were all given shard 0 by mistake: both start at once on the same runs. One
    trains them; the other says so in one line and exits 2; the runs' rows are those of one run each.
    (Passes reliably once open_runs locks a run before it looks whether the run exists.)"""
    reference = train_here(f"{SAME_SHARD} --shard 0/4", tmp_path / "reference")
    script = swap(tiny(readme_script("sphrun-sweep"), SAME_SHARD, tasks="0-1"),
                  '--shard "${SLURM_ARRAY_TASK_ID}/4"', '--shard "0/4"')
    tasks = cluster.wait(cluster.sbatch(script, tmp_path / "job"), timeout=300)
    finished(reference)
    codes = sorted(exit_status(t) for t in tasks)
    assert codes == [0, 2], [log(t) for t in tasks]
    [refused] = [t for t in tasks if exit_status(t) == 2]
    [line] = sphrun_lines(log(refused))
    assert line.startswith("error: ") and "sweeps/ce" in line, line
    assert runs(tmp_path / "job" / "sweeps" / "ce") == runs(tmp_path / "reference")


# --- stopped and requeued runs -------------------------------------------------------------------------
class StoppedRuns:
    """The jobs that SLURM stops, by name: one run (SINGLE) in three, a connect in one; and the same trained
    and measured here without interruption."""

    def __init__(self, cluster, folder):
        self.folder = folder
        finished(train_here(PAIR, folder / "pair"))
        self.connect = "connect {} {} --points {}".format(*sorted((folder / "pair").iterdir()), POINTS)
        self.references = {"train": train_here(SINGLE, folder / "reference"),
                           "connect": sphrun_here(self.connect, folder / "connect-reference")}
        sweep = tiny(readme_script("sphrun-sweep"), SINGLE, minutes=1, tasks="0")
        sweep = swap(sweep, '--shard "${SLURM_ARRAY_TASK_ID}/4"', '--shard "${SLURM_ARRAY_TASK_ID}/1"')
        # The time limit without the notice: the first leg idles 40 s, so that the cut (60 to 90 s after
        # the start) comes while it trains, without a run long enough to train through 90 s.
        time_limit = before_the_commands(without_line(sweep, "#SBATCH --signal="),
                                         '[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || sleep 40  # test only\n')
        notice = swap(sweep, "USR1@120", "USR1@45")
        train_command = re.search(r"srun sphrun train .*?--shard \S+\n", notice, re.DOTALL).group(0)
        scripts = {
            "time-limit": time_limit,
            "notice-srun": notice,
            "notice-trap": tiny(readme_script("sphrun-ce"), SINGLE, minutes=1, notice=45),
            "notice-connect": swap(notice, train_command, f"srun sphrun {self.connect} --out line\n"),
        }
        scripts = {name: one_stop(script) for name, script in scripts.items()}
        self.jobs = {name: cluster.sbatch(script, folder / name) for name, script in scripts.items()}

    def uninterrupted(self):
        """The run's rows trained without interruption."""
        finished(self.references["train"])
        return only_run(self.folder / "reference")

    def uninterrupted_connect(self):
        """connect.csv's rows measured without interruption."""
        finished(self.references["connect"])
        return table(self.folder / "connect-reference" / "connect.csv")

    def stop(self):
        for process in self.references.values():
            if process.poll() is None:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def stopped_runs(cluster, tmp_path_factory):
    """Submitted together, as early as the module first needs them, so that their waits overlap."""
    stopped = StoppedRuns(cluster, tmp_path_factory.mktemp("stopped"))
    yield stopped
    stopped.stop()


def test_scontrol_requeue_of_a_running_packed_sweep_ends_identical(cluster, tmp_path, stopped_runs):
    """An administrator's (or a preemption's) requeue in the middle of a packed sweep; the job starts again
    and the same command resumes. (stopped_runs: their jobs start now and run meanwhile.)"""
    reference = train_here(PACKED, tmp_path / "reference")
    script = f"#!/bin/bash\n#SBATCH --open-mode=append\nsrun sphrun train {PACKED} --out sweep\n"
    job = cluster.sbatch(script, tmp_path / "job")
    deadline = time.monotonic() + 300
    while not all(len(rows) > 1 for rows in runs(tmp_path / "job" / "sweep").values() or [[]]):
        assert time.monotonic() < deadline, log(cluster.tasks(job)[0])
        time.sleep(0.5)
    cluster.command("scontrol", "requeue", job)
    [task] = cluster.wait(job, timeout=300)
    finished(reference)
    assert (task["JobState"], int(task["Restarts"])) == ("COMPLETED", 1), log(task)
    assert re.search(r"resuming 2 runs .* from step \d+ to 1200", log(task)), log(task)  # requeued mid-run
    expected = runs(tmp_path / "reference")
    assert len(expected) == 2 and runs(tmp_path / "job" / "sweep") == expected


def test_a_job_cut_by_its_time_limit_saves_and_its_requeued_job_finishes_identical(cluster, stopped_runs):
    """No notice: SIGTERM at the time limit (twice to the job step: slurmstepd's and srun's) stops sphrun,
    which saves and exits 143; the README's script requeues on 143, and the next leg finishes the run."""
    [task] = cluster.wait(stopped_runs.jobs["time-limit"], timeout=420)
    text = log(task)
    assert (task["JobState"], exit_status(task)) == ("COMPLETED", 0), text
    assert "DUE TO TIME LIMIT" in text and legs(task, text, "SIGTERM") == 1
    assert only_run(stopped_runs.folder / "time-limit") == stopped_runs.uninterrupted()


@pytest.mark.parametrize("job", ["notice-srun", "notice-trap"])
def test_the_readme_notice_and_requeue_recipe_ends_every_run_done_and_identical(cluster, stopped_runs, job):
    """--signal=USR1@N with srun, and --signal=B:USR1@N with the trap that passes it on: each leg saves on
    the notice and requeues itself (the run trains longer than one leg); .out keeps both legs."""
    [task] = cluster.wait(stopped_runs.jobs[job], timeout=420)
    text = log(task)
    assert (task["JobState"], exit_status(task)) == ("COMPLETED", 0), text
    assert legs(task, text, "SIGUSR1") == 1
    [run] = [metrics.parent for metrics in (stopped_runs.folder / job).rglob("metrics.csv")]
    assert status(run) == "done"
    assert only_run(stopped_runs.folder / job) == stopped_runs.uninterrupted()


def test_a_connect_stopped_by_the_notice_goes_on_where_it_stopped_and_ends_identical(cluster, stopped_runs):
    """connect in the README's script in place of train: it keeps each point it measured, stops on the notice
    with train's message and exit status, and the requeued job measures the points left, ending with the
    connect.csv of an uninterrupted connect. (Passes once connect stops and resumes as train does.)"""
    [task] = cluster.wait(stopped_runs.jobs["notice-connect"], timeout=420)
    text = log(task)
    assert (task["JobState"], exit_status(task), int(task["Restarts"])) == ("COMPLETED", 0, 1), text
    assert len(re.findall(r"^interrupted by SIGUSR1\b", text, re.M)) == 1 and "stopped at once" not in text, text
    assert len(re.findall(r"alpha 0\.000 ", text)) == 1, text  # the first point, measured by the first leg alone
    measured = table(stopped_runs.folder / "notice-connect" / "line" / "connect.csv")
    assert measured == stopped_runs.uninterrupted_connect()
