"""examples/paper.py, the paper in one command, without running sphrun: its stages read only what earlier
stages wrote, its index covers every figure of the paper, a rerun skips what finished, --shard deals the
training runs (and only them) out exactly once. .ci/run runs the demo end to end."""

import collections
import csv
import json
import os
import signal
import sys
import threading
import time

import pytest

from conftest import REPO
from sphrun.cli import shard_of

sys.path.insert(0, os.path.join(REPO, "examples"))
import paper  # noqa: E402

sys.path.pop(0)

SCALES = list(paper.SCALES.values())


def stages_of(scale):
    return paper.Experiments(scale).stages()


def written(command):
    """The folder a command writes (its --out), None for one that writes into a run (curvature)."""
    args = list(command.args)
    return args[args.index("--out") + 1] if "--out" in args else None


def read(command):
    """The folders and runs a command reads: the RunAt placeholders and output paths among its arguments."""
    args = list(command.args)
    named = [a for i, a in enumerate(args) if i == 0 or args[i - 1] != "--out"]
    return ([f"{paper.OUT}/{a.folder}" for a in named if isinstance(a, paper.RunAt)]
            + [a for a in named if isinstance(a, str) and a.startswith(paper.OUT)])


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: s.name)
def test_each_stage_reads_only_what_earlier_stages_wrote(scale):
    stages = stages_of(scale)
    assert [s.name for s in stages] == list(paper.STAGE_ORDER)
    earlier, names = [], []
    for stage in stages:
        assert set(stage.needs) <= set(names), f"{stage.name} needs a later stage"
        for command in stage.commands:
            for path in read(command):
                # the folder written, a run inside it, or a folder of runs written
                assert any(path == w or path.startswith(w + "/") or w.startswith(path + "/") for w in earlier), (
                    f"{stage.name} reads {path}, which no earlier stage writes: {command.template()}")
        earlier += [written(c) for c in stage.commands if written(c)]
        names.append(stage.name)
    assert stages[-1].kind == paper.DRAW and set(stages[-1].needs) == set(names[:-1])


@pytest.mark.parametrize("scale", SCALES, ids=lambda s: s.name)
def test_the_index_has_every_figure_of_the_paper(tmp_path, scale):
    experiments = paper.Experiments(scale)
    stages = experiments.stages()
    rows = [line.split(" | ") for line in paper.index_text(str(tmp_path), experiments, stages,
                                                             paper.Record(str(tmp_path))).splitlines()
            if line.startswith("| ") and not line.startswith("| paper")]
    numbers = [int(n) for row in rows for n in row[0].strip("| ").split(", ") if n != "-"]
    assert sorted(set(numbers)) == list(range(1, 30))  # figs. 1-25 and appendix 4's 26-29
    files = [row[1] for row in rows]
    assert len(set(files)) == len(files)
    assert sum(row[0] == "| -" for row in rows) == 2  # the plane and the spectrum, sphrun's extensions
    assert all("not drawn yet" in row[1] for row in rows)  # nothing ran in tmp_path


def fake_sphrun(out, calls, stop_at=None):
    """An executor standing in for sphrun: records each command and makes the run directories a command
    would (config.json alone), so that later commands find their runs; `stop_at`: the command (its
    position among the calls) stopped by SIGTERM, as sphrun exits then."""
    def make_run(folder, settings, parent=None):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"settings": settings, "parent": parent}, f)

    def execute(argv):
        calls.append(argv)
        if len(calls) == stop_at:
            return 143, None
        options = dict(zip(argv, argv[1:]))
        if argv[0] == "train" and "--elr" in options:
            grid = [(elr, seed) for elr in options["--elr"].split(",") for seed in options.get("--seed", "0").split(",")]
            if "--shard" in options:
                grid = shard_of(grid, *map(int, options["--shard"].split("/")))
            for elr, seed in grid:
                make_run(os.path.join(options["--out"], f"run-{elr}-s{seed}-{options.get('--step', 'sgd')}"),
                         {"elr": float(elr), "seed": int(seed), "step": options.get("--step", "sgd")})
        elif argv[0] == "finetune":
            make_run(options["--out"], {"elr": float(options["--elr"]), "seed": 0}, {"run": argv[1]})
        return 0, None
    return execute


def run(out, stages, execute, index=0, count=1):
    record = paper.Record(out)
    record.claim("demo")
    said = []
    paper.run_stages(out, stages, paper.share(stages, index, count), record, index, count, None, execute,
                     say=lambda *a, **k: said.append(" ".join(a)))
    return said


