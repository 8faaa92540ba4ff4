"""Losses, errors, the mean mini-batch gradient norm GM and cosines between checkpoints.

Train metrics use BatchNorm in train mode (batch statistics), test metrics eval mode (running
statistics), as the paper. Train metrics are over the full batches of a fixed permutation, the batch
shape training uses. Measuring never changes the model: BatchNorm buffers are restored and gradients
are taken with autograd.grad, so .grad is never touched.
"""

import contextlib

import torch
import torch.nn.functional as F

from sphrun.sphere import BATCHED, EACH, global_norm


def batch_loss(logits, targets, loss, members=EACH):
    """Mean loss over the batch. mse is the squared error to the one-hot target, averaged over classes
    (the authors' code and docs/science.md, Losses; the summed form at elr x equals this one at elr C*x).

    Logits (B, K, C) of K packed models (sphrun.packed) give their K losses: model by model as for one
    model (members EACH), or all K at once (BATCHED: the per-image losses, then their means)."""
    if logits.dim() == 3 and members == BATCHED:
        batch, k, classes = logits.shape
        if loss == "ce":
            per_image = F.cross_entropy(logits.reshape(batch * k, classes), targets.repeat_interleave(k),
                                        reduction="none")
            return per_image.view(batch, k).mean(0)
        one_hot = F.one_hot(targets, classes).to(logits.dtype)
        return (logits - one_hot[:, None]).square().mean((0, 2))
    if logits.dim() == 3:
        return torch.stack([batch_loss(logits[:, k], targets, loss) for k in range(logits.shape[1])])
    if loss == "ce":
        return F.cross_entropy(logits, targets)
    one_hot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
    return F.mse_loss(logits, one_hot)


@contextlib.contextmanager
def preserved_bn_state(model):
    """Run a train-mode pass without leaving a trace in BatchNorm running statistics."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        model.train(was_training)


@contextlib.contextmanager
def tf32(allowed):
    """CUDA convolutions and matrix products in TF32 (10-bit mantissa) or, allowed False, in full float32
    for the duration; the previous flags are restored after. No effect on the CPU."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def full_batches(order, batch_size):
    """Consecutive batches of `order` as training cuts an epoch: full ones only. The len(order) mod
    batch_size leftover images are dropped, as training drops them: a batch of a few images has
    BatchNorm statistics, hence a loss and gradient, that training never sees."""
    return order[:len(order) // batch_size * batch_size].split(batch_size)


def errors(logits, targets):
    """Misclassified images in the batch: a 0-d count, or K counts for packed logits (B, K, C)."""
    return (logits.argmax(-1) != targets.view(-1, *[1] * (logits.dim() - 2))).sum(0)


def train_metrics(model, params, x, y, loss, batch_size, order):
    """(train loss, train error, GM) over the full batches of `order` in BN train mode, one backward
    per batch.

    `order` is a fixed permutation (so batches mix classes), cut by full_batches; loss and error are
    means over the images of those batches, GM the mean over them of ||grad_params L_b|| (docs/science.md, What is measured).
    A packed model of K models (logits (B, K, C), parameters packed along their first dimension) gives
    three lists of K values.
    """
    total_loss = torch.zeros((), device=x.device)
    wrong = torch.zeros((), device=x.device)
    grad_norms = []
    batches = full_batches(order, batch_size)
    form = getattr(model, "form", EACH)  # a pack's (sphrun.packed), for its K models
    with preserved_bn_state(model):
        model.train()
        for idx in batches:
            logits = model(x[idx])
            members = form if logits.dim() == 3 else False
            value = batch_loss(logits, y[idx], loss, members)
            grads = torch.autograd.grad(value.sum(), params)  # packed models are independent: the sum separates
            grad_norms.append(global_norm(grads, members))
            total_loss = total_loss + value.detach() * len(idx)
            wrong = wrong + errors(logits, y[idx])
    n = len(batches) * batch_size
    return (total_loss / n).tolist(), (wrong / n).tolist(), torch.stack(grad_norms, dim=-1).mean(-1).tolist()


EVALUATION_BATCH = 1000  # images per forward in BN eval mode (no gradient: no activations kept)


@torch.no_grad()
def eval_metrics(model, x, y, loss, batch_size=EVALUATION_BATCH):
    """(loss, error) in BN eval mode, i.e. with the running statistics; lists of K for a packed model."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=x.device)
    wrong = torch.zeros((), device=x.device)
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        targets = y[start:start + batch_size]
        total_loss = total_loss + batch_loss(logits, targets, loss) * len(targets)
        wrong = wrong + errors(logits, targets)
    model.train(was_training)
    return (total_loss / len(x)).tolist(), (wrong / len(x)).tolist()


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def cosine(a, b):
    """Cosine similarity of two parameter lists taken as single vectors."""
    return F.cosine_similarity(flat(a), flat(b), dim=0).item()
