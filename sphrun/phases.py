"""Which of the paper's three training regimes a run is in, read from its metrics.csv rows alone: the rules
(RULES, with the thresholds below) in the one place that states them, for `sphrun plot --help` (HELP) and
README.md alike. The table of groups of seeds that applies them is sphrun.phase_table.

The train error and the path of the weights decide, not the trends of loss and GM: on the default
log-spaced schedule a long run has only 4 points in its later half, where a small trend of noise often
looks real, and a phase-2 run still settling has falling loss and GM as a converging one does. What
tells them apart is the train error (stuck well above 0, or on its way to 0: large changes, which noise
rarely fakes) and how far the weights turn between checkpoints. A trend is the least-squares line of
log(value) against the step; its t statistic (slope over standard error) must reach TREND_T to count.
"""

import math
from dataclasses import dataclass

import numpy as np

PHASES = ("1", "2", "3")
UNDECIDED = "undecided"
# What every rule needs before it is read. The rules read the later half of a run (its evaluation points
# at or after the middle step), and the paper's phase 2 settles within 5-10 epochs: before that a phase-2
# run falls from chance as a converging one does (its error heading to 0, its weights turning less than
# they will) and, near the 2/3 border, may still sit at chance as a random walk does. No rule tells the
# phases apart there, so each waits until the later half lies past the settling window; one gate for all
# of them, so that a run too short for one rule cannot be decided by another (a 10-epoch sweep was shaded
# "phase 1" with confident evidence where a longer one of the same settings was undecided).
SETTLING_EPOCHS = 10  # the paper: phase 2's metrics settle within 5-10 epochs
MIN_EPOCHS = 2 * SETTLING_EPOCHS  # from the run's first point (a fine-tune's fork): its middle past settling
# Evaluation points in the later half: a trend's line through fewer has one degree of freedom or none. The
# default schedule leaves 4 there in a 20-epoch run (10, 13, 16, 20) and in a 1000-epoch one.
MIN_WINDOW_POINTS = 4
CHANCE_FRACTION = 0.9  # "at chance": train error >= 0.9 * (1 - 1/C) throughout; "clearly below": median under
UNCORRELATED_COS = 0.2  # median |cos_prev| under which neighbouring checkpoints are unrelated
SETTLED_ANGLE = 0.5  # radians the weights turn at most over the later half of a converging run
MOVING_ANGLE = 1.0  # radians they turn at least over the later half of an equilibrium
HEADING_TO_ZERO = 1 / 3  # the fitted fall of the train error over the later half of a run heading to 0
STUCK = 1 / 4  # ... and the most it falls in an equilibrium (or it rises): an error that stays
CLEARLY_ABOVE_ZERO = 0.01  # median train error an equilibrium keeps: a run under 1 % is near convergence
TREND_T = 3.0  # |t statistic| a trend must reach to stand out of the noise
TOO_SHORT = "too short"  # how the evidence of a run too short for every rule begins


def percent(fraction):
    return f"{100 * fraction:.0f} %"


@dataclass(frozen=True)
class Rule:
    phase: str  # "1", "2", "3" or "undecided"
    name: str  # the paper's name of the regime
    text: str  # the rule, with this module's thresholds

    @property
    def heading(self):
        return f"{self.phase} ({self.name})" if self.name else self.phase


# The rules in the order they are tried (decide() applies them); their text is what --help and README say.
RULES = (
    Rule("3", "divergence",
         f"the train error stays at chance, at least {percent(CHANCE_FRACTION)} of 1 - 1/C at every point, and "
         f"neighbouring checkpoints are uncorrelated, median |cos_prev| under {UNCORRELATED_COS:g}."),
    Rule("1", "convergence",
         f"the train error reached 0, or fell by {percent(HEADING_TO_ZERO)} or more over the later half (a "
         f"fitted line of log error with |t| of at least {TREND_T:g}), or the weights turned less than "
         f"{SETTLED_ANGLE:g} rad in all over it (the sum of the angles between neighbouring checkpoints) while "
         f"the train error is below chance (its median under {percent(CHANCE_FRACTION)} of 1 - 1/C) and the "
         f"train loss is not rising."),
    Rule("2", "chaotic equilibrium",
         f"the train error is stuck clearly between 0 and chance (its median at least "
         f"{percent(CLEARLY_ABOVE_ZERO)} and under {percent(CHANCE_FRACTION)} of 1 - 1/C, down by less than "
         f"{percent(STUCK)} or up) while the weights turned {MOVING_ANGLE:g} rad or more; loss and GM may "
         f"still settle."),
    Rule(UNDECIDED, "",
         f"a run too short for the rules, whose later half must begin after phase 2 has settled (within "
         f"{SETTLING_EPOCHS} epochs in the paper): under {MIN_EPOCHS} epochs from its first evaluation point "
         f"(a fine-tune's fork), or fewer than {MIN_WINDOW_POINTS} evaluation points in its later half "
         f"(\"{TOO_SHORT}: N epochs, needs {MIN_EPOCHS}\" says which); or no rule fits."),
)

