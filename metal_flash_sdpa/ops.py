"""The op layer: the torch.library ops a dispatched call runs through.

``attention`` and ``attention_backward`` are defined with ``Library.define`` (~2 us per
call, against 10-20 us for ``custom_op``) and have fake implementations, so torch.compile
traces them without graph breaks; ``_Attention`` connects them for autograd. The op
layer owns what is the same for every kernel: flattening to 4-D, the kernel's memory
layout, the default scale, and turning a mask into the additive 4-D form the contract
promises; the kernel is looked up by device type at run time.
"""

import math

import torch

from . import counters, kernels

_lib = torch.library.Library("metal_flash_sdpa", "DEF")
_lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal) -> (Tensor, Tensor)")
_lib.define(
    "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? mask, float scale, bool causal) -> (Tensor, Tensor, Tensor)"
)


def _kernel(device, cache=True):
    kernel = kernels.by_device.get(device) or kernels.resolve(device, cache)
    if type(kernel) is str:
        raise RuntimeError(f"metal_flash_sdpa: {kernel}")
    return kernel


def to_layout(t, layout):
    """``t`` ([B, H, S, D]) with memory contiguous in ``layout`` order; no copy if it already is."""
    if layout == "BSHD":
        t = t.transpose(1, 2)
        return (t if t.is_contiguous() else t.contiguous()).transpose(1, 2)
    return t if t.is_contiguous() else t.contiguous()


def _empty(shape, layout, like):
    if layout == "BSHD":
        b, h, s, d = shape
        return like.new_empty((b, s, h, d)).transpose(1, 2)
    return like.new_empty(shape)


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _attention(q, k, v, mask, scale, causal):
    counters.count_dispatch()
    return _kernel(q.device).forward(q, k, v, scale, causal, mask)


def _attention_backward(grad_out, q, k, v, out, lse, mask, scale, causal):
    return _kernel(q.device).backward(grad_out, q, k, v, out, lse, scale, causal, mask)


_lib.impl("attention", _attention, "CompositeExplicitAutograd")
_lib.impl("attention_backward", _attention_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("metal_flash_sdpa::attention")
def _attention_fake(q, k, v, mask, scale, causal):
    layout = _kernel(q.device, cache=False).layout
    batch, heads, length, _ = q.shape
    out = _empty((batch, heads, length, v.shape[-1]), layout, q)
    return out, q.new_empty((batch, heads, length), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("metal_flash_sdpa::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, lse, mask, scale, causal):
    layout = _kernel(q.device, cache=False).layout
    return _empty(q.shape, layout, q), _empty(k.shape, layout, k), _empty(v.shape, layout, v)


class _Attention(torch.autograd.Function):
    """Autograd for the attention op (an autograd.Function: ~4.5 us, against ~18 us for
    torch.library.register_autograd's Python wrapper); torch.compile traces it."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, causal, layout):
        out, lse = _run_attention(q, k, v, mask, scale, causal)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale = scale
        ctx.causal = causal
        ctx.layout = layout
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        grad_out = to_layout(grad_out, ctx.layout)
        dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, mask, ctx.scale, ctx.causal)
        return dq, dk, dv, None, None, None, None


_attention_op = torch.ops.metal_flash_sdpa.attention.default
_attention_backward_op = torch.ops.metal_flash_sdpa.attention_backward.default
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack


def _run_attention(q, k, v, mask, scale, causal):
    # Eager with no dispatch mode active, the dispatcher would only call _attention: skip
    # its ~2 us. Compiled graphs and dispatch modes (fake tensors, flop counters) see the op.
    if _is_compiling() or _dispatch_modes():
        return _attention_op(q, k, v, mask, scale, causal)
    return _attention(q, k, v, mask, scale, causal)


def _as_4d(t):
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return t.unsqueeze(0)
    return t.reshape(-1, *t.shape[-3:])


def _additive_mask_4d(mask, q, kv_len):
    """``mask`` as the kernel contract wants it: additive, q's dtype, [Bm, Hm, Sq, Sk]."""
    rank = q.dim()
    if mask.dim() < rank:
        mask = mask.view((1,) * (rank - mask.dim()) + tuple(mask.shape))
    if rank == 3:
        mask = mask.unsqueeze(0)
    elif rank > 4:
        if all(size == 1 for size in mask.shape[:-3]):
            mask = mask.reshape(1, *mask.shape[-3:])
        else:
            mask = mask.expand(*q.shape[:-3], *mask.shape[-3:]).reshape(-1, *mask.shape[-3:])
    if mask.dtype == torch.bool:  # True = attend; converted before broadcasting, to stay small
        mask = mask.new_full(mask.shape, -math.inf, dtype=q.dtype).masked_fill_(mask, 0.0)
    return mask.expand(mask.shape[0], mask.shape[1], q.shape[-2], kv_len)


def attention(kernel, q, k, v, mask, causal, scale, needs_grad):
    """Run a call the rules accepted for ``kernel``; returns SDPA's output."""
    layout = kernel.layout
    if mask is not None:
        mask = _additive_mask_4d(mask, q, k.shape[-2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q4, k4, v4 = to_layout(_as_4d(q), layout), to_layout(_as_4d(k), layout), to_layout(_as_4d(v), layout)
    if needs_grad:
        out = _Attention.apply(q4, k4, v4, mask, scale, causal, layout)
    else:  # nothing saved for backward
        out, _ = _run_attention(q4, k4, v4, mask, scale, causal)
    return out if q.dim() == 4 else out.view(*q.shape[:-1], v.shape[-1])
