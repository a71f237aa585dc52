"""The SDPA calls the command line checks, samples and tabulates: the common patterns of
attention in models, as data.

Each pattern builds ``(q, k, v, kwargs)`` for a dtype and a device from a ``Sizes``. Random
values come from a seeded CPU generator, so every device sees the same inputs; on the
``meta`` device only shapes exist (what ``coverage`` needs).
"""

from typing import Callable, NamedTuple

import torch


class Sizes(NamedTuple):
    batch: int
    heads: int
    kv_heads: int
    length: int
    long_length: int
    head_dim: int


# Small enough that the reference kernel checks every pattern on 2 CPU cores in seconds.
CPU_SIZES = Sizes(batch=2, heads=4, kv_heads=2, length=64, long_length=512, head_dim=32)
MPS_SIZES = Sizes(batch=2, heads=8, kv_heads=2, length=256, long_length=2048, head_dim=64)


class Maker:
    """Tensors of one dtype on one device, from a seeded CPU generator (shapes only on meta)."""

    def __init__(self, dtype, device, seed=0):
        self.dtype = dtype
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def randn(self, *shape, dtype=None):
        dtype = dtype or self.dtype
        if self.device.type == "meta":
            return torch.empty(shape, dtype=dtype, device="meta")
        return torch.randn(shape, generator=self.generator, dtype=torch.float32).to(self.device, dtype)

    def bool_mask(self, *shape, keep=0.7):
        if self.device.type == "meta":
            return torch.empty(shape, dtype=torch.bool, device="meta")
        mask = torch.rand(shape, generator=self.generator) < keep
        return (mask | torch.eye(shape[-2], shape[-1], dtype=torch.bool)).to(self.device)

    def to_device(self, t):
        return t.to(self.device)


def padding_causal_mask(batch, length):
    """The 4-D bool mask transformers builds for a padded batch, [B, 1, L, L], True = attend:
    causal, with the first quarter of sequence 0 left-padded (so its first rows attend to
    nothing and give 0) and the last quarter of the other sequences right-padded."""
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[0, : length // 4] = False
    keep[1:, length - length // 4 :] = False
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return causal[None, None] & keep[:, None, None, :]


def _causal_square(s, m):
    q, k, v = (m.randn(s.batch, s.heads, s.length, s.head_dim) for _ in range(3))
    return q, k, v, dict(is_causal=True)


def _causal_rectangular(s, m):
    # a chunk of new queries against a longer cache; PyTorch's is_causal is top-left aligned
    q = m.randn(s.batch, s.heads, s.length // 2, s.head_dim)
    k, v = (m.randn(s.batch, s.heads, s.length, s.head_dim) for _ in range(2))
    return q, k, v, dict(is_causal=True)


def _gqa(causal):
    def build(s, m):
        q = m.randn(s.batch, s.heads, s.length, s.head_dim)
        k, v = (m.randn(s.batch, s.kv_heads, s.length, s.head_dim) for _ in range(2))
        return q, k, v, dict(is_causal=causal, enable_gqa=True)

    return build


def _bool_mask(s, m):
    q, k, v = (m.randn(s.batch, s.heads, s.length, s.head_dim) for _ in range(3))
    return q, k, v, dict(attn_mask=m.bool_mask(s.length, s.length))


def _additive_mask(s, m):
    q, k, v = (m.randn(s.batch, s.heads, s.length, s.head_dim) for _ in range(3))
    return q, k, v, dict(attn_mask=m.randn(s.batch, 1, s.length, s.length))


def _per_head_mask(s, m):
    # ALiBi: a bias per query head, -slope_h * |i - j|, with grouped-query K/V
    q = m.randn(s.batch, s.heads, s.length, s.head_dim)
    k, v = (m.randn(s.batch, s.kv_heads, s.length, s.head_dim) for _ in range(2))
    if m.device.type == "meta":
        bias = torch.empty(1, s.heads, s.length, s.length, dtype=m.dtype, device="meta")
    else:
        slopes = 2.0 ** -torch.arange(1.0, s.heads + 1)
        distance = (torch.arange(s.length)[:, None] - torch.arange(s.length)).abs()
        bias = (-slopes[:, None, None] * distance).unsqueeze(0).to(m.device, m.dtype)
    return q, k, v, dict(attn_mask=bias, enable_gqa=True)


def _padding_causal_mask(s, m):
    q, k, v = (m.randn(s.batch, s.heads, s.length, s.head_dim) for _ in range(3))
    return q, k, v, dict(attn_mask=m.to_device(padding_causal_mask(s.batch, s.length)))


def _long(s, m):
    q, k, v = (m.randn(1, s.heads, s.long_length, s.head_dim) for _ in range(3))
    return q, k, v, {}


def _three_dims(s, m):
    q, k, v = (m.randn(s.heads, s.length, s.head_dim) for _ in range(3))
    return q, k, v, {}


def _value_dim_differs(s, m):
    q, k = (m.randn(s.batch, s.heads, s.length, s.head_dim) for _ in range(2))
    v = m.randn(s.batch, s.heads, s.length, 2 * s.head_dim)
    return q, k, v, {}


def _decode(s, m):
    q = m.randn(s.batch, s.heads, 1, s.head_dim)
    k, v = (m.randn(s.batch, s.heads, s.length, s.head_dim) for _ in range(2))
    return q, k, v, {}


class Pattern(NamedTuple):
    name: str
    build: Callable  # (Sizes, Maker) -> (q, k, v, kwargs)


PATTERNS = (
    Pattern("causal, Sq == Sk", _causal_square),
    Pattern("causal, Sq < Sk", _causal_rectangular),
    Pattern("GQA, causal", _gqa(True)),
    Pattern("GQA, no mask", _gqa(False)),
    Pattern("bool mask [L, S]", _bool_mask),
    Pattern("additive mask [B, 1, L, S]", _additive_mask),
    Pattern("causal+padding bool mask [B, 1, L, S]", _padding_causal_mask),
    Pattern("GQA, per-head ALiBi mask [1, H, L, S]", _per_head_mask),
    Pattern("no mask, long sequence", _long),
    Pattern("3-D input [H, L, D]", _three_dims),
    Pattern("value dim != head dim", _value_dim_differs),
)

# A generation step: one query row (below any sensible MIN_SEQ_LEN).
DECODE = Pattern("decode step (query length 1)", _decode)
