"""A run's life outside the loop: its device, its state at a step, its settings checks, its config.json
record, and rebuilding a saved run at a checkpoint.

A run's state at a step is everything its future depends on: the weights and BatchNorm buffers, the
step count, rho0, and what the next metrics row needs (the weights at init and at the previous
evaluation point, the projection error accumulated since then). The batch order is a pure function of
(data seed, step), so no random state has to be saved, and evaluation never touches this state.
"""

import dataclasses
import hashlib
import os
import sys
from dataclasses import dataclass

import torch

from sphrun import SphrunError, __version__, noise
from sphrun.checkpoint import Checkpoint
from sphrun.config import TrainConfig, evaluation_steps
from sphrun.data import BatchOrder, load_data
from sphrun.files import outermost_missing
from sphrun.models import build_model, trainable_scale_invariant
from sphrun.progress import message
from sphrun.rundir import RunDir, Status, check_run_location
from sphrun.sphere import global_norm


def use_device(name):
    """The device that --device names (auto, cpu, cuda or cuda:N), checked against what this machine
    has and set up for use. A CUDA device comes with its index (cuda and auto name the current one)
    and becomes the current device: streams and CUDA graphs work on the current device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SphrunError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        raise SphrunError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SphrunError(f"--device {name}: no CUDA device is available here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise SphrunError(f"--device {name}: this machine has {count} CUDA device(s), cuda:0 to "
                              f"cuda:{count - 1}")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


@dataclass
class RunState:
    """One run's state besides its model's (weights and BatchNorm buffers): see the module's docstring."""
    iter: int
    rho0: float
    theta_init: list
    theta_prev: list
    proj_err_sum: torch.Tensor  # sum of 1 - r over the steps since the previous evaluation point
    proj_err_steps: int
    wall_s: float
    momentum: list | None = None  # off the sphere: SGD's momentum buffers, shaped like the weights

    def checkpoint(self, model_state, elr, settings):
        """The Checkpoint of this state with the model's `model_state`, the ELR of the step that led here
        and the run key of the settings it trains under."""
        return Checkpoint(self.iter, elr, self.rho0, model_state, self.theta_init, self.theta_prev,
                          self.proj_err_sum, self.proj_err_steps, self.wall_s, self.momentum, settings)

    @classmethod
    def from_checkpoint(cls, checkpoint, model, params, path):
        """The state saved in `checkpoint` (read from `path`), its weights loaded into `model`."""
        try:
            model.load_state_dict(checkpoint.model)
            device = params[0].device
            to_device = lambda ts: [t.to(device) for t in ts]
            return cls(int(checkpoint.iter), float(checkpoint.rho0), to_device(checkpoint.theta_init),
                       to_device(checkpoint.theta_prev), checkpoint.proj_err_sum.to(device),
                       int(checkpoint.proj_err_steps), float(checkpoint.wall_s),
                       None if checkpoint.momentum is None else to_device(checkpoint.momentum))
        except (KeyError, RuntimeError, AttributeError, TypeError) as e:
            raise SphrunError(f"{path} does not fit this model ({type(e).__name__})")


@dataclass
class Start:
    """Where a new fine-tune begins: its parent's checkpoint, the parent's metrics row at that step (None
    when the checkpoint is off its evaluation points) and the `parent` record for config.json."""
    checkpoint: Checkpoint
    path: str
    row: dict | None
    parent: dict
    data: dict | None = None  # the parent's data identity (config.json "data"), None for older runs


def fresh_state(params):
    theta = [p.detach().clone() for p in params]
    return RunState(0, global_norm(params).item(), theta, theta,
                    torch.zeros((), device=params[0].device), 0, 0.0)


def load_run_data(config, device):
    """The data set of `config` on `device` (channels_last on CUDA, stored so once) and its identity
    (data_identity)."""
    data = load_data(config.dataset, config.data_dir, config.subset, "cpu")
    data_id = data_identity(data)
    data = data.to(device)
    if device.type == "cuda":
        data.train_x = data.train_x.contiguous(memory_format=torch.channels_last)
        data.test_x = data.test_x.contiguous(memory_format=torch.channels_last)
    return data, data_id


def data_identity(data):
    """What a run's images are, for config.json: sizes, images per class and a digest of every image
    and label (the normalized tensors, train and test; about a second for all of CIFAR-10)."""
    digest = hashlib.blake2b(digest_size=16)
    for t in (data.train_x, data.train_y, data.test_x, data.test_y):
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return {"train_size": len(data.train_y), "test_size": len(data.test_y),
            "train_per_class": torch.bincount(data.train_y, minlength=data.num_classes).tolist(),
            "fingerprint": digest.hexdigest()}


def data_difference(ours, theirs):
    """How two data identities differ, in words, or None when they are the same data (or one is unknown)."""
    if not ours or not theirs:
        return None
    for key in ("train_size", "test_size", "train_per_class"):
        if ours.get(key) != theirs.get(key):
            return f"{key.replace('_', ' ')} {theirs.get(key)} there, {ours.get(key)} here"
    if ours.get("fingerprint") != theirs.get("fingerprint"):
        return "the same sizes but other images"
    return None


