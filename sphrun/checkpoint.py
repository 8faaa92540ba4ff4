"""A run's state at one step, as RUN/checkpoints/*.pt holds it: one type, converted to and from the file here.

The file is a dict of tensors, numbers and strings (torch.load reads it with weights_only=True). Besides
what resuming needs (sphrun.lifecycle.RunState), it carries the settings it was trained under: the run key
of its TrainConfig (every setting that fixes the trajectory), so that a checkpoint explains itself, as
nanoGPT's carries its config, and a config.json edited by hand is caught (RunDir.read_checkpoint).
Checkpoints written before sphrun 0.2 have no settings and are taken on trust.
"""

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch

REQUIRED = ("iter", "elr", "rho0", "model", "theta_init", "theta_prev", "proj_err_sum", "proj_err_steps", "wall_s")


@dataclass
class Checkpoint(Mapping):
    """A checkpoint's fields; it also reads as the file's dict (checkpoint["model"], .keys()), for scripts
    written against the file."""

    iter: int  # SGD steps from the start of the lineage
    elr: float  # the ELR of the step that led here (off the sphere: the plain learning rate)
    rho0: float  # the joint norm of the SI weights at init: the sphere's radius
    model: dict  # the model's state_dict (for a member of a pack, its single model's)
    theta_init: list  # the trainable tensors at init, for cos_init
    theta_prev: list  # ... at the previous evaluation point, for cos_prev
    proj_err_sum: torch.Tensor  # sum of 1 - r over the steps since then
    proj_err_steps: int
    wall_s: float
    momentum: list | None = None  # off the sphere: SGD's momentum buffers
    settings: dict | None = None  # TrainConfig.run_key() of the run it belongs to; None before sphrun 0.2

    def to_file(self):
        """The dict torch.save writes (fields that are None left out, as older files have them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def __getitem__(self, key):
        return self.to_file()[key]

    def __iter__(self):
        return iter(self.to_file())

    def __len__(self):
        return len(self.to_file())

    @classmethod
    def from_file(cls, stored):
        """The checkpoint a file's dict holds; ValueError when it is not one of sphrun's."""
        if not isinstance(stored, dict) or any(key not in stored for key in REQUIRED):
            raise ValueError("not a sphrun checkpoint")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known})

    def settings_differing(self, settings):
        """The settings (a config.json's "settings") this checkpoint was not trained under, as
        'elr=0.001 here, 0.01 there' phrases; none for a checkpoint that does not say."""
        if self.settings is None:
            return []
        return [f"{k}={v!r} in the checkpoint, {settings[k]!r} in config.json" for k, v in self.settings.items()
                if k in settings and settings[k] != v]
