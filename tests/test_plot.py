"""`sphrun plot`: every kind draws from tiny runs, the phase table, default names, the refusals."""

import csv
import json
import os
import shutil
import sys

import matplotlib.image
import numpy as np
import pytest
import torch

from sphrun import SphrunError
from sphrun.config import TrainConfig
from sphrun.phases import classify
from sphrun.plot import KINDS, group_series, load_run, parent_rows, plot
from sphrun.rundir import RunDir
from sphrun.train import train

ELRS = (1e-3, 3e-2, 1.0)
TINY_RUN = dict(dataset="synthetic", subset=256, width=4, batch_size=32, iters=20, eval_every=5, device="cpu")
FORK = 10


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Three tiny runs from one init, a fine-tune of the first (faked: a run whose config.json names a
    parent and whose rows start at the fork, as `sphrun finetune` writes), curvature.csv files, and a
    connect output beside them."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("plot")
    runs = root / "runs"
    for elr in ELRS:
        train(TrainConfig(elr=elr, **TINY_RUN), out=str(runs / f"elr{elr:g}"))
    parent, child = runs / "elr0.001", runs / "elr0.001-ft"
    copy_run(runs / "elr0.03", child)
    config = json.loads((child / "config.json").read_text())
    config["parent"] = {"run": str(parent), "iter": FORK}
    (child / "config.json").write_text(json.dumps(config))
    rows = RunDir(child).read_metrics()
    write_csv(child / "metrics.csv", [r for r in rows if r["iter"] >= FORK])
    for run in runs.iterdir():
        write_csv(run / "curvature.csv", [{"iter": r["iter"], "fisher-trace": 3 * r["gm"],
                                           "hessian-eig": r["gm"] ** 2} for r in RunDir(run).read_metrics()])
    connect = root / "connect" / "elr0.001@20--elr0.03@20"
    connect.mkdir(parents=True)
    write_csv(connect / "connect.csv", [{"alpha": a / 10, "train_loss": 1 + a * (10 - a) / 25,
                                         "train_err": 0.2 + a * (10 - a) / 100, "test_loss": 1.5,
                                         "test_err": 0.4, "gm": 2.0} for a in range(11)])
    connect_config = {"command": "connect", "a": {"settings": config["settings"]}}
    (connect / "config.json").write_text(json.dumps(connect_config))
    return root


def copy_run(source, target):
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", ".lock"))


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def drawn(path):
    """True when the file is an image with something on it (not one flat colour)."""
    pixels = matplotlib.image.imread(path)
    return os.path.getsize(path) > 0 and pixels.ndim == 3 and float(np.ptp(pixels[..., :3])) > 0