def prepare(config, device, data=None):
    """Data, model, its trainable parameters and batch order of a configuration; on the sphere the
    trainable parameters are checked scale-invariant. `data`: the data set, when already loaded."""
    if data is None:
        data, _ = load_run_data(config, device)
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


def run_record(config, data, data_id, order, rho0, argv, parent=None):
    """config.json's content for a new run; `data_id`: its data's identity (data_identity). A random-step run
    names the generator of its directions (sphrun.noise), which its resumes must share."""
    random = {"random_directions": noise.GENERATOR} if config.step == "random" else {}
    return {"command": "finetune" if parent else "train", "settings": config.to_dict(), **random,
            "data_source": data.source, "num_classes": data.num_classes, "train_size": len(data.train_y),
            "test_size": len(data.test_y), "data": data_id,
            "steps_per_epoch": order.steps_per_epoch, "rho0": rho0, "parent": parent, "status": Status.RUNNING,
            "elr_meaning": ("effective learning rate on the unit sphere: lr = elr * rho0^2" if config.sphere else
                            "plain SGD learning rate (trained off the sphere): settings.elr and the elr "
                            "column hold lr"),
            "versions": {"sphrun": __version__, "torch": torch.__version__, "python": sys.version.split()[0]},
            "argv": list(argv)}


def read_settings(run):
    """A run's config.json and its settings as a TrainConfig. Its metrics.csv is read too, so that every
    command that reads a run (resume, extend, finetune, connect, curvature) refuses a damaged history."""
    stored = run.read_config()
    try:
        config = TrainConfig.from_dict(stored["settings"])
    except (SphrunError, TypeError) as e:
        raise SphrunError(f"{run.config_path} has unusable settings: {e}")
    run.read_metrics()
    return stored, config


def check_same_run(run, config):
    """Refuse to continue a run directory that holds another configuration (length aside); returns its
    config.json."""
    stored, settings = read_settings(run)
    theirs = settings.run_key()
    ours = config.run_key()
    differing = [k for k in ours if ours[k] != theirs.get(k)]
    if differing:
        detail = ", ".join(f"{k}={theirs.get(k)!r} there, {ours[k]!r} here" for k in differing)
        raise SphrunError(f"{run} holds a run of another configuration ({detail}); "
                          f"choose another --out or repeat its settings")
    if config.step == "random" and stored.get("random_directions") != noise.GENERATOR:
        raise SphrunError(f"{run} took its random steps along the directions of an earlier sphrun, which this "
                          f"version draws otherwise: finish it with the sphrun that started it, or train it "
                          f"anew in another --out")
    return stored


def check_same_data(run, stored, data_id):
    """Refuse to resume or extend a run on other data than its own (`data_id`: the data's identity)."""
    difference = data_difference(data_id, stored.get("data"))
    if difference:
        raise SphrunError(f"{run} was trained on other data ({difference}; it used "
                          f"{stored.get('data_source')}): point --data-dir at its data, or choose another --out")


def default_run_path(config):
    return f"runs/{config.default_run_name()}"


def nothing_left(run, stored, config, at, total):
    """(status, the line that says so) of an existing run (`stored`: its config.json) at step `at` that
    has nothing left to do on the way to step `total` (done, or diverged); None when it has. A run
    already past `total` is refused."""
    if stored["status"] == Status.DIVERGED:
        return Status.DIVERGED, f"{run} diverged earlier; nothing to do"
    if at > total:
        raise SphrunError(f"{run} is already at step {at}, past the {total} steps asked; "
                          f"ask for more steps to extend it")
    if at == total:  # done, or stopped at its last step before it could say so
        return Status.DONE, (f"{run} is complete ({total - config.origin} steps); "
                        f"ask for more --epochs or --iters to extend it")
    return None


def restore(path, which="last", device="cpu", data_dir=None, other_data=False):
    """Rebuild a saved run at one of its checkpoints: (run, config, data, model, params, order, state).

    `which` is "last" or a step with a checkpoint; `data_dir` overrides the stored one (the run may have
    been made in another working directory). Data other than the run's is refused unless `other_data`.
    """
    run = RunDir(path)
    stored, config = read_settings(run)
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=data_dir)
    checkpoint = run.load_checkpoint(which)
    device = use_device(device) if isinstance(device, str) else device
    data, data_id = load_run_data(config, device)
    difference = data_difference(data_id, stored.get("data"))
    if difference and not other_data:
        raise SphrunError(f"{run} was trained on other data ({difference}; it used "
                          f"{stored.get('data_source')}): point --data-dir at its data, or pass --other-data "
                          f"to go on with these")
    if difference:
        message(f"note: {run} was trained on other data ({difference}); going on with these (--other-data)")
    data, model, params, order = prepare(config, device, data)
    state = RunState.from_checkpoint(checkpoint, model, params, run.checkpoint_path(which))
    return run, config, data, model, params, order, state


