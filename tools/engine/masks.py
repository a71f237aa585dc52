"""attn_mask for the engine (patch 0008): the masks a call runs with, the form the op layer
hands the kernel, and the kernel's own per-row statistic for a masked call.

The patterns are what models pass: padding (keys masked per batch, query rows of padding
masked whole), holes that differ per head, ALiBi-like additive biases, and rows masked
entirely, with -inf (bool False) or with torch.finfo(dtype).min.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import encode

# The kernel's constants (patch 0008), natural units.
MASK_FLOOR = -(2.0**17)
MASK_EMPTY_ROW_L = 2.0**18


# What models pass (issue 18), for --mask-pattern P: a bool mask (True = attend) of
# call.mask_dims(); PATTERNS' values take the text after the colon.
PATTERNS = ("causal", "causal-padding", "window:W", "docs:N", "keypad:F", "random")


def pattern(call: encode.Call, generator: torch.Generator) -> torch.Tensor:
    """``call.mask_pattern`` as a bool mask shaped ``call.mask_dims()``:
    - causal: the lower triangle (top-left, as is_causal);
    - causal-padding: transformers' causal AND left padding, 25% of the keys of batch row 0
      padded (their query rows then attend no key);
    - window:W: causal sliding window of W keys (query i attends keys i - W + 1 .. i);
    - docs:N: N equal packed documents, causal within each;
    - keypad:F: [B, 1, 1, S], the last fraction F of the keys masked;
    - random: about 10% of the entries excluded, independently (no tile excluded whole)."""
    bm, hm, rm, c = call.mask_dims()
    name, _, value = call.mask_pattern.partition(":")
    rows = torch.arange(rm).view(-1, 1)
    keys = torch.arange(c).view(1, -1)
    if name == "causal":
        keep = keys <= rows
    elif name == "causal-padding":
        keep = (keys <= rows).expand(bm, 1, rm, c).clone()
        keep[0, :, :, : c // 4] = False
        keep[0, :, : c // 4, :] = False  # padded queries: transformers masks their rows too
    elif name == "window":
        keep = (keys <= rows) & (keys > rows - int(value))
    elif name == "docs":
        length = -(-max(rm, c) // int(value))
        keep = (keys <= rows) & (keys // length == rows // length)
    elif name == "keypad":
        keep = (keys < c - int(c * float(value))).expand(bm, 1, 1, c)
    elif name == "random":
        keep = torch.rand((bm, hm, rm, c), generator=generator) >= 0.1
    else:
        raise ValueError(f"unknown mask pattern {call.mask_pattern!r} (one of {', '.join(PATTERNS)})")
    return keep.expand(bm, hm, rm, c).contiguous()


def make(call: encode.Call, generator: torch.Generator, finite_min_rows: Optional[bool] = None) -> torch.Tensor:
    """The user's mask for ``call``: with ``call.mask_pattern`` that pattern (additive: 0 /
    -inf in the call's dtype); else bool (True = attend) or additive in the call's dtype,
    compact, shaped ``call.mask_dims()`` ([Bm, Hm, Rm, C]). Every shape has a row with keys
    masked and one masked entirely (with -inf; additive also with finfo.min when
    ``finite_min_rows``, by default only in float32: PyTorch's own result in the half types
    is what a test compares with there, and it is unsound in such rows: its backward loses
    log(l) next to bfloat16's finfo.min, and scores near float16's, -65504, keep little
    precision in float32); a per-head mask differs between heads."""
    if call.mask_pattern is not None:
        keep = pattern(call, generator)
        return keep if call.mask == "bool" else additive(keep, call.torch_dtype)
    bm, hm, rm, c = call.mask_dims()
    keep = torch.rand((bm, hm, rm, c), generator=generator) > (0.3 if hm > 1 else 0.0)
    for b in range(bm):  # left padding of a different length per batch, every second batch
        if b % 2 == 0:
            keep[b, :, :, : (3 * b + 5) % max(c - 1, 1)] = False
    if rm > 1:  # query rows masked whole: padded queries
        keep[..., 1::4, :] = False
        keep[..., 0, :] = True  # a row that attends every key
    else:
        keep[-1] = False  # a batch (or the only one) whose rows have no key
    if call.mask == "bool":
        return keep
    dtype = call.torch_dtype
    rows = torch.arange(rm).view(-1, 1) * (c / max(rm, 1))
    slope = torch.rand((bm, hm, 1, 1), generator=generator) * 0.5
    bias = -slope * (rows - torch.arange(c)).abs()  # ALiBi-like: distance times a slope
    bias = bias + torch.randn((bm, hm, rm, c), generator=generator)
    bias = bias.masked_fill(~keep, -math.inf)
    if finite_min_rows is None:
        finite_min_rows = call.dtype == "fp32"
    if rm > 1 and finite_min_rows:  # rows masked whole with a large finite value
        bias[..., 3::4, :] = torch.finfo(dtype).min
    return bias.to(dtype)


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask additive in ``dtype`` (a bool mask converted by the op layer's own
    ``additive_mask``: 0 / -inf), compact."""
    import metal_flash_sdpa  # noqa: F401  (before the submodule: see README)
    from metal_flash_sdpa.ops import additive_mask

    return additive_mask(mask, dtype) if mask.dtype == torch.bool else mask.to(dtype)


def kernel_form(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask as the op layer hands it to MFA: bool as it is (patch 0012), additive in
    q's dtype, compact."""
    return mask if mask.dtype == torch.bool else mask.to(dtype)


def kernel_lse(scores: torch.Tensor, kernel_mask: torch.Tensor) -> torch.Tensor:
    """L as the masked forward stores it, in float64 and natural units (the unmasked
    kernels' L is base 2): the log-sum-exp of the row's scores with the mask added (-inf
    excluded, finite scores floored at MASK_FLOOR); MASK_FLOOR - count for a row whose keys
    all sit at the floor; MASK_EMPTY_ROW_L for a row without any key. ``scores``:
    [B, H, R, C], scaled."""
    mask = additive(kernel_mask, torch.float64)
    x = (scores + mask).clamp(min=MASK_FLOOR)
    x = torch.where(mask == -math.inf, torch.full_like(x, -math.inf), x)
    lse = torch.logsumexp(x, dim=-1)
    top = x.max(dim=-1).values
    floored = (x == MASK_FLOOR).sum(dim=-1).double()
    lse = torch.where(top == MASK_FLOOR, MASK_FLOOR - floored, lse)
    return torch.where(top == -math.inf, torch.full_like(lse, MASK_EMPTY_ROW_L), lse)