def run_cli(monkeypatch, capsys, *args):
    from sphrun.cli import main

    monkeypatch.setattr(sys, "argv", ["sphrun", "plot", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_draws_an_image(sweep, tmp_path, kind):
    source = sweep / ("connect" if kind == "connect" else "runs")
    out = plot([str(source)], kind, out=str(tmp_path / f"{kind}.png"))
    assert drawn(out)


@pytest.mark.parametrize("extension, magic", [(".svg", b"<?xml"), (".pdf", b"%PDF-")])
def test_vector_formats(sweep, tmp_path, extension, magic):
    out = plot([str(sweep / "runs")], "phase", out=str(tmp_path / f"phase{extension}"))
    assert open(out, "rb").read(5) == magic


def test_default_names_beside_the_runs(sweep, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, sweep / "runs", "--kind", "projection")
    assert code == 0 and f"wrote {sweep / 'runs' / 'projection.png'}" in err
    assert drawn(sweep / "runs" / "projection.png")
    single = sweep / "runs" / "elr1"
    code, _, err = run_cli(monkeypatch, capsys, single, "--kind", "phase")
    assert code == 0 and drawn(sweep / "runs" / "elr1-phase.png")


def test_metrics_prints_and_writes_the_phase_table(sweep, tmp_path, monkeypatch, capsys):
    figure = tmp_path / "final.png"
    code, out, err = run_cli(monkeypatch, capsys, sweep / "runs", "--kind", "metrics", "--out", figure)
    assert code == 0 and drawn(figure)
    with open(tmp_path / "final-phases.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(ELRS) + 1  # the sweep and the fine-tune
    for row in table:
        run = load_run(row["run"])
        assert row["phase"] == classify(run.rows, 10).phase
        assert float(row["train_err"]) == pytest.approx(run.rows[-1]["train_err"], rel=1e-5)
    for elr in ELRS:
        assert f"{elr:.3g}" in out
    assert "fine-tuned from" in out  # the fine-tune is its own line, with its own table


def test_phase_diagram_with_curvature_columns(sweep, tmp_path):
    assert drawn(plot([str(sweep / "runs")], "phase", out=str(tmp_path / "a.png"), y="hessian_eig"))
    out = plot([str(sweep / "runs")], "curvature", out=str(tmp_path / "b.png"), x="gm", y="fisher-trace")
    assert drawn(out)
    with pytest.raises(SphrunError, match="no column nosuch"):
        plot([str(sweep / "runs")], "phase", out=str(tmp_path / "c.png"), y="nosuch")


def test_fine_tune_continues_from_its_parent_at_the_fork(sweep):
    child = load_run(str(sweep / "runs" / "elr0.001-ft"))
    path, rows = parent_rows(child, {})
    parent = RunDir(sweep / "runs" / "elr0.001").read_metrics()
    assert path == str(sweep / "runs" / "elr0.001")
    assert rows == [r for r in parent if r["iter"] <= FORK] and rows[-1]["iter"] == FORK
    assert child.rows[0]["iter"] == FORK  # so its line continues from the parent's point at the fork


def test_parent_recorded_from_another_folder_is_found_beside_the_fine_tune(sweep, tmp_path):
    copy_run(sweep / "runs" / "elr0.001", tmp_path / "elr0.001")
    copy_run(sweep / "runs" / "elr0.001-ft", tmp_path / "ft")
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    config["parent"]["run"] = "some/other/folder/elr0.001"
    (tmp_path / "ft" / "config.json").write_text(json.dumps(config))
    path, rows = parent_rows(load_run(str(tmp_path / "ft")), {})
    assert path == str(tmp_path / "elr0.001") and rows[-1]["iter"] == FORK


def test_mixed_losses_are_drawn_together(sweep, tmp_path):
    runs = tmp_path / "runs"
    copy_run(sweep / "runs" / "elr0.001", runs / "a")
    copy_run(sweep / "runs" / "elr1", runs / "b")
    set_setting(runs / "b", loss="mse")
    assert drawn(plot([str(runs)], "phase", out=str(tmp_path / "mixed.png")))


def test_runs_from_an_older_sphrun_join_the_same_line(sweep, tmp_path):
    # a config.json written before a setting existed means that setting's default
    copy_run(sweep / "runs" / "elr1", tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["settings"]["head_seed"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    runs = [load_run(str(sweep / "runs" / "elr0.001")), load_run(str(tmp_path / "old"))]
    assert len(group_series(runs)) == 1
    set_setting(tmp_path / "old", head_seed=1)
    assert len(group_series([runs[0], load_run(str(tmp_path / "old"))])) == 2


def set_setting(run, **changes):
    config = json.loads((run / "config.json").read_text())
    config["settings"].update(changes)
    (run / "config.json").write_text(json.dumps(config))


def bad_inputs(sweep, tmp):
    (tmp / "empty").mkdir()
    copy_run(sweep / "runs" / "elr1", tmp / "nometrics")
    os.remove(tmp / "nometrics" / "metrics.csv")
    copy_run(sweep / "runs" / "elr1", tmp / "nocos")
    write_csv(tmp / "nocos" / "metrics.csv",
              [{k: v for k, v in r.items() if k != "cos_prev"} for r in RunDir(tmp / "nocos").read_metrics()])
    copy_run(sweep / "runs" / "elr1", tmp / "mixed" / "a")
    copy_run(sweep / "runs" / "elr0.03", tmp / "mixed" / "b")
    set_setting(tmp / "mixed" / "b", dataset="cifar10")
    copy_run(sweep / "runs" / "elr1", tmp / "uneven")
    rows = RunDir(tmp / "uneven").read_metrics()
    write_csv(tmp / "uneven" / "metrics.csv", [r for r in rows if r["iter"] != 5])  # gaps 10, 5, 5
    runs = sweep / "runs"
    return {
        "no runs": ([tmp / "empty"], [], "no sphrun runs in"),
        "no metrics.csv": ([tmp / "nometrics"], [], "has no metrics.csv"),
        "missing column": ([tmp / "nocos"], ["--kind", "cosine"], "has no column cos_prev"),
        "two data sets": ([tmp / "mixed"], [], "different data sets"),
        "unknown kind": ([runs], ["--kind", "loss"], "unknown kind 'loss'"),
        "unknown extension": ([runs], ["--out", tmp / "x.jpg"], "must end in .png, .svg, .pdf"),
        "uneven spacing": ([tmp / "uneven"], ["--kind", "cosine"], "not equally spaced"),
        "no curvature.csv": ([tmp / "nocos"], ["--kind", "curvature"], "no curvature.csv"),
        "not a folder": ([tmp / "missing"], [], "is not a directory"),
    }


def test_bad_inputs_are_one_line_errors(sweep, tmp_path, monkeypatch, capsys):
    cases = bad_inputs(sweep, tmp_path)
    os.remove(tmp_path / "nocos" / "curvature.csv")
    for name, (paths, options, expected) in cases.items():
        code, _, err = run_cli(monkeypatch, capsys, *paths, *options)
        assert code == 2, name
        assert err.startswith("error: ") and expected in err and err.count("\n") == 1, (name, err)
    assert not any(p.endswith(".png") for p in os.listdir(tmp_path))  # nothing half-drawn
