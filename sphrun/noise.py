"""Random numbers from counters, in tensor ops: the random-step Gaussians and the curvature probes.

A draw is a pure function of its counters, (seed, stream, step or batch, element index), hashed by a
32-bit integer hash, so there is no generator state: nothing is drawn on the host or copied to the
device, a CUDA graph replays the draw (a step's counter is a device tensor the step advances), and
every device computes the same integers, hence the same Gaussians up to the rounding of log, sqrt, cos
and sin. A run resumed on another device walks on along the same directions.

The hash is Thomas Mueller's (x ^= x >> 16; x *= 0x45d9f3b; twice; x ^= x >> 16), a bijection of
32-bit values with full avalanche. It runs in int64 on values under 2^32 with a multiplier under 2^27,
so no product overflows.

Keys are 64 bits, two 32-bit words, so that distinct (seed, stream, step) never share one in
practice: over 1,000 seeds of 400,000 steps each (1,000 CIFAR epochs), any two keys coincide with
probability 0.4 %, and such a coincidence is one step by chance, never one stream repeating another.
(With one word, mix(base ^ step), seed s1 at step t drew what s2 draws at step t ^ b1 ^ b2, b their
base keys: seeds 931 and 975 shared 386,784 of 390,000 steps.) A stream's key folds its counters into
both words; a step's key hashes the step into each word and adds the word back (Davies-Meyer), so that
no difference of bases is a shift of steps; an element's word passes through the hash once per key word.

Gaussians come by Box-Muller from pairs of 23-bit uniforms strictly inside (0, 1), which cuts their
tails at 5.77 sigma (a draw beyond has probability 8e-9); Rademacher signs are the word's top bit.
"""

import math

import torch

# Names this generator in run files (a random-step run's config.json, curvature.json): draws of another
# generator (an earlier sphrun's) never mix with its draws in one run or one column.
GENERATOR = "sphrun.noise 2 (counter hash, 64-bit keys)"
MASK = 0xFFFFFFFF
MULTIPLIER = 0x45D9F3B
# Stream names keep the draws of different uses apart (ASCII of "rand", "prob").
RANDOM_STEP = 0x72616E64
PROBE = 0x70726F62
# Where a stream key's two words start (ASCII of "lo64", "hi64"): two different folds of the counters.
START = (0x6C6F3634, 0x68693634)
UNIFORM_BITS = 23  # with the half-step offset, exact in float32's 24-bit mantissa: never 0, never 1


def mix(x):
    """The 32-bit hash of x: a Python int or an int64 tensor, values in [0, 2^32)."""
    x = ((x >> 16) ^ x) * MULTIPLIER & MASK
    x = ((x >> 16) ^ x) * MULTIPLIER & MASK
    return (x >> 16) ^ x


def key(*counters):
    """A stream's 64-bit key, two words (ints), from counters (ints in [0, 2^64), two 32-bit words each).
    Each counter word enters the first key word as it is and the second hashed, so that no difference of
    counters cancels in both words at once."""
    first, second = START
    for c in counters:
        for word in (c & MASK, (c >> 32) & MASK):
            first, second = mix(first ^ word), mix(second ^ mix(word))
    return first, second


def key_at(base, step):
    """The key of step `step` (under 2^32) in the stream of key `base`: a pair of words (ints, or 0-d
    tensors for a tensor step), or an int64 tensor (..., 2) of K base keys of a pack, the step a device
    counter, so that a CUDA graph computes it. Each word is mix(word ^ step) ^ word."""
    step = step & MASK
    if torch.is_tensor(base):
        return mix(base ^ step) ^ base
    return tuple(mix(word ^ step) ^ word for word in base)


def element_keys(count, device):
    """The hashes of the element indices 0 .. count - 1 (computed once, reused by every draw)."""
    return mix(torch.arange(count, dtype=torch.int64, device=device))


def key_words(keys):
    """The two words of a key, or of K keys ((K, 2) tensor: two (K, 1) columns, one row per key)."""
    if torch.is_tensor(keys):
        return (keys[:, 0:1], keys[:, 1:2]) if keys.dim() == 2 else (keys[0], keys[1])
    return keys


def bits(elements, keys):
    """32-bit random words, one per (key, element): keys (K, 2), (2,) or a pair, elements (n,)."""
    first, second = key_words(keys)
    return mix(mix(elements ^ first) ^ second)


def uniform(words):
    """Uniforms strictly inside (0, 1) from the top 23 bits of each word: (m + 1/2) / 2^23, exact in
    float32 (a 24-bit m + 1/2 would round to 2^24, u = 1, for m >= 2^23 - 1/2)."""
    return ((words >> (32 - UNIFORM_BITS)).float() + 0.5) * 2.0 ** -UNIFORM_BITS


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