HELP = "\n\n".join([
    "--kind metrics prints, and writes as CSV beside the figure, one row per group of seeds (per ELR, and "
    "per loss or parent where lines differ): the number of seeds, the phase of each, the majority phase with "
    "how many seeds have it (agreement, e.g. 2 (3/3); a tie is undecided), the mean and standard deviation "
    "over the seeds of the final metrics, and the evidence. Borders between phases are taken between groups "
    "by their majority phase. The phase of a run is read from its later half (evaluation points at or after "
    "its middle step), the rules tried in this order:",
    *(f"{rule.heading}: {rule.text}" for rule in RULES)])


@dataclass(frozen=True)
class Verdict:
    phase: str  # "1", "2", "3" or "undecided"
    evidence: str  # what decided it, then the measurements, for the user
    too_short: bool = False  # undecided because the run is too short for any rule (the evidence says why)

    @property
    def label(self):
        """The phase, and for a run too short the reason: 'undecided (too short: 10 epochs, needs 20)'."""
        return f"{self.phase} ({self.evidence})" if self.too_short else self.phase


@dataclass(frozen=True)
class Trend:
    change: float  # of log(value) over the window, from the fitted line
    t: float  # slope / its standard error; +-inf for a perfect line

    def significant(self):
        return abs(self.t) >= TREND_T

    def __str__(self):
        return f"{math.expm1(self.change):+.0%} (t {self.t:+.1f})"


@dataclass(frozen=True)
class Signs:
    """The measurements of the later half that the rules read."""
    chance: float  # train error at chance level, 1 - 1/C
    lowest_err: float
    highest_err: float
    typical_err: float  # median: an equilibrium fluctuates
    err: Trend
    loss: Trend
    gm: Trend
    cos: float  # median |cos_prev|
    turned: float  # radians: the sum of the angles between neighbouring checkpoints

    def __str__(self):
        return (f"over the later half: train err {self.lowest_err:.3f} to {self.highest_err:.3f} "
                f"(median {self.typical_err:.3f}, chance {self.chance:.2f}), err {self.err}, "
                f"loss {self.loss}, GM {self.gm}, median |cos_prev| {self.cos:.4f}, "
                f"weights turned {self.turned:.2f} rad")


def later_half(rows):
    """Rows at or after the middle step between the first and the last evaluation point."""
    middle = (rows[0]["iter"] + rows[-1]["iter"]) / 2
    return [r for r in rows if r["iter"] >= middle]


def trend(window, column, floor=1e-300):
    """The least-squares line of log(column) against the step over the window (values under `floor`
    count as `floor`)."""
    steps = np.array([r["iter"] for r in window], dtype=float)
    values = np.log(np.maximum([r[column] for r in window], floor))
    slope, intercept = np.polyfit(steps, values, 1)
    residuals = values - (slope * steps + intercept)
    spread = math.sqrt(float(residuals @ residuals) / (len(steps) - 2))
    standard_error = spread / math.sqrt(float(((steps - steps.mean()) ** 2).sum()))
    if standard_error > 0:
        t = slope / standard_error
    else:  # a perfect line
        t = math.copysign(math.inf, slope) if slope else 0.0
    return Trend(float(slope * (steps[-1] - steps[0])), float(t))


def signs(window, num_classes):
    """What the rules read from the later half (`window`, rows by step) of a run with C classes."""
    errors = [r["train_err"] for r in window]
    positive = [e for e in errors if e > 0]
    # an error of 0 at some points: log(0) taken as half the smallest error seen, a fall to 0 a big fall
    floor = min(positive) / 2 if positive else 1.0
    return Signs(chance=1 - 1 / num_classes, lowest_err=min(errors), highest_err=max(errors),
                 typical_err=float(np.median(errors)), err=trend(window, "train_err", floor),
                 loss=trend(window, "train_loss"), gm=trend(window, "gm"),
                 cos=float(np.median([abs(r["cos_prev"]) for r in window])), turned=turned(window))


def turned(window):
    """The path of the weights over the window in radians: the angles between neighbouring checkpoints
    added up. A converged run hardly turns; an equilibrium keeps turning, by more the finer the
    checkpoints sample its wandering, so the sum tells them apart at any spacing."""
    return float(sum(math.acos(min(1.0, max(-1.0, r["cos_prev"]))) for r in window[1:]))


