"""Losses, errors, the mean mini-batch gradient norm GM and cosines between checkpoints.

Train metrics use BatchNorm in train mode (batch statistics), test metrics eval mode (running
statistics), as the paper. Measuring never changes the model: BatchNorm buffers are restored and
gradients are taken with autograd.grad, so .grad is never touched.
"""

import contextlib

import torch
import torch.nn.functional as F


def batch_loss(logits, targets, loss):
    """Mean loss over the batch. mse is the squared error to the one-hot target, averaged over classes
    (the authors' code and PAPER.md §1; the summed form at elr x equals this one at elr C*x)."""
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


def train_metrics(model, params, x, y, loss, batch_size, order):
    """(train loss, train error, GM) over the whole set in BN train mode, one backward per batch.

    Batches are consecutive slices of `order` (a fixed permutation, so batches mix classes);
    GM is the mean over batches of ||grad_params L_b|| (PAPER.md §2).
    """
    total_loss = torch.zeros((), device=x.device)
    wrong = torch.zeros((), device=x.device)
    grad_norms = []
    with preserved_bn_state(model):
        model.train()
        for idx in order.split(batch_size):
            logits = model(x[idx])
            value = batch_loss(logits, y[idx], loss)
            grads = torch.autograd.grad(value, params)
            grad_norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
            total_loss += value.detach() * len(idx)
            wrong += (logits.argmax(1) != y[idx]).sum()
    n = len(order)
    return (total_loss / n).item(), (wrong / n).item(), torch.stack(grad_norms).mean().item()


@torch.no_grad()
def eval_metrics(model, x, y, loss, batch_size=1000):
    """(loss, error) in BN eval mode, i.e. with the running statistics."""
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), device=x.device)
    wrong = torch.zeros((), device=x.device)
    for start in range(0, len(x), batch_size):
        logits = model(x[start:start + batch_size])
        targets = y[start:start + batch_size]
        total_loss += batch_loss(logits, targets, loss) * len(targets)
        wrong += (logits.argmax(1) != targets).sum()
    model.train(was_training)
    return (total_loss / len(x)).item(), (wrong / len(x)).item()


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def cosine(a, b):
    """Cosine similarity of two parameter lists taken as single vectors."""
    return F.cosine_similarity(flat(a), flat(b), dim=0).item()