@dataclass
class Member:
    """One run of a pass of the loop: its settings, run directory, where it starts (its own checkpoint,
    a parent's for a new fine-tune, or its init) and, once packed, its state."""
    config: TrainConfig
    run: RunDir
    start: Start | None = None  # a new fine-tune's parent checkpoint
    stored: dict | None = None  # config.json of an existing run with a checkpoint to resume from
    checkpoint: Checkpoint | None = None  # that checkpoint (last.pt, or the newest sound one)
    status: Status = Status.RUNNING  # running while it has work to do, else the run's status
    state: RunState | None = None
    note: str | None = None  # what the command does with it, said once every run passed its checks

    @property
    def begins_at(self):
        return self.checkpoint.iter if self.checkpoint else self.config.origin

    def load_state(self, model, params):
        """Load `model` (the member's, freshly built) where the member begins, and set its RunState."""
        if self.checkpoint:
            self.state = RunState.from_checkpoint(self.checkpoint, model, params, self.run.checkpoint_dir)
        elif self.start:
            self.state = RunState.from_checkpoint(self.start.checkpoint, model, params, self.start.path)
        else:
            self.state = fresh_state(params)

    def config_record(self, data, data_id, order, argv):
        """config.json's content for this member as a new run."""
        parent = self.start.parent if self.start else None
        return run_record(self.config, data, data_id, order, self.state.rho0, argv, parent)


def open_member(config, path, total, start=None, steps_per_epoch=None):
    """The run of `config` in `path` (checked by check_same_run): new, to resume or extend, or with
    nothing left to do. Reads only: every refusal comes before anything is written.

    It resumes from its last checkpoint, or the newest sound one (RunDir.resume_point), after checking
    that metrics.csv has every row up to there. A directory whose run stopped before its first
    checkpoint (killed, or a crash in its first evaluation) holds nothing worth keeping: it starts again
    from its beginning."""
    member = Member(config, RunDir(path), start=start)
    run = member.run
    if run.exists():
        stored = run.read_config()
        checkpoint, member.note = run.resume_point(config.origin)
        if checkpoint is not None:
            member.stored, member.checkpoint = stored, checkpoint
            ended = nothing_left(run, stored, config, member.begins_at, total)
            if ended:
                member.status, member.note = ended
            else:
                run.check_rows(evaluation_steps(config.origin, total, steps_per_epoch, config.eval_every),
                               member.begins_at)
        else:
            member.note = f"{run} stopped before its first checkpoint: starting it again from its beginning"
    elif os.path.exists(run.metrics_path) or run.checkpoint_iters() or run.has_checkpoint("last"):
        raise SphrunError(f"{run} holds a run's metrics or checkpoints but no config.json: restore it from a "
                          f"copy, or choose another --out")
    return member


@dataclass
class Runs:
    """The runs of one command, opened: members, their data (on the device) and its identity, a batch
    order per data seed, the step they all train to, and the device."""
    members: list
    data: object
    data_id: dict  # the data's identity (data_identity)
    orders: dict
    total: int
    device: torch.device
    made: list  # (directory, outermost folder made for it) of runs new to this command (remove_unstarted)


def open_runs(configs, paths, locks, start=None):
    """Open the runs of `configs` (alike but for ELR and seeds) in `paths`, each locked into `locks` (an
    ExitStack) before anything of it is read, so that of two launches however close only one trains it:
    every directory is checked against its settings before the data is loaded, and against the data and
    its own files after, before anything is written. `start`: a new fine-tune's parent checkpoint."""
    first = configs[0]
    device = use_device(first.device)
    made = []  # directories this command made to lock them: removed again when a check refuses
    try:
        for config, path in zip(configs, paths):
            check_run_location(path)
            outermost_new = outermost_missing(path)
            locks.enter_context(RunDir(path).lock())  # makes the directory; refused while another holds it
            if outermost_new:  # only the lock's holder may remove what it made
                made.append((path, outermost_new))
            if RunDir(path).exists():
                check_same_run(RunDir(path), config)
        data, data_id = load_run_data(first, device)
        orders = {c.data_seed: BatchOrder(len(data.train_y), c.batch_size, c.data_seed, device) for c in configs}
        total = total_steps(first, orders[first.data_seed].steps_per_epoch)
        members = [open_member(c, p, total, start, orders[c.data_seed].steps_per_epoch)
                   for c, p in zip(configs, paths)]
        for m in members:
            if m.stored:
                check_same_data(m.run, m.stored, data_id)
            elif m.start and data_difference(data_id, m.start.data):
                m.note = (f"note: {m.start.parent['run']} was trained on other data "
                          f"({data_difference(data_id, m.start.data)}); the fine-tune goes on with these")
    except BaseException:
        remove_unstarted(made)
        raise
    return Runs(members, data, data_id, orders, total, device, made)


def remove_unstarted(made):
    """Remove the directories (path, outermost folder made for it) a command made to lock runs it then
    never started: a refusal, or a stop before their pass."""
    for path, outermost_new in made:
        if not RunDir(path).exists():
            RunDir(path).remove_if_empty(up_to=outermost_new)