def shortfall(rows):
    """Why a run (its rows by step) is too short for every rule, as 'too short: 10 epochs, needs 20';
    '' when it is long enough (MIN_EPOCHS, MIN_WINDOW_POINTS)."""
    epochs = rows[-1]["epoch"] - rows[0]["epoch"]
    if epochs < MIN_EPOCHS * (1 - 1e-9):  # epochs are steps / steps per epoch: 20 may come out 19.999...
        return f"{TOO_SHORT}: {epochs:.4g} epochs, needs {MIN_EPOCHS}"
    points = len(later_half(rows))
    if points < MIN_WINDOW_POINTS:
        return f"{TOO_SHORT}: {points} evaluation points in the later half, needs {MIN_WINDOW_POINTS}"
    return ""


def classify(rows, num_classes):
    """The phase of a run from its metrics.csv rows (dicts with iter, epoch, train_loss, train_err, gm,
    cos_prev)."""
    rows = sorted(rows, key=lambda r: r["iter"])
    short = shortfall(rows)
    if short:
        return Verdict(UNDECIDED, short, too_short=True)
    window = later_half(rows)
    if not all(math.isfinite(r[c]) for r in window for c in ("train_loss", "train_err", "gm", "cos_prev")):
        return Verdict(UNDECIDED, "non-finite metrics in the later half")
    s = signs(window, num_classes)
    phase, reason = decide(s)
    return Verdict(phase, f"{reason}; {s}")


def decide(s):
    """(phase, the reason in words) from the signs of the later half, by RULES."""
    at_chance = s.lowest_err >= CHANCE_FRACTION * s.chance
    below_chance = s.typical_err < CHANCE_FRACTION * s.chance
    if at_chance and s.cos < UNCORRELATED_COS:
        return "3", "random walk: train error at chance, checkpoints uncorrelated"
    if s.lowest_err == 0:
        return "1", "converged: train error reached 0"
    if s.err.change <= math.log(1 - HEADING_TO_ZERO) and s.err.significant():
        return "1", f"train error heading to 0: down by {percent(HEADING_TO_ZERO)} or more"
    rising = s.loss.change > 0 and s.loss.significant()
    if s.turned <= SETTLED_ANGLE and below_chance and not rising:
        return "1", f"weights settling: turned under {SETTLED_ANGLE} rad, train loss not rising"
    stuck = s.err.change > math.log(1 - STUCK)
    if s.turned >= MOVING_ANGLE and below_chance and s.typical_err >= CLEARLY_ABOVE_ZERO and stuck:
        settled = not (s.loss.significant() or s.gm.significant())
        return "2", "equilibrium: train error stuck between 0 and chance, weights moving" + (
            "" if settled else " (loss or GM still settling)")
    if not below_chance and s.cos < UNCORRELATED_COS:
        return UNDECIDED, ("no signature fits: checkpoints uncorrelated, train error near chance but not "
                           "throughout")
    if not below_chance:
        return UNDECIDED, "no signature fits: train error near chance, checkpoints correlated (stuck?)"
    if s.turned <= SETTLED_ANGLE:
        return UNDECIDED, "no signature fits: weights settling but the train loss rising"
    if s.turned < MOVING_ANGLE:
        return UNDECIDED, (f"no signature fits: weights turned {s.turned:.2f} rad, between settling "
                           f"(<= {SETTLED_ANGLE}) and moving (>= {MOVING_ANGLE}); train longer")
    if not stuck:
        return UNDECIDED, (f"no signature fits: train error falling, by {percent(STUCK)} to "
                           f"{percent(HEADING_TO_ZERO)}, while the weights move; train longer")
    return UNDECIDED, f"no signature fits: train error under {percent(CLEARLY_ABOVE_ZERO)} but not 0, weights moving"


def borders(elrs, phases):
    """The ELR intervals where the phase changes, as (lower ELR, upper ELR, phase below, phase above),
    in increasing ELR, undecided runs skipped."""
    decided = sorted((e, p) for e, p in zip(elrs, phases) if p != UNDECIDED)
    return [(a, b, pa, pb) for (a, pa), (b, pb) in zip(decided, decided[1:]) if pa != pb]


def in_paper_order(elrs, phases):
    """True when the decided phases, by increasing ELR, never go back: 1s, then 2s, then 3s, each one
    contiguous block (a phase may be absent)."""
    decided = [p for _, p in sorted(zip(elrs, phases)) if p != UNDECIDED]
    return decided == sorted(decided)


# --- the phase table: one row per group of seeds, printed and written beside the metrics figure -------
# It reads runs (sphrun.runs and sphrun.rundir, which import torch) only when it is made: cli.py imports
# this module for HELP as it starts, where importing torch would cost seconds on every command.
