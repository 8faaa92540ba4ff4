"""Settings of a training run, frozen, and their JSON form in config.json."""

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

from sphrun import SphrunError

DATASETS = ("cifar10", "cifar100", "synthetic")
LOSSES = ("ce", "mse")
MODELS = ("convnet", "vgg16bn", "resnet18")  # sphrun.models.ARCHITECTURES
DEFAULT_WIDTH = {"convnet": 32, "vgg16bn": 64, "resnet18": 64}  # channels of the first convolution
STEPS = ("sgd", "random", "ascent")  # the step direction: -grad, a random tangent one, +grad
PRECISIONS = ("fp32", "bf16")  # bf16: convolutions and matrix products in bfloat16, the rest float32
DEFAULT_INIT_SCALE = {"ce": 10.0, "mse": 1.5}  # Frobenius norm of the frozen last layer (docs/science.md, The model)

# Settings that may differ between invocations on the same run directory: they change how long the
# run goes or where it computes, never the trajectory it follows.
NON_IDENTITY_FIELDS = ("epochs", "iters", "device", "keep", "data_dir")


@dataclass(frozen=True)
class TrainConfig:
    elr: float  # on the sphere the ELR; off it (sphere=False) the plain SGD learning rate, in the same field
    loss: str = "ce"
    dataset: str = "cifar10"
    data_dir: str = "./data"
    subset: float | None = None  # a fraction in (0, 1] or a count of train images (> 1)
    model: str = "convnet"
    width: int | None = None  # None: the model's usual width
    init_scale: float | None = None  # None: the paper's default for the loss; off the sphere, torch's init
    seed: int = 0  # init of the scale-invariant (trainable) weights
    head_seed: int = 0  # init of the frozen last layer, shared by all runs so they live in one function space
    data_seed: int = 0  # batch order, shared by all runs of a sweep
    batch_size: int = 128
    epochs: int | None = 1000
    iters: int | None = None  # overrides epochs when given
    eval_every: int | None = None  # steps between evaluation points; None: log-spaced
    keep: int | None = None  # keep every keep-th evaluation checkpoint (the first and last always)
    step: str = "sgd"
    geodesic: bool = False  # move along the great circle (exponential map) instead of step-then-rescale
    # Off the sphere (appendix 4): torch's SGD over every parameter of the conventional model, no projection
    sphere: bool = True
    wd: float = 0.0  # weight decay, off the sphere only
    momentum: float = 0.0  # off the sphere only
    precision: str = "fp32"  # part of the run key: bf16 follows another trajectory
    # A fine-tune (`sphrun finetune`) begins at step `origin` of its lineage, from its parent's checkpoint
    # there; its ELR moves linearly from `elr_from` (the parent's) to `elr` over `transition` steps.
    origin: int = 0
    elr_from: float | None = None
    transition: int = 0
    device: str = "auto"

    def __post_init__(self):
        if self.width is None and self.model in DEFAULT_WIDTH:
            object.__setattr__(self, "width", DEFAULT_WIDTH[self.model])
        if self.init_scale is None and self.loss in DEFAULT_INIT_SCALE and self.sphere is True:
            object.__setattr__(self, "init_scale", DEFAULT_INIT_SCALE[self.loss])
        validate(self)

    def elr_at(self, step):
        """The ELR of the step from `step` to step + 1 (steps counted over the lineage).

        The k-th step of a transition (k = 1..D) uses elr_from + (elr - elr_from) * k / D, so the
        transition lands on `elr` at its D-th step and D = 0 or 1 is a jump.
        """
        k = step - self.origin + 1
        if self.elr_from is None or k >= self.transition:
            return self.elr
        return self.elr_from + (self.elr - self.elr_from) * max(k, 0) / self.transition

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise SphrunError(f"unknown settings {sorted(unknown)} in config.json")
        return cls(**d)

    def run_key(self):
        """The settings that fix the trajectory: two invocations may share a run directory iff equal (its
        checkpoints carry it)."""
        d = self.to_dict()
        for name in NON_IDENTITY_FIELDS:
            d.pop(name)
        return d

    def default_run_name(self):
        parts = [self.dataset]
        if self.subset is not None:
            parts.append(f"sub{self.subset:g}")
        rate = f"elr{self.elr:.3g}" if self.sphere else f"lr{self.elr:.3g}"
        parts += [f"{self.model}{self.width}", self.loss, rate, f"s{self.seed}"]
        if self.step != "sgd":
            parts.append(self.step)
        if self.geodesic:
            parts.append("geo")
        if self.precision != "fp32":
            parts.append(self.precision)
        if not self.sphere:
            parts += [f"wd{self.wd:g}"] * (self.wd > 0) + [f"mom{self.momentum:g}"] * (self.momentum > 0)
        defaults = TrainConfig(elr=self.elr, loss=self.loss, model=self.model, sphere=self.sphere)
        named = ("dataset", "subset", "model", "width", "loss", "elr", "seed", "step", "geodesic", "sphere",
                 "wd", "momentum", "precision")
        rest = {k: v for k, v in self.run_key().items() if k not in named and v != getattr(defaults, k)}
        if rest:  # other non-default settings: a short digest keeps names unique and readable
            parts.append(hashlib.sha1(json.dumps(rest, sort_keys=True).encode()).hexdigest()[:8])
        return "-".join(parts)


