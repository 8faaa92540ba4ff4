"""What the SLURM tests ask of the cluster: submit a script with sbatch, read a job with `scontrol show job`
(there is no sacct without slurmdbd), wait for it to end, read its log."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A job in one of these states has ended, unless its own script requeues it in the seconds after
# (a time limit's TIMEOUT, a notice's FAILED): an end counts once it has lasted SETTLE_S.
ENDED = {"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
         "BOOT_FAIL", "DEADLINE"}
SETTLE_S = 20  # more than the cluster's KillWait (10 s): sphrun saves, then the script requeues


class Cluster:
    def __init__(self, conf):
        # Jobs see the submitter's environment (sbatch --export=ALL): this Python's sphrun first on PATH,
        # this checkout first on PYTHONPATH, one thread each (bit-identical runs, fair sharing of the CPUs).
        path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.env = {**os.environ, "SLURM_CONF": str(conf), "OMP_NUM_THREADS": "1", "PYTHONPATH": path,
                    "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]])}

    def command(self, *args):
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def sbatch(self, script, folder):
        """Submit `script` from `folder` (its working directory, where its .out files go); the job's id."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "job.sh"
        path.write_text(script)
        return self.command("sbatch", "--parsable", f"--chdir={folder}", str(path)).strip().split(";")[0]

    def tasks(self, job):
        """Each task of `job` (one, or an array's) as `scontrol show job` describes it: {field: value}."""
        out = self.command("scontrol", "show", "job", "--oneliner", job)
        return [dict(re.findall(r"(\w[\w/:]*)=(\S*)", line)) for line in out.splitlines() if line.strip()]

    def wait(self, job, timeout):
        """The tasks of `job` once every one has ended (COMPLETED, or another end that lasted SETTLE_S);
        fails after `timeout` seconds, showing the tasks' states and logs."""
        deadline, ended_since = time.monotonic() + timeout, {}
        while time.monotonic() < deadline:
            tasks, now = self.tasks(job), time.monotonic()
            for t in tasks:
                ended = t["JobState"] in ENDED
                ended_since[t["JobId"]] = (ended_since.get(t["JobId"]) or now) if ended else None
            if all(t["JobState"] == "COMPLETED" or (ended_since[t["JobId"]] is not None
                                                    and now - ended_since[t["JobId"]] >= SETTLE_S)
                   for t in tasks):
                return tasks
            time.sleep(1)
        raise AssertionError(f"job {job} not ended after {timeout} s: " + "; ".join(
            f"{t['JobId']} {t['JobState']} restarts {t.get('Restarts')}, log:\n{log(t)}" for t in tasks))


def log(task):
    """What the task's job wrote to its .out file (stdout and stderr), every leg of it."""
    path = Path(task["StdOut"])
    return path.read_text() if path.exists() else f"({path} missing)"


def exit_status(task):
    """The job script's exit status ("138:0" -> 138), or 128 + the signal that ended it ("0:15" -> 143)."""
    status, signum = map(int, task["ExitCode"].split(":"))
    return 128 + signum if signum else status
