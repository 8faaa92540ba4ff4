"""benchmarks/gpu_check.py part (a) on the CPU: every subcommand and training path passes, and a
broken path is reported as FAIL with its error (so the script can be trusted on a GPU)."""

import os
import subprocess
import sys

from conftest import REPO

SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")


def test_every_path_passes_on_the_cpu():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--skip-throughput"], env=env,
                          capture_output=True, text=True, timeout=900)
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    verdicts = [line for line in lines if line.endswith("PASS") or "FAIL" in line]
    assert len(verdicts) == 16 and all(line.endswith("PASS") for line in verdicts), done.stdout
    assert lines[-1] == "all checks passed"


def test_a_failing_path_is_reported_with_its_error(tmp_path):
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    assert gpu_check.failure(2, "training x\nerror: boom at step 3\n", None) == "exit 2: error: boom at step 3"
    note = "note: CUDA graph capture failed (RuntimeError: no); training without it, more slowly"
    assert gpu_check.failure(0, f"training x\n{note}\ndone\n", None) == note
    assert gpu_check.failure(0, "training x\ndone\n", None) is None
