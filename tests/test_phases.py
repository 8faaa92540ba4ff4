"""The phase classifier on hand-made metrics tables, one per signature of PAPER.md §3."""

import math
import random

from sphrun.phases import UNDECIDED, borders, classify, in_paper_order, later_half, trend


def table(loss, gm, err, cos, points=31, every=39):
    """Rows at steps 0, every, 2*every, ...; each metric a function of the point index k."""
    return [{"iter": k * every, "train_loss": loss(k), "gm": gm(k), "train_err": err(k), "cos_prev": cos(k)}
            for k in range(points)]


def noisy(level, spread, seed):
    """A stationary series: `level` times independent factors within 1 +- spread."""
    rng = random.Random(seed)
    values = [level * (1 + spread * (2 * rng.random() - 1)) for _ in range(1000)]
    return lambda k: values[k]


def test_falling_loss_is_phase_1():
    rows = table(loss=lambda k: 2.3 / math.sqrt(1 + k), gm=lambda k: 10 / (1 + k) ** 0.3,
                 err=lambda k: 0.9 * 0.95 ** k, cos=lambda k: 0.999)
    verdict = classify(rows, 10)
    assert verdict.phase == "1"
    assert verdict.evidence.startswith("loss falling")


def test_slow_but_steady_fall_is_phase_1_not_equilibrium():
    # a small ELR: the loss drops only ~3 % over the later half, but at every single point
    rows = table(loss=lambda k: 2.0 - 0.002 * k, gm=lambda k: 11.0 - 0.01 * k, err=lambda k: 0.7 - 0.001 * k,
                 cos=lambda k: 0.9999)
    assert classify(rows, 10).phase == "1"


def test_zero_train_error_is_converged_phase_1():
    rows = table(loss=noisy(1e-3, 0.05, 1), gm=noisy(0.01, 0.05, 2), err=lambda k: 0.0 if k > 20 else 0.1,
                 cos=lambda k: 0.9999)
    verdict = classify(rows, 10)
    assert (verdict.phase, verdict.evidence.split(":")[0]) == ("1", "converged")


def test_settled_metrics_below_chance_are_phase_2():
    settle = lambda level, k: level * (1 + 3 * math.exp(-k))  # settled within a few epochs
    loss, gm = noisy(1.2, 0.05, 3), noisy(3.0, 0.05, 4)
    rows = table(loss=lambda k: settle(loss(k), k), gm=lambda k: settle(gm(k), k), err=noisy(0.4, 0.05, 5),
                 cos=noisy(0.6, 0.1, 6))
    verdict = classify(rows, 10)
    assert verdict.phase == "2", verdict.evidence


def test_equilibrium_fluctuations_are_no_trend():
    # GM swings by +-30 % around its level: a fitted change beyond 10 % is noise (small t), not a trend
    rows = table(loss=noisy(1.0, 0.05, 16), gm=noisy(3.0, 0.3, 17), err=noisy(0.35, 0.05, 18),
                 cos=noisy(0.9, 0.05, 19))
    assert abs(trend(later_half(rows), "gm").change) > 0.1  # large enough to matter, were it a trend
    verdict = classify(rows, 10)
    assert verdict.phase == "2", verdict.evidence


def test_clear_rise_of_gm_is_no_equilibrium():
    rows = table(loss=noisy(1.0, 0.02, 20), gm=lambda k: 3.0 * 1.05 ** k, err=noisy(0.35, 0.02, 21),
                 cos=lambda k: 0.95)
    verdict = classify(rows, 10)
    assert verdict.phase == "undecided" and verdict.evidence.startswith("no signature fits")


def test_random_walk_at_chance_is_phase_3():
    rows = table(loss=noisy(6.0, 0.3, 7), gm=noisy(2000.0, 0.3, 8), err=noisy(0.9, 0.01, 9),
                 cos=lambda k: 0.01 * (-1) ** k)
    assert classify(rows, 10).phase == "3"


def test_chance_level_follows_the_number_of_classes():
    # 85 % error is chance level for 10 classes (>= 0.9 * 0.9) but far below it for 100 (0.99)
    rows = table(loss=noisy(2.0, 0.05, 10), gm=noisy(5.0, 0.05, 11), err=noisy(0.85, 0.005, 12),
                 cos=lambda k: 0.02)
    assert classify(rows, 10).phase == "3"
    assert classify(rows, 100).phase == "2"


def test_at_chance_but_correlated_is_not_phase_3():
    # a net stuck at chance that barely moves (cos ~ 1) is no random walk, nor an equilibrium below chance
    rows = table(loss=noisy(2.3, 0.01, 13), gm=noisy(1.0, 0.01, 14), err=noisy(0.9, 0.001, 15),
                 cos=lambda k: 0.99)
    assert classify(rows, 10).phase == UNDECIDED


def test_too_short_run_is_undecided():
    rows = table(loss=lambda k: 2.3 / (1 + k), gm=lambda k: 10.0, err=lambda k: 0.5, cos=lambda k: 0.9,
                 points=5)
    verdict = classify(rows, 10)
    assert verdict.phase == UNDECIDED and verdict.evidence.startswith("too short")
    assert classify(rows[:1], 10).phase == UNDECIDED


def test_row_order_does_not_matter():
    rows = table(loss=lambda k: 2.3 / math.sqrt(1 + k), gm=lambda k: 10 / (1 + k), err=lambda k: 0.5,
                 cos=lambda k: 0.99)
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    assert classify(shuffled, 10) == classify(rows, 10)


def test_borders_and_paper_order():
    elrs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    phases = ["1", "1", UNDECIDED, "2", "3", "3"]
    assert borders(elrs, phases) == [(1e-4, 1e-2, "1", "2"), (1e-2, 1e-1, "2", "3")]
    assert in_paper_order(elrs, phases)
    assert in_paper_order(list(reversed(elrs)), list(reversed(phases)))  # order of the input is irrelevant
    assert not in_paper_order(elrs, ["1", "2", "1", "2", "3", "3"])  # phase 1 in two blocks
    assert not in_paper_order(elrs, ["1", "3", "2", "2", "3", "3"])