def validate(c):
    def need(ok, message):
        if not ok:
            raise SphrunError(message)

    need(isinstance(c.sphere, bool), f"sphere must be true or false, got {c.sphere!r}")
    rate = "--elr" if c.sphere else "--lr"
    need(isinstance(c.elr, (int, float)) and math.isfinite(c.elr) and c.elr > 0,
         f"{rate} must be a positive finite number, got {c.elr}")
    need(c.loss in LOSSES, f"unknown loss {c.loss!r}: choose one of {', '.join(LOSSES)}")
    need(c.dataset in DATASETS, f"unknown dataset {c.dataset!r}: choose one of {', '.join(DATASETS)}")
    need(c.model in MODELS, f"unknown model {c.model!r}: choose one of {', '.join(MODELS)}")
    need(c.step in STEPS, f"unknown step {c.step!r}: choose one of {', '.join(STEPS)}")
    need(c.precision in PRECISIONS, f"unknown precision {c.precision!r}: choose one of {', '.join(PRECISIONS)}")
    need(isinstance(c.geodesic, bool), f"geodesic must be true or false, got {c.geodesic!r}")
    need(c.origin >= 0, f"the start step must be at least 0, got {c.origin}")
    need(c.elr_from is None or (isinstance(c.elr_from, (int, float)) and math.isfinite(c.elr_from)
                                and c.elr_from > 0), f"the starting ELR must be positive, got {c.elr_from}")
    need(c.transition >= 0, f"--transition must be at least 0 steps, got {c.transition}")
    need(math.isfinite(c.wd) and c.wd >= 0, f"--wd must be a weight decay of 0 or more, got {c.wd}")
    need(math.isfinite(c.momentum) and 0 <= c.momentum < 1, f"--momentum must be in [0, 1), got {c.momentum}")
    if c.sphere:
        need(c.wd == 0 and c.momentum == 0, "--wd and --momentum apply to conventional training: add --no-sphere "
                                            "(on the sphere steps are plain SGD, rescaled to rho0)")
    else:
        need(c.step == "sgd" and not c.geodesic, "--step random/ascent and --geodesic are steps on the sphere; "
                                                 "off the sphere (--no-sphere) torch's SGD takes -gradient steps")
    for name in ("seed", "head_seed", "data_seed"):  # torch's generators take 64-bit seeds
        value = getattr(c, name)
        need(isinstance(value, int) and 0 <= value < 2 ** 64,
             f"--{name.replace('_', '-')} must be a whole number 0 or more and below 2^64, got {value}")
    need(c.width >= 1, f"--width must be at least 1, got {c.width}")
    need(c.batch_size >= 2, f"--batch-size must be at least 2 (BatchNorm needs a batch), got {c.batch_size}")
    need(c.init_scale is None or (math.isfinite(c.init_scale) and c.init_scale > 0),
         f"--init-scale must be positive, got {c.init_scale}")
    if c.subset is not None:
        need(0 < c.subset <= 1 or (c.subset > 1 and float(c.subset).is_integer()),
             f"--subset must be a fraction in (0, 1] or a whole count of images, got {c.subset:g}")
    need(c.iters is not None or c.epochs is not None, "give --epochs or --iters")
    need(c.iters is None or c.iters >= 1, f"--iters must be at least 1, got {c.iters}")
    need(c.epochs is None or c.epochs >= 1, f"--epochs must be at least 1, got {c.epochs}")
    need(c.eval_every is None or c.eval_every >= 1, f"--eval-every must be at least 1, got {c.eval_every}")
    need(c.keep is None or c.keep >= 1, f"--keep must be at least 1, got {c.keep}")


def parse_subset(text):
    """'0.1' -> 0.1 (a fraction), '5000' -> 5000.0 (a count); None stays None."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise SphrunError(f"--subset must be a fraction like 0.1 or a count like 5000, got {text!r}")
    return value


def evaluation_steps(origin, total, steps_per_epoch, eval_every=None):
    """Steps at which a run starting at `origin` and ending at `total` is evaluated.

    Log-spaced by default: every epoch for the first 10 epochs, then about 10 points per decade of
    epochs (13, 16, 20, 25, 32, ...), and always the last step. `eval_every` steps otherwise.
    """
    if eval_every:
        offsets = range(0, total - origin, eval_every)
    else:
        epochs, k = list(range(11)), 1
        while epochs[-1] * steps_per_epoch < total - origin:
            epochs.append(max(epochs[-1] + 1, round(10 ** (1 + k / 10))))
            k += 1
        offsets = [e * steps_per_epoch for e in epochs]
    return sorted({origin + o for o in offsets if origin + o < total} | {total})
