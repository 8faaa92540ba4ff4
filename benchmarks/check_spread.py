"""Where gpu_check's bands and estimates come from: its training checks' CPU runs, each twice.

    python benchmarks/check_spread.py [--threads 1,2] [--only NAME,...]

Each command gpu_check runs on the CPU (--device cpu) is run with 1 and with 2 threads: their sums split
otherwise, as a GPU's and a CPU's do, so the two runs part as a GPU run and its CPU reference do, by
summation order, amplified by the first steps. bf16 checks run in fp32 too: bf16 against fp32 bounds
how far two bf16 implementations can be apart at step 0. Prints, per check, the largest differences at
step 0 and after (values relative, errors in images), as gpu_check compares them, and the CPU seconds
of the 1-thread run, and of the same run at width 1 (its work but the convolutions': gpu_check's
estimate of a run on the GPU).
"""

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check  # noqa: E402

KILL = "kill -9 and resume (its 60 steps)"


def commands():
    """{name: sphrun arguments} of the checks that train, as their CPU runs do; the kill check's run too."""
    found = {name: check.args() for name, check in gpu_check.CHECKS.items() if hasattr(check, "args")}
    found[KILL] = ["train", "--elr", "1e-4", *gpu_check.SMALL, "--iters", "60", "--eval-every", "20"]
    return found


def cpu_run(args, out, threads):
    """Run sphrun on the CPU with `threads` threads as gpu_check's child processes run it; its CPU seconds."""
    python, env = gpu_check.as_parent()
    env = {**env, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE"}  # passive: no spinning
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([*python, "-m", "sphrun", *args, "--device", "cpu", "--out", out], env=env, check=True,
                   capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def rows(out):
    found = []
    for run in gpu_check.run_dirs(out):
        with open(os.path.join(run, "metrics.csv"), newline="") as f:
            found.append(([{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)],
                          gpu_check.RunDir(run).read_config()))
    return found


def spread(a, b):
    """Largest differences between the runs in folders a and b: {(step, column): value}, values
    relative, errors in images."""
    worst = {}
    for (rows_a, stored), (rows_b, _) in zip(rows(a), rows(b)):
        for ra, rb in zip(rows_a, rows_b):
            when = f"step {int(ra['iter'])}"
            for c in gpu_check.COLUMNS:
                scale = max(abs(ra[c]), abs(rb[c]))
                value = abs(ra[c] - rb[c]) / scale if scale else 0.0
                worst[when, c] = max(worst.get((when, c), 0.0), value)
            for c, size in (("train_err", stored["train_size"]), ("test_err", stored["test_size"])):
                worst[when, c] = max(worst.get((when, c), 0.0), round(abs(ra[c] - rb[c]) * size))
    return worst


def show(name, what, worst):
    for when in dict.fromkeys(w for w, _ in worst):
        values = {c: v for (w, c), v in worst.items() if w == when}
        print(f"  {what}, {when}: " + ", ".join(
            f"{c} {v:.0f} images" if c in ("train_err", "test_err") else f"{c} {v:.2g}" for c, v in values.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="the two thread counts (default 1,2)")
    parser.add_argument("--only", help="comma-separated names of checks (default: every check that trains)")
    args = parser.parse_args()
    one, other = (int(t) for t in args.threads.split(","))
    found = commands()
    names = [n.strip() for n in args.only.split(",")] if args.only else list(found)
    with tempfile.TemporaryDirectory() as scratch:
        for i, name in enumerate(names):
            command, folder = found[name], os.path.join(scratch, str(i))
            seconds = cpu_run(command, os.path.join(folder, "a"), one)
            cpu_run(command, os.path.join(folder, "b"), other)
            width = command.index("--width") + 1 if "--width" in command else None
            thin = cpu_run(command[:width] + ["1"] + command[width + 1:], os.path.join(folder, "thin"), one) \
                if width else float("nan")
            print(f"{name}: {seconds:.1f} CPU s with {one} thread, {thin:.1f} s at width 1", flush=True)
            show(name, f"{one} against {other} threads", spread(os.path.join(folder, "a"), os.path.join(folder, "b")))
            if "bf16" in command:
                fp32 = [("fp32" if a == "bf16" else a) for a in command]
                cpu_run(fp32, os.path.join(folder, "fp32"), one)
                show(name, "bf16 against fp32", spread(os.path.join(folder, "a"), os.path.join(folder, "fp32")))


if __name__ == "__main__":
    main()
