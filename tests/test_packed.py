"""Packed ELR sweeps (sphrun.packed): K packed models = K separate runs, divergence isolation, the run
directory format, resume, the grouped (CUDA) form, bf16, and the --elr/--shard/--pack command line."""

import json
import os
import shutil
import signal

import pytest
import torch

import sphrun.train as training
from sphrun.config import TrainConfig
from sphrun.data import synthetic_data
from sphrun.finetune import finetune
from sphrun.metrics import batch_loss
from sphrun.models import build_model, trainable_scale_invariant
from sphrun.cli import parse_elrs, parse_shard, shard_of
from sphrun.packed import PackedConvNet
from sphrun.train import train_sweep
from sphrun.rundir import METRICS_COLUMNS, RunDir
from sphrun.train import Interrupted, train

# 64 synthetic images, width 2, 4 steps per epoch: 50 steps in phase 1 take a second or two per model
SMALL = dict(dataset="synthetic", subset=64, width=2, batch_size=16, device="cpu", iters=50, eval_every=25)
ELRS = (3e-4, 1e-3)
SMALL_ARGS = ["--dataset", "synthetic", "--subset", "64", "--width", "2", "--batch-size", "16", "--device", "cpu"]


def configs(elrs, **overrides):
    return [TrainConfig(**{**SMALL, **overrides, "elr": elr}) for elr in elrs]


def without_wall_time(run):
    return [{k: v for k, v in row.items() if k != "wall_s"} for row in RunDir(run).read_metrics()]


def last_model(run):
    return RunDir(run).load_checkpoint("last")["model"]