def test_a_rerun_skips_finished_stages_and_resumes_a_cut_one(tmp_path):
    out = str(tmp_path / "out")
    stages = stages_of(paper.DEMO)
    everything = [c for s in stages for c in s.commands]
    finished = stages[:paper.STAGE_ORDER.index("finetune")]  # the stages before the fine-tunes
    before = sum(len(s.commands) for s in finished)
    first = []
    with pytest.raises(paper.Stopped) as stopped:  # cut at the third fine-tune, by SIGTERM
        run(out, stages, fake_sphrun(out, first, stop_at=before + 3))
    assert stopped.value.code == 143 and len(first) == before + 3
    second = []
    said = run(out, stages, fake_sphrun(out, second))
    # the cut command again, and everything after it, once
    assert [argv[:3] for argv in second] == [c.argv(out)[:3] for c in everything[before + 2:]]
    assert [line for line in said if line.endswith("skipped")] == [
        f"== {s.name}: done before (0 s), skipped" for s in finished]
    assert sum(line.startswith("done before: sphrun finetune") for line in said) == 2
    third = []
    said = run(out, stages, fake_sphrun(out, third))
    assert third == [] and sum(line.endswith("skipped") for line in said) == len(stages)


def test_shards_train_then_the_unsharded_run_measures_and_draws(tmp_path):
    out = str(tmp_path / "out")
    stages = stages_of(paper.DEMO)
    sharded = []
    for index in range(3):
        run(out, stages, fake_sphrun(out, sharded), index, 3)
    training = [c for s in stages if s.kind == paper.TRAIN for c in s.commands]
    assert {argv[0] for argv in sharded} == {"train", "finetune"} and len(sharded) >= len(training)
    final = []
    run(out, stages, fake_sphrun(out, final))  # finds every run each shard trained
    expected = [c for s in stages if s.kind != paper.TRAIN for c in s.commands]
    assert [argv[0] for argv in final] == [c.args[0] for c in expected]


