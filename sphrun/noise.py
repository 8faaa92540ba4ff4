"""Random numbers from counters, in tensor ops: the random-step Gaussians and the curvature probes.

A draw is a pure function of its counters, (seed, stream, step or batch, element index), hashed by a
32-bit integer hash, so there is no generator state: nothing is drawn on the host or copied to the
device, a CUDA graph replays the draw (a step's counter is a device tensor the step advances), and
every device computes the same integers, hence the same Gaussians up to the rounding of log, sqrt, cos
and sin. A run resumed on another device walks on along the same directions.

The hash is Thomas Mueller's (x ^= x >> 16; x *= 0x45d9f3b; twice; x ^= x >> 16), a bijection of
32-bit values with full avalanche. It runs in int64 on values under 2^32 with a multiplier under 2^27,
so no product overflows. Counters are folded in one 32-bit word at a time. Gaussians come by
Box-Muller from pairs of 24-bit uniforms in (0, 1), which cuts their tails at 5.9 sigma (a draw beyond
has probability 4e-9); Rademacher signs are the hash's top bit.
"""

import math

import torch

MASK = 0xFFFFFFFF
MULTIPLIER = 0x45D9F3B
# Stream names keep the draws of different uses apart (ASCII of "rand", "prob").
RANDOM_STEP = 0x72616E64
PROBE = 0x70726F62


def mix(x):
    """The 32-bit hash of x: a Python int or an int64 tensor, values in [0, 2^32)."""
    x = ((x >> 16) ^ x) * MULTIPLIER & MASK
    x = ((x >> 16) ^ x) * MULTIPLIER & MASK
    return (x >> 16) ^ x


def key(*counters):
    """One 32-bit key from counters, ints in [0, 2^64), folded in two 32-bit words each."""
    h = 0
    for c in counters:
        for word in (c & MASK, (c >> 32) & MASK):
            h = mix(h ^ word)
    return h


def key_at(base, step):
    """The key of step `step` (under 2^32) in the stream of key `base`: ints, or int64 tensors (K base
    keys of a pack, the step a device counter), so that a CUDA graph computes it."""
    return mix(base ^ (step & MASK))


def element_keys(count, device):
    """The hashes of the element indices 0 .. count - 1 (computed once, reused by every draw)."""
    return mix(torch.arange(count, dtype=torch.int64, device=device))


def bits(elements, keys):
    """32-bit random words, one per (key, element): keys (K,) or a number, elements (n,)."""
    if torch.is_tensor(keys) and keys.dim() == 1:
        keys = keys[:, None]
    return mix(elements ^ keys)


def uniform(words):
    """Uniforms in (0, 1) from the top 24 bits of each word (exact in float32, never 0 or 1)."""
    return ((words >> 8).float() + 0.5) * 2.0 ** -24


def gaussian(elements, keys, count):
    """Standard normal draws, (K, count) for K keys (or (count,) for one), by Box-Muller over pairs of
    elements: `elements` holds the keys of 2 * ceil(count / 2) elements."""
    u = uniform(bits(elements, keys))
    half = u.shape[-1] // 2
    radius = torch.sqrt(-2.0 * torch.log(u[..., :half]))
    angle = (2 * math.pi) * u[..., half:]
    return torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)[..., :count]


def rademacher(elements, keys):
    """Independent +-1 draws (float32), one per (key, element)."""
    return ((bits(elements, keys) >> 31) * -2 + 1).float()


def pairs(count):
    """How many element keys a Gaussian draw of `count` values needs (an even number)."""
    return 2 * math.ceil(count / 2)
