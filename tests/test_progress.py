"""Progress without a terminal (a job's log file): every line dated, and a line between evaluation points
at least every HEARTBEAT_S seconds; on a terminal, the bar as before."""

import re

import pytest

from sphrun import progress
from sphrun.progress import StepProgress

DATED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (.*)$")


@pytest.fixture
def clock(monkeypatch):
    """progress's monotonic clock, moved by hand: clock.now = seconds."""
    class Clock:
        now = 1000.0
    monkeypatch.setattr(progress.time, "monotonic", lambda: Clock.now)
    return Clock


def lines(capsys):
    return capsys.readouterr().err.splitlines()


def test_a_log_file_gets_a_dated_line_every_heartbeat(clock, capsys):
    with StepProgress(1000, start=200, live=False, heartbeat=120) as bar:
        clock.now += 119
        bar.update(300, 0.5, 1e-3)
        assert lines(capsys) == []  # not yet due
        clock.now += 1  # 120 s for 100 steps: the 700 steps left take 840 s
        bar.update(300, 0.51234, 1e-3)
        [line] = lines(capsys)
        assert DATED.match(line).group(1) == "train 300/1000  loss 0.5123  elr 0.001  14 min left"
        clock.now += 100
        bar.log("step 320  an evaluation row")  # a line of its own restarts the wait
        assert DATED.match(lines(capsys)[0]).group(1) == "step 320  an evaluation row"
        clock.now += 119
        bar.update(400)
        assert lines(capsys) == []
        clock.now += 1  # 340 s for 200 steps: 600 left take 1020 s
        bar.update(400)
        assert DATED.match(lines(capsys)[0]).group(1) == "train 400/1000  17 min left"


@pytest.mark.parametrize("seconds, text", [(44.6, "45 s"), (60, "1 min"), (3599, "59 min"),
                                           (3600 + 5 * 60 + 59, "1 h 05 min"), (50 * 3600, "50 h 00 min")])
def test_durations_read_as_a_person_would(seconds, text):
    assert progress.duration(seconds) == text


def test_a_terminal_keeps_its_bar_and_undated_lines(clock, capsys):
    with StepProgress(1000, live=True, heartbeat=120) as bar:
        clock.now += 500
        bar.update(300, 0.5, 1e-3)
        bar.log("step 300  an evaluation row")
    err = capsys.readouterr().err
    assert "step 300  an evaluation row" in err.splitlines()
    assert not DATED.search(err) and "left" not in err


def test_a_training_log_shows_it_is_alive(tmp_path, cli, monkeypatch):
    """Between evaluation points train writes dated lines with its step, loss and ELR (here every
    refresh: the heartbeat set to 0), and its evaluation rows are dated too."""
    monkeypatch.setattr(progress, "HEARTBEAT_S", 0.0)
    monkeypatch.setattr(StepProgress, "due", lambda self: True)  # a refresh after every step
    code, err = cli("train", "--dataset", "synthetic", "--subset", "256", "--width", "4", "--batch-size", "32",
                    "--device", "cpu", "--iters", "16", "--eval-every", "8", "--elr", "1e-3", "--out", tmp_path / "r")
    assert code == 0, err
    progress_lines = [DATED.match(line) for line in err.splitlines() if re.search(r"^\S+ \S+ (train|step)", line)]
    texts = [m.group(1) for m in progress_lines]  # every one dated (None has no group)
    beats = [t for t in texts if t.startswith("train ")]
    assert [t.split()[1] for t in beats] == [f"{i}/16" for i in range(1, 17)]
    assert all(re.fullmatch(r"train \d+/16  loss \S+  elr 0\.001  \d+ s left", t) for t in beats), beats
    assert [t.split()[1] for t in texts if t.startswith("step ")] == ["8", "16"]
