"""A value head dim that differs from the query's (multi-head latent attention: DeepSeek-V2/V3,
MiniCPM3, Kimi call SDPA with 192 / 128) on kernels built for one head dim.

The narrower side is padded with zeros to the wider dim, which changes no result: zero
columns of Q and K add nothing to a score, zero columns of V give zero columns of O, and zero
columns of O and dO add nothing to the backward's rowsum(dO * O). The padded columns of the
outputs are cut off again.

Why padding and not a second head dim inside MFA's kernels: every loop over the head dim of
the three kernels, their operand caches and the choice of a parameter-table row would take
two dims, a change to all of AttentionKernel that the self-check and the CPU executor would
then have to cover anew, while the padded calls run the kernels already verified. What it
costs, counted by the executor (`mfa_engine.py run --value-dim`): the kernels run 9 head-dim
products of L x S per forward and backward, each at the wider dim, where two head dims would
run 5 at D and 4 at Dv: for 192 / 128, 1728 / 1472 = 1.17 times the multiply-accumulates;
for 64 / 128 (wider values, rarer), 1.38. The copies move O((L + S) x H x D) bytes, against
O(L x S x H x D) multiply-accumulates. README "Value head dims that differ" has the figures.

Tensors here are the kernel contract's: logical [B, H, S, d] views of memory contiguous in
the kernel's layout; what these functions return is in that layout too.
"""

from __future__ import annotations

import torch.nn.functional as F


def widened(t, dim: int, layout: str):
    """``t`` with zero columns appended up to head dim ``dim`` (``t`` itself if it has them),
    in ``layout`` order."""
    if t.shape[-1] == dim:
        return t
    if layout == "BSHD":
        return F.pad(t.transpose(1, 2), (0, dim - t.shape[-1])).transpose(1, 2)
    return F.pad(t, (0, dim - t.shape[-1]))


def narrowed(t, dim: int, layout: str):
    """The first ``dim`` columns of ``t`` (``t`` itself if it has no more), contiguous in
    ``layout`` order."""
    if t.shape[-1] == dim:
        return t
    if layout == "BSHD":
        return t.transpose(1, 2)[..., :dim].contiguous().transpose(1, 2)
    return t[..., :dim].contiguous()


def forward(kernel_forward, layout, q, k, v, *args, **options):
    """``kernel_forward(q, k, v, *args, **options)`` on operands of one head dim."""
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    dim = max(head_dim, value_dim)
    q, k, v = (widened(t, dim, layout) for t in (q, k, v))
    out, lse = kernel_forward(q, k, v, *args, **options)
    return narrowed(out, value_dim, layout), lse


def backward(kernel_backward, layout, grad_out, q, k, v, out, *args, **options):
    """``kernel_backward(grad_out, q, k, v, out, *args, **options)`` on operands of one head
    dim; dq, dk, dv (and a mask gradient) as a kernel with two head dims returns them."""
    head_dim, value_dim = q.shape[-1], v.shape[-1]
    dim = max(head_dim, value_dim)
    grad_out, q, k, v, out = (widened(t, dim, layout) for t in (grad_out, q, k, v, out))
    dq, dk, dv, *rest = kernel_backward(grad_out, q, k, v, out, *args, **options)
    return (narrowed(dq, head_dim, layout), narrowed(dk, head_dim, layout), narrowed(dv, value_dim, layout), *rest)
