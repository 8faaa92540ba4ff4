"""A run's life outside the loop: its device, its state at a step, its settings checks, its config.json
record, and rebuilding a saved run at a checkpoint.

A run's state at a step is everything its future depends on: the weights and BatchNorm buffers, the
step count, rho0, and what the next metrics row needs (the weights at init and at the previous
evaluation point, the projection error accumulated since then). The batch order is a pure function of
(data seed, step), so no random state has to be saved, and evaluation never touches this state.
"""

import dataclasses
import sys
from dataclasses import dataclass

import torch

from sphrun import SphrunError, __version__
from sphrun.config import TrainConfig
from sphrun.data import BatchOrder, load_data
from sphrun.models import build_model, trainable_scale_invariant
from sphrun.progress import message
from sphrun.rundir import RunDir
from sphrun.sphere import global_norm


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SphrunError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SphrunError(f"--device {name}: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise SphrunError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


@dataclass
class RunState:
    iter: int
    rho0: float
    theta_init: list
    theta_prev: list
    proj_err_sum: torch.Tensor  # sum of 1 - r over the steps since the previous evaluation point
    proj_err_steps: int
    wall_s: float
    optimizer: dict | None = None  # off the sphere: the SGD state_dict (momentum buffers), None before a step

    def checkpoint(self, model, elr, optimizer=None):
        if optimizer is not None:
            self.optimizer = optimizer.state_dict()
        ckpt = {"iter": self.iter, "elr": elr, "rho0": self.rho0, "model": model.state_dict(),
                "theta_init": self.theta_init, "theta_prev": self.theta_prev,
                "proj_err_sum": self.proj_err_sum, "proj_err_steps": self.proj_err_steps,
                "wall_s": self.wall_s}
        if self.optimizer is not None:
            ckpt["optimizer"] = self.optimizer
        return ckpt

    @classmethod
    def from_checkpoint(cls, ckpt, model, params, path):
        try:
            model.load_state_dict(ckpt["model"])
            device = params[0].device
            to_device = lambda ts: [t.to(device) for t in ts]
            return cls(int(ckpt["iter"]), float(ckpt["rho0"]), to_device(ckpt["theta_init"]),
                       to_device(ckpt["theta_prev"]), ckpt["proj_err_sum"].to(device),
                       int(ckpt["proj_err_steps"]), float(ckpt["wall_s"]), ckpt.get("optimizer"))
        except (KeyError, RuntimeError, AttributeError, TypeError) as e:
            raise SphrunError(f"{path} does not fit this model ({type(e).__name__})")


@dataclass
class Start:
    """Where a new fine-tune begins: its parent's checkpoint, the parent's metrics row at that step (None
    when the checkpoint is off its evaluation points) and the `parent` record for config.json."""
    checkpoint: dict
    path: str
    row: dict | None
    parent: dict


def fresh_state(params):
    theta = [p.detach().clone() for p in params]
    return RunState(0, global_norm(params).item(), theta, theta,
                    torch.zeros((), device=params[0].device), 0, 0.0)


def prepare(config, device, data=None):
    """Data, model, its trainable parameters and batch order of a configuration; on the sphere the
    trainable parameters are checked scale-invariant. `data`: the data set, when already loaded."""
    if data is None:
        data = load_data(config.dataset, config.data_dir, config.subset, device)
    model = build_model(config.model, config.width, data.num_classes, config.init_scale,
                        config.seed, config.head_seed, sphere=config.sphere).to(device)
    if config.sphere:
        params = trainable_scale_invariant(model)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    order = BatchOrder(len(data.train_y), config.batch_size, config.data_seed, device)
    return data, model, params, order


def total_steps(config, steps_per_epoch):
    """The step a run ends at: its length (--iters, or --epochs) counted on from its origin."""
    length = config.iters if config.iters is not None else config.epochs * steps_per_epoch
    return config.origin + length


def run_record(config, data, order, rho0, argv, parent=None):
    """config.json's content for a new run."""
    return {"command": "finetune" if parent else "train", "settings": config.to_dict(),
            "data_source": data.source, "num_classes": data.num_classes, "train_size": len(data.train_y),
            "test_size": len(data.test_y),
            "steps_per_epoch": order.steps_per_epoch, "rho0": rho0, "parent": parent, "status": "running",
            "elr_meaning": ("effective learning rate on the unit sphere: lr = elr * rho0^2" if config.sphere else
                            "plain SGD learning rate (trained off the sphere): settings.elr and the elr "
                            "column hold lr"),
            "versions": {"sphrun": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
            "argv": list(argv)}


def read_settings(run):
    """A run's config.json and its settings as a TrainConfig."""
    stored = run.read_config()
    try:
        return stored, TrainConfig.from_dict(stored["settings"])
    except (SphrunError, TypeError) as e:
        raise SphrunError(f"{run.config_path} has unusable settings: {e}")


def check_same_run(run, config):
    """Refuse to continue a run directory that holds another configuration (length aside)."""
    stored, settings = read_settings(run)
    theirs = settings.identity()
    ours = config.identity()
    differing = [k for k in ours if ours[k] != theirs.get(k)]
    if differing:
        detail = ", ".join(f"{k}={theirs.get(k)!r} there, {ours[k]!r} here" for k in differing)
        raise SphrunError(f"{run} holds a run of another configuration ({detail}); "
                          f"choose another --out or repeat its settings")
    return stored


def default_run_path(config):
    return f"runs/{config.default_run_name()}"


def nothing_left(run, stored, config, at, total):
    """The status of an existing run (`stored`: its config.json) at step `at` that has nothing left to do
    on the way to step `total` (done, or diverged), after saying so; None when it has. A run already
    past `total` is refused."""
    if stored["status"] == "diverged":
        message(f"{run} diverged earlier; nothing to do")
        return "diverged"
    if at > total:
        raise SphrunError(f"{run} is already at step {at}, past the {total} steps asked; "
                          f"ask for more steps to extend it")
    if at == total and stored["status"] == "done":
        message(f"{run} is complete ({total - config.origin} steps); "
                f"ask for more --epochs or --iters to extend it")
        return "done"
    return None


def restore(path, which="last", device="cpu", data_dir=None):
    """Rebuild a saved run at one of its checkpoints: (run, config, data, model, params, order, state).

    `which` is "last" or a step with a checkpoint; `data_dir` overrides the stored one (the run may have
    been made in another working directory).
    """
    run = RunDir(path)
    _, config = read_settings(run)
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=data_dir)
    checkpoint = run.load_checkpoint(which)
    data, model, params, order = prepare(config, resolve_device(device) if isinstance(device, str) else device)
    state = RunState.from_checkpoint(checkpoint, model, params, run.checkpoint_path(which))
    return run, config, data, model, params, order, state
