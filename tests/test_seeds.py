"""Several seeds in one sweep: --elr x --seed (x --data-seed) train as one pack, each member exactly
its single run; the seed lists' syntax and their bad input; shards over the whole grid."""

import os

import pytest
import torch

from sphrun.cli import parse_seeds, run_grid, shard_of
from sphrun.config import TrainConfig
from sphrun.rundir import RunDir
from sphrun.train import train

SMALL = dict(dataset="synthetic", subset=64, width=2, batch_size=16, device="cpu", iters=12, eval_every=6)
SMALL_ARGS = ["--dataset", "synthetic", "--subset", "64", "--width", "2", "--batch-size", "16", "--device", "cpu",
              "--iters", "12", "--eval-every", "6"]


def rows(run):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in RunDir(run).read_metrics()]


def assert_same_run(a, b):
    assert rows(a) == rows(b)
    ours, theirs = RunDir(a).load_checkpoint("last")["model"], RunDir(b).load_checkpoint("last")["model"]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("step, seeds", [("sgd", 3), ("random", 2)])
def test_a_pack_of_elrs_and_seeds_is_its_single_runs(tmp_path, cli, step, seeds):
    code, err = cli("train", "--elr", "1e-3,1e-2", "--seed", f"0:{seeds}", "--step", step, *SMALL_ARGS,
                    "--out", tmp_path / "pack")
    assert code == 0, err
    listed = ", ".join(map(str, range(seeds)))
    assert f"{2 * seeds} runs packed (ELRs 0.001, 0.01; seeds {listed}; data seed 0)" in err and "pass" not in err
    assert len(os.listdir(tmp_path / "pack")) == 2 * seeds
    for elr in (1e-3, 1e-2):
        for seed in range(seeds):
            config = TrainConfig(**SMALL, elr=elr, seed=seed, step=step)
            single, _ = train(config, tmp_path / f"single-{elr}-{seed}")
            assert_same_run(tmp_path / "pack" / config.default_run_name(), single.path)
    # every seed its own init: the members really differ
    inits = [RunDir(tmp_path / "pack" / TrainConfig(**SMALL, elr=1e-3, seed=s, step=step).default_run_name())
             .load_checkpoint(0)["model"]["features.0.weight"] for s in (0, 1)]
    assert not torch.equal(*inits)


def test_data_seeds_train_in_passes_of_their_own(tmp_path, cli):
    code, err = cli("train", "--elr", "1e-3", "--seed", "0,1", "--data-seed", "0,5", *SMALL_ARGS,
                    "--out", tmp_path / "pack")
    assert code == 0, err
    assert "pass 2 of 2" in err and "data seed 5" in err
    config = TrainConfig(**SMALL, elr=1e-3, seed=1, data_seed=5)
    single, _ = train(config, tmp_path / "single")
    assert_same_run(tmp_path / "pack" / config.default_run_name(), single.path)


@pytest.mark.parametrize("text, seeds", [("0", [0]), ("3", [3]), ("0,1,2", [0, 1, 2]), ("0:5", [0, 1, 2, 3, 4]),
                                         ("2:4", [2, 3]), (" 7 , 1 ", [7, 1])])
def test_seed_lists_and_ranges(text, seeds):
    assert parse_seeds(text) == seeds


def test_shards_split_the_whole_grid_evenly():
    grid = run_grid(TrainConfig(**SMALL, elr=1e-3), [1e-4, 1e-3, 1e-2], [0, 1, 2, 3], [0])
    assert [(c.elr, c.seed) for c in grid[:5]] == [(1e-4, 0), (1e-4, 1), (1e-4, 2), (1e-4, 3), (1e-3, 0)]
    shards = [shard_of(grid, i, 5) for i in range(5)]
    assert sorted(len(s) for s in shards) == [2, 2, 2, 3, 3]
    assert sorted((c.elr, c.seed) for s in shards for c in s) == sorted((c.elr, c.seed) for c in grid)
    assert all(len({c.elr for c in s}) > 1 for s in shards)  # a spread of ELRs in each, not one ELR's seeds


@pytest.mark.parametrize("args, complaint", [
    (["--seed", "-1"], "--seed must be 0 or more"),
    (["--seed", "0:0"], "empty range"),
    (["--seed", "3:1"], "empty range"),
    (["--seed", "0,1,0"], "repeats a seed"),
    (["--seed", "0:2:1"], "--seed must be a whole number"),
    (["--seed", "one"], "--seed must be a whole number"),
    (["--data-seed", "1,1"], "--data-seed 1,1 repeats a seed"),
    (["--data-seed", "-2"], "--data-seed must be 0 or more"),
    (["--head-seed", "-1"], "--head-seed must be a whole number 0 or more"),
    (["--seed", "0,1", "--model", "vgg16bn"], "packed ConvNet on the sphere"),
])
def test_bad_seeds_are_one_line_and_write_nothing(tmp_path, cli, args, complaint):
    code, err = cli("train", "--elr", "1e-3", *args, *SMALL_ARGS, "--out", tmp_path / "out")
    assert code == 2 and complaint in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
