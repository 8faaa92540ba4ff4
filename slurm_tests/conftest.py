"""A real single-node SLURM cluster for the tests beside this file (.ci/slurm/start). Outside the default
suite: `python -m pytest -q -rs slurm_tests`, as root where Debian's slurm-wlm and munge are installed
(.ci/run does both); elsewhere every test is skipped, and -rs prints why."""

import subprocess

import pytest

from slurmjobs import REPO, Cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    start = REPO / ".ci" / "slurm" / "start"
    try:
        started = subprocess.run(["bash", str(start), str(folder)], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"SLURM cluster not started: {e}")
    if started.returncode != 0:
        pytest.skip(started.stderr.strip().replace("\n", " | ") or f"{start} exited {started.returncode}")
    try:
        yield Cluster(folder / "slurm.conf")
    finally:
        subprocess.run(["bash", str(REPO / ".ci" / "slurm" / "stop"), str(folder)], timeout=120)