@pytest.mark.parametrize("count", [2, 3, 8, 50])
def test_shards_deal_every_training_run_out_once_and_nothing_else(count):
    stages = stages_of(paper.PAPER_SCALE)
    trained = {}
    for index in range(count):
        jobs = paper.share(stages, index, count)
        for stage in stages:
            if stage.kind != paper.TRAIN:
                assert jobs[stage.name] == [], f"shard {index} runs {stage.name}"
            for job in jobs[stage.name]:
                runs = list(job.command.runs)
                if job.shard:  # sphrun's own rule for --shard J/N
                    runs = shard_of(runs, *map(int, job.shard[1].split("/")))
                for r in runs:
                    assert r not in trained, f"{r} trained twice"
                    trained[r] = index
    commands = [c for s in stages if s.kind == paper.TRAIN for c in s.commands]
    assert sorted(map(repr, trained)) == sorted(repr(r) for c in commands for r in c.runs)
    for c in commands:
        if c.parent is not None:
            assert trained[c.runs[0]] == trained[c.parent]  # no shard waits for another's run
    from_init = collections.Counter(trained[r] for c in commands if c.parent is None for r in c.runs)
    total = sum(from_init.values())  # dealt round-robin: as even as whole runs allow
    assert all(total // count <= from_init[i] <= -(-total // count) for i in range(count))


def phase_table(out, phases):
    os.makedirs(os.path.join(out, "figures"), exist_ok=True)
    with open(os.path.join(out, "figures", "fig02-metrics-phases.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["series", "elr", "phase"])
        writer.writerows(["", elr, phase] for elr, phase in phases)


def test_check_wants_every_figure_and_the_phases_in_the_papers_order(tmp_path):
    out = str(tmp_path)
    stages = stages_of(paper.DEMO)
    files = [c.figure.file for s in stages for c in s.commands if c.figure]
    for file in files:
        os.makedirs(os.path.dirname(os.path.join(out, file)), exist_ok=True)
        open(os.path.join(out, file), "w").close()
    in_order = [(1e-4, "1"), (1e-3, "1"), (1e-2, "2"), (2e-2, "undecided"), (1e-1, "3")]
    phase_table(out, in_order[::-1])  # rows in any order: sorted by ELR
    assert paper.check(out, stages)[0] == []
    phase_table(out, [(1e-4, "1"), (1e-3, "2"), (1e-2, "1"), (1e-1, "3")])
    assert "not 1, then 2, then 3" in paper.check(out, stages)[0][0]
    phase_table(out, [(1e-4, "1"), (1e-3, "undecided"), (1e-1, "3")])
    assert "no run in phase 2" in paper.check(out, stages)[0][0]
    os.remove(os.path.join(out, files[0]))
    assert paper.check(out, stages)[0][0] == f"missing figure {files[0]}"


@pytest.mark.parametrize("args, error", [
    (["tiny", "OUT"], "unknown scale 'tiny'"),
    (["demo", "OUT", "--data-dir", "data"], "--data-dir is for small and paper"),
    (["demo", "OUT", "--shard", "2/2"], "need 0 <= I < N"),
    (["demo", "FOREIGN"], "not empty and was not made by paper.py"),
    (["small", "MADE"], "was made at scale demo, not small"),
])
def test_mistakes_are_one_line_and_exit_2(tmp_path, capsys, monkeypatch, args, error):
    monkeypatch.setattr(paper, "probe", None)  # refused before anything runs: no probe, no sphrun
    (tmp_path / "FOREIGN").mkdir()
    (tmp_path / "FOREIGN" / "mine.txt").write_text("a user's file")
    paper.Record(str(tmp_path / "MADE")).claim("demo")
    args = [str(tmp_path / a) if a.isupper() else a for a in args]
    assert paper.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and error in err and err.count("\n") == 1
    assert (tmp_path / "FOREIGN" / "mine.txt").read_text() == "a user's file"


def test_shards_starting_together_share_the_folder(tmp_path):
    """Array tasks start at the same moment: one finds OUT/.paper made by another, settings not yet written."""
    (tmp_path / "out" / paper.STATE).mkdir(parents=True)
    paper.Record(str(tmp_path / "out")).claim("demo")
    paper.Record(str(tmp_path / "out")).claim("demo")


def test_a_stop_signal_to_the_driver_alone_reaches_the_sphrun_command(tmp_path, monkeypatch):
    """A scheduler may signal the driver's process alone: sphrun must still save and stop (here a stand-in
    that exits 143 on SIGTERM, as sphrun does), and the driver learn why."""
    ready = tmp_path / "ready"
    stand_in = (f"import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(143)); "
                f"pathlib.Path({str(ready)!r}).touch(); time.sleep(10)")
    monkeypatch.setattr(paper, "SPHRUN", [sys.executable, "-c", stand_in])

    def stop_the_driver():
        while not ready.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_the_driver, daemon=True).start()
    code, signum, _ = paper.sphrun_process([])
    assert (code, signum) == (143, signal.SIGTERM)


def test_small_on_a_tenth_of_cifar10_is_the_same_experiment_in_ten_times_fewer_steps(tmp_path, monkeypatch):
    """Small's fine-tune, transition and MSE lengths are step counts sized for CIFAR-10's 50,000 images: on an
    ImageFolder tree of 5,000 they are a tenth, every run as many passes over its data; demo and paper keep
    their fixed counts."""
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
    monkeypatch.setattr(paper, "count_images", lambda folder: 5000 if folder.endswith("train") else 1000)
    full, tenth = paper.Experiments(paper.SMALL), paper.Experiments(paper.SMALL, str(tmp_path))
    for name in ("finetune_iters", "finetune_eval_every", "mse_iters", "mse_subset_iters"):
        assert getattr(tenth.s, name) * 10 == getattr(full.s, name), name
    assert tuple(10 * d for d in tenth.s.transitions) == full.s.transitions
    stepped = 0
    for big, small in zip(*([c for s in e.stages() if s.kind == paper.TRAIN for c in s.commands]
                            for e in (full, tenth))):
        assert big.args[0] == small.args[0] and len(big.runs) == len(small.runs)
        if "--iters" in big.args:  # fine-tunes, schedules, MSE: a tenth of the steps on a tenth of the images
            assert 10 * small.cost.steps == big.cost.steps and 10 * small.cost.train_size == big.cost.train_size
            stepped += 1
        else:  # --epochs: the same epochs
            assert small.args[small.args.index("--epochs") + 1] == big.args[big.args.index("--epochs") + 1]
    assert stepped == 2 + len(paper.SMALL.lowered + paper.SMALL.raised + paper.SMALL.p2_low_to
                              + paper.SMALL.p2_high_to + paper.SMALL.transitions + paper.SMALL.mse_lowered)
    said = []
    paper.print_plan(str(tmp_path / "out"), tenth, tenth.stages(), paper.share(tenth.stages()),
                     paper.Record(str(tmp_path / "out")), None, say=said.append)
    assert "sized for 50,000 train images and this data has 5,000: each is scaled by 0.1" in said[1]
    assert paper.scaling_note(full) is None
    for scale in (paper.DEMO, paper.PAPER_SCALE):
        assert paper.Experiments(scale, str(tmp_path) if scale.dataset == "cifar10" else None).s is scale
