"""Passes that fit the device: without --pack, how many models a pass packs on a GPU, from its free
memory and the measured footprint of one model, and a pass that runs out of memory at its start
trained again in halves.

A pass of K models holds about K times one model's footprint: its weights and step state, the
activations of a training step, which the captured step keeps in its CUDA graph's memory pool for the
whole pass, and beside them those of an evaluation batch or an eager step. The footprint is measured
on one model (a training step, an evaluation batch); K of them overstate a pack of K a little (each
counts the fixed costs), and a pack that does not fit anyway is halved.

On the CPU every model of a data seed trains in one pass, as before: the CPU form runs the models one
after another, so a pack's transient memory is one model's, not K models'.
"""

import torch

from sphrun.lifecycle import prepare
from sphrun.metrics import EVALUATION_BATCH, eval_metrics
from sphrun.packed import TrainingStep, free_unused_memory, mixed_precision, pack_models
from sphrun.progress import message
from sphrun.sphere import global_norm

SHARE = 0.9  # of the free memory: cuDNN's workspaces and the allocator's fragmentation take the rest
GiB, MiB = 2 ** 30, 2 ** 20


def pass_size(members, data, device, pack):
    """Models per pass: `pack` when given (or on the CPU, all of them); otherwise what fits the GPU's
    free memory at the measured footprint of one model. Returns it and the words for the
    announcement ('' unless memory limits the pass)."""
    if pack is not None or device.type != "cuda" or len(members) < 2:
        return pack or max(len(members), 1), ""
    each = footprint(members[0].config, data, device)
    free, _ = torch.cuda.mem_get_info(device)
    fitting = max(1, int(SHARE * free // each))
    if fitting >= len(members):
        return len(members), ""
    return fitting, (f", {fitting} per pass: what fits {free / GiB:.1f} GiB free at {each / MiB:.0f} MiB per model "
                     f"(measured; --pack K to choose)")


def footprint(config, data, device):
    """Device bytes one model of `config` takes in a pass, measured with a pack of one: what stays
    (weights, step state), the activations of one training step twice (the captured step's memory pool
    holds them all along, and an eager step or the check of the graph's first replay as much again),
    or once and those of an evaluation batch, whichever is more."""
    free_unused_memory()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    _, model, params, order = prepare(config, device, data)
    step = TrainingStep(pack_models([model], config.sphere, device), data, [config], [global_norm(params).item()],
                        device)
    step.idx.copy_(order.indices(0))
    step.eager()
    stepping = torch.cuda.max_memory_allocated(device) - base
    held = torch.cuda.memory_allocated(device) - base
    torch.cuda.reset_peak_memory_stats(device)
    batch = min(len(data.test_y), EVALUATION_BATCH)
    with mixed_precision(config.precision, device):
        eval_metrics(step.pack, data.test_x[:batch], data.test_y[:batch], config.loss, batch)
    evaluating = torch.cuda.max_memory_allocated(device) - base
    del model, params, step
    free_unused_memory()
    return stepping + max(stepping, evaluating) - held


def halving_on_oom(train, group):
    """train(group), a pass; when the device runs out of memory before the pass saved anything past its
    start (at its first steps, or its first evaluation beside the captured step), one note, and the
    first half trained instead (halved again if need be) from where it started. Returns the pass that
    trained and the members left, in groups of the size that fit: the next passes."""
    trained, size, left = fitted(train, group)
    return trained, [left[i:i + size] for i in range(0, len(left), size)]


def fitted(train, group):
    """halving_on_oom's work: the pass that trained, how many models it packed, and the members left."""
    try:
        return train(group), len(group), []
    except torch.cuda.OutOfMemoryError as e:
        if len(group) == 1 or any(saved_past_start(m) for m in group):
            raise
        reason = ". ".join(str(e).strip().split(". ")[:2]).rstrip(".") or "out of memory"  # what, and how much
    free_unused_memory()  # outside the except block, whose traceback held the pass's tensors
    half = (len(group) + 1) // 2
    message(f"note: {len(group)} models packed ran out of device memory at the start of their pass ({reason}); "
            f"training them {half} at a time")
    trained, size, left = fitted(train, group[:half])
    return trained, size, left + group[half:]


def saved_past_start(member):
    """Whether the member's run has a metrics row past the step its pass started from."""
    return any(row["iter"] > member.begins_at for row in member.run.read_metrics())