def relative_difference(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def singles(tmp_path_factory):
    """One plain `sphrun train` run per ELR: {elr: run directory}."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("singles")
    return {c.elr: str(train(c, folder / f"elr{c.elr:g}")[0]) for c in configs(ELRS)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The same ELRs trained packed: {elr: run directory}."""
    torch.set_num_threads(1)
    results = train_sweep(configs(ELRS), str(tmp_path_factory.mktemp("sweep")))
    assert [status for _, status in results] == ["done", "done"]
    return {elr: str(run) for elr, (run, _) in zip(ELRS, results)}


def test_packed_models_match_separate_runs(singles, sweep):
    for elr in ELRS:
        ours, theirs = last_model(sweep[elr]), last_model(singles[elr])
        assert ours.keys() == theirs.keys()
        for name in ours:  # conv weights, BatchNorm running statistics, the frozen last layer
            assert relative_difference(ours[name].float(), theirs[name].float()) < 1e-5, name
        packed_rows, single_rows = without_wall_time(sweep[elr]), without_wall_time(singles[elr])
        assert [r["iter"] for r in packed_rows] == [0, 25, 50]
        assert [r["train_err"] for r in packed_rows] == [r["train_err"] for r in single_rows]
        for ours_row, theirs_row in zip(packed_rows, single_rows):
            for column, value in ours_row.items():
                assert value == pytest.approx(theirs_row[column], rel=1e-5, abs=1e-7), column
    # the two ELRs really trained apart: different weights from one init
    assert relative_difference(last_model(sweep[ELRS[0]])["features.0.weight"],
                               last_model(sweep[ELRS[1]])["features.0.weight"]) > 1e-3


def test_a_diverging_model_is_frozen_and_the_others_go_on(tmp_path, singles):
    # an ELR of 1e30 leaves float32 on the first step: non-finite, while 1e-3 trains on undisturbed
    fine, broken = train_sweep(configs((1e-3, 1e30), iters=25), str(tmp_path))
    assert fine[1] == "done" and broken[1] == "diverged"
    assert RunDir(broken[0]).read_config()["status"] == "diverged"
    assert [r["iter"] for r in RunDir(broken[0]).read_metrics()] == [0]  # the metrics so far are kept
    assert RunDir(broken[0]).load_checkpoint("last")["iter"] == 0
    ours, theirs = last_model(fine[0]), RunDir(singles[1e-3]).load_checkpoint(25)["model"]
    for name in ours:
        assert relative_difference(ours[name].float(), theirs[name].float()) < 1e-5, name
    assert [r["train_err"] for r in RunDir(fine[0]).read_metrics()] == \
           [r["train_err"] for r in RunDir(singles[1e-3]).read_metrics()][:2]
    # running the sweep again leaves the diverged run alone and has nothing left to do for the other
    again = train_sweep(configs((1e-3, 1e30), iters=25), str(tmp_path))
    assert [status for _, status in again] == ["done", "diverged"]


def test_a_packed_run_directory_is_a_single_runs(sweep, singles):
    for elr in ELRS:
        ours, theirs = RunDir(sweep[elr]), RunDir(singles[elr])
        assert os.path.basename(ours.path) == TrainConfig(**{**SMALL, "elr": elr}).default_run_name()
        assert sorted(os.listdir(ours.path)) == sorted(os.listdir(theirs.path))
        assert sorted(os.listdir(ours.checkpoint_dir)) == sorted(os.listdir(theirs.checkpoint_dir))
        header = open(ours.metrics_path).readline().strip().split(",")
        assert header == list(METRICS_COLUMNS)
        ours_config, theirs_config = ours.read_config(), theirs.read_config()
        assert ours_config.keys() == theirs_config.keys()
        assert {k: v for k, v in ours_config.items() if k != "argv"} == \
               {k: v for k, v in theirs_config.items() if k != "argv"}
        a, b = ours.load_checkpoint(25), theirs.load_checkpoint(25)
        assert a.keys() == b.keys() and a["iter"] == 25 and a["elr"] == elr
        assert {k: v.shape for k, v in a["model"].items()} == {k: v.shape for k, v in b["model"].items()}
    settings = [RunDir(sweep[elr]).read_config()["settings"] for elr in ELRS]
    assert {k for k in settings[0] if settings[0][k] != settings[1][k]} == {"elr"}


def test_a_packed_run_extends_and_finetunes_like_a_single_one(tmp_path, sweep, singles):
    member = str(tmp_path / "member")
    shutil.copytree(sweep[1e-3], member)
    run, status = train(TrainConfig(**{**SMALL, "elr": 1e-3, "iters": 54}), member)  # a single run extends it
    assert status == "done" and [r["iter"] for r in RunDir(member).read_metrics()] == [0, 25, 50, 54]
    child, status = finetune(sweep[1e-3], 5e-4, iters=4, device="cpu", out=str(tmp_path / "child"))
    assert status == "done" and RunDir(child).read_config()["parent"]["iter"] == 50


def test_interrupted_sweep_resumes_exactly(tmp_path, monkeypatch, sweep):
    class StopAfter:  # Ctrl-C between steps 15 and 16, as StopRequest reports it to the loop
        checks = 0
        signum = signal.SIGINT

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        @property
        def requested(self):
            StopAfter.checks += 1
            return StopAfter.checks == 15

    monkeypatch.setattr(training, "StopRequest", StopAfter)
    with pytest.raises(Interrupted):
        train_sweep(configs(ELRS, iters=25), str(tmp_path))
    runs = [RunDir(tmp_path / os.path.basename(sweep[elr])) for elr in ELRS]
    assert [r.read_config()["status"] for r in runs] == ["interrupted", "interrupted"]
    assert [r.load_checkpoint("last")["iter"] for r in runs] == [15, 15]
    assert [status for _, status in train_sweep(configs(ELRS, iters=25), str(tmp_path))] == ["done", "done"]
    for elr, run in zip(ELRS, runs):  # the same state as the uninterrupted sweep at step 25, to the bit
        ours, theirs = last_model(run.path), RunDir(sweep[elr]).load_checkpoint(25)["model"]
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        assert without_wall_time(run.path) == without_wall_time(sweep[elr])[:2]


def packed_and_single(grouped):
    models = [build_model("convnet", 2, 10, 10.0, seed=s, head_seed=0) for s in (0, 1, 2)]
    singles = [build_model("convnet", 2, 10, 10.0, seed=s, head_seed=0) for s in (0, 1, 2)]
    return PackedConvNet(models, grouped=grouped), singles


def test_grouped_form_computes_the_same_models():
    # the CUDA form (grouped convolutions, one BatchNorm over K*C channels) run on the CPU
    data = synthetic_data(train_size=32, test_size=10)
    model, singles = packed_and_single(grouped=True)
    losses = batch_loss(model(data.train_x), data.train_y, "ce")
    grads = torch.autograd.grad(losses.sum(), list(model.weights))
    for k, single in enumerate(singles):
        loss = batch_loss(single(data.train_x), data.train_y, "ce")
        assert losses[k].item() == pytest.approx(loss.item(), rel=1e-5)
        for g, h in zip(grads, torch.autograd.grad(loss, trainable_scale_invariant(single))):
            assert relative_difference(g[k], h) < 1e-5
        state = model.member_state_dict(k)  # running statistics updated per model
        for name, value in single.state_dict().items():
            assert torch.allclose(state[name].float(), value.float(), rtol=1e-5, atol=1e-6), name


def test_bf16_is_a_setting_of_single_runs_too(tmp_path):
    run, status = train(TrainConfig(**{**SMALL, "elr": 1e-3, "iters": 4, "eval_every": 4, "precision": "bf16"}),
                        tmp_path / "run")
    assert status == "done" and run.read_config()["settings"]["precision"] == "bf16"
    rows = run.read_metrics()
    assert abs(rows[-1]["si_norm"] / rows[0]["si_norm"] - 1) < 1e-6
    assert TrainConfig(elr=1e-3, precision="bf16").default_run_name().endswith("-bf16")


@pytest.mark.parametrize("text, values", [
    ("7e-4", [7e-4]),
    ("1e-4,5e-4,1e-3", [1e-4, 5e-4, 1e-3]),
    ("1e-5:1:6", [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]),
    ("1e-5:1:16", None),
    ("1e-3:1e-3:1", [1e-3]),
])
def test_elr_lists_and_grids(text, values):
    parsed = parse_elrs(text)
    if values is not None:
        assert parsed == pytest.approx(values, rel=1e-12)
    else:  # 16 log-spaced values, ends included, rounded to 3 digits as run names show them
        assert len(parsed) == 16 and parsed[0] == 1e-5 and parsed[-1] == 1.0 and parsed[5] == 4.64e-4
        ratios = [b / a for a, b in zip(parsed, parsed[1:])]
        assert all(abs(r / 10 ** (1 / 3) - 1) < 0.01 for r in ratios)


def test_shards_cover_the_grid_once():
    grid = parse_elrs("1e-5:1:16")
    parts = [shard_of(grid, *parse_shard(f"{i}/5")) for i in range(5)]
    assert sorted(sum(parts, [])) == grid and parts[1] == grid[1::5]


@pytest.mark.parametrize("args, complaint", [
    (["--elr", "1e-5:1"], "start:stop:count"),
    (["--elr", "1e-5:1:0"], "count must be at least 1"),
    (["--elr", "1e-5:1:x"], "count must be a whole number"),
    (["--elr", "1:1e-5:4"], "above its stop"),
    (["--elr", "-1e-5:1:4"], "must be a positive"),
    (["--elr", "0:1:4"], "must be a positive"),
    (["--elr", "1e-3,0"], "must be a positive"),
    (["--elr", "1e-3,fast"], "must be a number"),
    (["--elr", "1e-3,1e-3"], "repeats a value"),
    (["--elr", "1e-3:1e-3:3"], "repeats a value"),
    (["--elr", "1e-3,2e-3", "--shard", "2/2"], "0 <= I < N"),
    (["--elr", "1e-3,2e-3", "--shard", "-1/2"], "0 <= I < N"),
    (["--elr", "1e-3,2e-3", "--shard", "0/0"], "0 <= I < N"),
    (["--elr", "1e-3,2e-3", "--shard", "1"], "I/N"),
    (["--elr", "1e-3,2e-3", "--shard", "2/3"], "is empty"),
    (["--elr", "1e-3,2e-3", "--pack", "0"], "--pack must be at least 1"),
    (["--elr", "1e-3,2e-3", "--precision", "fp16"], "unknown precision"),
    (["--elr", "1e-3,2e-3", "--model", "vgg16bn"], "packed ConvNet on the sphere"),
])
def test_bad_sweeps_are_one_line(tmp_path, cli, args, complaint):
    code, err = cli("train", *args, "--iters", "2", *SMALL_ARGS, "--out", tmp_path / "sweep")
    assert code == 2 and complaint in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sweep").exists()


def test_sweep_command_writes_one_run_per_elr_under_out(tmp_path, cli):
    out = tmp_path / "sweep"
    code, err = cli("train", "--elr", "1e-4:1e-2:3", "--shard", "0/2", "--pack", "1", "--iters", "2",
                    "--eval-every", "2", *SMALL_ARGS, "--out", out)
    assert code == 0, err
    assert "pass 2 of 2" in err
    # shard 0/2 of (1e-4, 1e-3, 1e-2): the first and the last, named as their single runs
    expected = {TrainConfig(**{**SMALL, "elr": e, "iters": 2, "eval_every": 2}).default_run_name(): e
                for e in (1e-4, 1e-2)}
    assert sorted(os.listdir(out)) == sorted(expected)
    for name, elr in expected.items():
        record = json.loads((out / name / "config.json").read_text())
        assert record["status"] == "done" and record["settings"]["elr"] == elr
