"""Attention dropout's keep decisions: a counter-based generator, the same on every kernel.

Each attention probability P[b, h, i, j] (batch, query head, query row, key column) is kept
when a Philox-4x32-10 draw (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
SC 2011; Random123's reference) keyed by the call's 64-bit seed is at or above
``threshold(p)``, and kept values are scaled by 1/(1-p), as FlashAttention-2 does. One Philox
block of four 32-bit words serves four neighbouring columns: counter (j // 4, i, h, b), word
j % 4. The decisions depend on nothing but the seed and the element's indices — not on
tiling, block sizes, GPU family, copy mode or dtype — so a backward regenerates exactly the
forward's, and the reference kernel and the Metal kernels draw the same bits.

The seed is drawn on the host from PyTorch's default CPU generator (reproducible under
``torch.manual_seed``, different for each call, no device synchronisation). The stream is
not PyTorch's: same distribution, other bits.
"""

import torch

# Random123's Philox-4x32 constants
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF
ROUNDS = 10


def _mulhilo(constant: int, x: torch.Tensor):
    """(high, low) 32-bit words of ``constant * x`` for 32-bit ``x`` in int64 tensors,
    in 16-bit halves so that no product passes 2**63."""
    low_part = x * (constant & 0xFFFF)  # < 2**48
    high_part = x * (constant >> 16)  # < 2**48, to be shifted by 16
    low_sum = low_part + ((high_part & 0xFFFF) << 16)  # < 2**49
    return (high_part >> 16) + (low_sum >> 32), low_sum & _MASK32


def philox4x32(counter, key):
    """Philox-4x32-10 of ``counter`` (four int64 tensors of 32-bit words, broadcastable)
    under ``key`` (two ints) -> four int64 tensors of 32-bit words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(ROUNDS):
        if round_:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def threshold(p: float) -> int:
    """The 32-bit draw below which an element is dropped: P(draw < threshold) = p up to
    2**-32. Kernels compare against this integer, never against p."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in (0, 1), got {p}")
    return min(max(round(p * 2**32), 1), _MASK32)


def split_seed(seed: int):
    """The Philox key of a 64-bit seed."""
    return seed & _MASK32, (seed >> 32) & _MASK32


def draw_seed() -> torch.Tensor:
    """A fresh 64-bit seed from PyTorch's default CPU generator (no device involved): a 0-d
    int64 CPU tensor, what the op returns and saves for the backward."""
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)


def seed_value(seed: torch.Tensor) -> int:
    """The seed as the kernels take it, an unsigned 64-bit int (a CPU read, no device sync)."""
    return int(seed) & (2**64 - 1)


def keep_mask(seed: int, p: float, batch: int, heads: int, rows, columns: int, device=None) -> torch.Tensor:
    """Bool [batch, heads, len(rows), columns]: which probabilities the call keeps.
    ``rows``: a range of query rows (a block of them, for a blockwise kernel)."""
    rows = range(rows) if isinstance(rows, int) else rows
    blocks = (columns + 3) // 4
    i64 = dict(dtype=torch.int64, device=device)
    counter = (
        torch.arange(blocks, **i64).view(1, 1, 1, blocks),
        torch.arange(rows.start, rows.stop, **i64).view(1, 1, -1, 1),
        torch.arange(heads, **i64).view(1, heads, 1, 1),
        torch.arange(batch, **i64).view(batch, 1, 1, 1),
    )
    counter = torch.broadcast_tensors(*counter)
    words = torch.stack(philox4x32(counter, split_seed(seed)), dim=-1)  # [..., blocks, 4]
    return words.flatten(-2)[..., :columns] >= threshold(p)
