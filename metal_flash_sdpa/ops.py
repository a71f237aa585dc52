"""The op layer: the torch.library ops a dispatched call runs through.

``attention`` and ``attention_backward`` are defined with ``Library.define`` (~2 us per
call, against 10-20 us for ``custom_op``) and have fake implementations, so torch.compile
traces them without graph breaks; ``_Attention`` connects them for autograd. The op
layer owns what is the same for every kernel: flattening to 4-D, the kernel's memory
layout, the default scale, and turning a mask into the additive 4-D form the contract
promises.

Which kernel runs: eager calls use the kernel the rules chose, and the backward uses the
very kernel object that ran the forward (saved on ``ctx``; only it can read its ``lse``).
The ops themselves, which compiled graphs and dispatch modes run, take tensors only: they
look the kernel up by device type when they run (a compiled graph guards on the registry
when it is entered), and ``attention_backward`` is also given the forward kernel's name, so
a kernel swapped in between forward and backward is never handed another kernel's ``lse``:
the gradients are then recomputed with PyTorch.

A kernel that raises never breaks the call (DESIGN section 10): see ``kernel_failed``.
"""

import math
import threading

import torch

from . import config, counters, kernels, rules, trust

_lib = torch.library.Library("metal_flash_sdpa", "DEF")
_lib.define("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal) -> (Tensor, Tensor)")
_lib.define(
    "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? mask, float scale, bool causal, str? kernel=None) -> (Tensor, Tensor, Tensor)"
)
_failed = kernels.failed
_failed_lock = threading.Lock()  # one warning per configuration, even under threads
_pytorch_sdpa = torch._C._nn.scaled_dot_product_attention  # PyTorch's own, whatever is patched
_verify = trust.verify
_key = torch._C.DispatchKey
# autograd's dispatch keys and its view tracking: what a dispatch mode excludes that autograd needs
_AUTOGRAD_KEYS = (_key.ADInplaceOrView, _key.AutogradCPU, _key.AutogradOther, _key.AutogradNestedTensor)


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


def kernel_failed(kernel, error, stage, q, k, v, mask, causal, needs_grad, scale=None) -> str:
    """Stop sending this call's configuration (``rules.configuration``) to ``kernel`` after
    it raised ``error`` in ``stage`` ("forward" or "backward"), or failed its self-check
    (``trust.SelfCheckFailed``); -> the fallback reason, one per kernel, so that
    ``fallback_counts()`` adds its configurations up.

    ``q``, ``k``, ``v``, ``mask``, ``scale``: the user's call or the op's 4-D one (same configuration).
    A forward failure blocks the configuration with and without grad (the forward is the
    same kernel either way); a backward failure only with grad. The first failure of a
    configuration gives one warning line naming the kernel, the configuration and the error.
    """
    checked = isinstance(error, trust.SelfCheckFailed)
    reason = error.reason if checked else f"kernel {kernel.name} failed for this configuration"
    key = rules.configuration(kernel.name, q.device.type, _call(q, k, v, mask, causal, needs_grad, scale))
    keys = [key] if stage == "backward" else [key[:-1] + (False,), key[:-1] + (True,)]
    with _failed_lock:
        new = [c for c in keys if c not in _failed]
        _failed.update(dict.fromkeys(new, reason))
    if new and checked:  # the self-check's own line: the variant and the measured error
        config._warn(error.warning)
    elif new:  # warned once blocked: a warnings filter that raises leaves the state consistent
        fields = zip(rules.CONFIGURATION_FIELDS[1:-1], key[1:-1])
        described = " ".join(f"{name}={str(value).replace('torch.', '')}" for name, value in fields)
        lines = str(error).strip().splitlines() or [""]
        config._warn(
            f"metal_flash_sdpa: kernel {kernel.name} failed in {stage} ({described}): "
            f"{type(error).__name__}: {lines[0]}{' [...]' if len(lines) > 1 else ''}; PyTorch's SDPA "
            f"serves this configuration{' with grad' if stage == 'backward' else ''} from now on"
        )
    return reason


def _call(q, k, v, mask, causal, needs_grad, scale):
    return rules.describe(q.shape, k.shape, v.shape, q.dtype, mask, causal, needs_grad, scale)


def _blocked(kernel, q, k, v, mask, scale, causal, needs_grad):
    """The fallback reason if this call's configuration is blocked for ``kernel``, else None."""
    return _failed.get(rules.configuration(kernel.name, q.device.type, _call(q, k, v, mask, causal, needs_grad, scale)))


def _forward(kernel, q, k, v, mask, scale, causal):
    # the variant's self-check on its first use; counted once the kernel returned: a call it
    # failed on ends up in PyTorch, not here
    _verify(kernel, "forward", q, k, v, mask, scale, causal)
    result = kernel.forward(q, k, v, scale, causal, mask)
    counters.count_dispatch()
    return result


def _backward(kernel, grad_out, q, k, v, out, lse, mask, scale, causal):
    """The kernel's backward; PyTorch's gradients if it raises or the configuration is blocked."""
    if not _failed or _blocked(kernel, q, k, v, mask, scale, causal, True) is None:
        try:
            _verify(kernel, "backward", q, k, v, mask, scale, causal)
            return kernel.backward(grad_out, q, k, v, out, lse, scale, causal, mask)
        except Exception as error:
            kernel_failed(kernel, error, "backward", q, k, v, mask, causal, True, scale)
    return _pytorch_grads(grad_out, q, k, v, mask, scale, causal)


def _pytorch_attention(q, k, v, mask, scale, causal):
    """PyTorch's SDPA on the op-level tensors (4-D, additive mask, scale resolved)."""
    if k.shape[1] != q.shape[1]:
        return _pytorch_sdpa(q, k, v, mask, 0.0, causal, scale=scale, enable_gqa=True)
    return _pytorch_sdpa(q, k, v, mask, 0.0, causal, scale=scale)


def _with_autograd():
    """A dispatch mode runs the op's implementation with autograd excluded from dispatch
    (grad mode alone does not bring it back): lift that for the recompute."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _pytorch_grads(grad_out, q, k, v, mask, scale, causal):
    """dq, dk, dv recomputed by PyTorch from the saved inputs, with their strides (the
    layout the kernel contract and the fake implementation promise)."""
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    with _with_autograd(), torch.enable_grad():
        grads = torch.autograd.grad(_pytorch_attention(*inputs, mask, scale, causal), inputs, grad_out)
    return tuple(g if g.stride() == t.stride() else torch.empty_like(t).copy_(g) for t, g in zip((q, k, v), grads))


def _attention(q, k, v, mask, scale, causal):
    kernel = _kernel(q.device)
    reason = _blocked(kernel, q, k, v, mask, scale, causal, False) if _failed else None
    if reason is None:
        try:
            return _forward(kernel, q, k, v, mask, scale, causal)
        except Exception as error:
            reason = kernel_failed(kernel, error, "forward", q, k, v, mask, causal, False, scale)
    # Run by a compiled graph or under a dispatch mode: no user call to hand back to, so
    # PyTorch answers from these tensors. The lse is a placeholder: the configuration is
    # blocked, so the backward recomputes with PyTorch and never reads it.
    counters.count_fallback(reason)
    batch, heads, length, _ = q.shape
    out = to_layout(_pytorch_attention(q, k, v, mask, scale, causal), kernel.layout)
    return out, q.new_zeros((batch, heads, length), dtype=_lse_dtype(q.dtype))


def _attention_backward(grad_out, q, k, v, out, lse, mask, scale, causal, kernel=None):
    current = kernels.by_device.get(q.device) or kernels.resolve(q.device)
    if type(current) is not str and (kernel is None or current.name == kernel):
        return _backward(current, grad_out, q, k, v, out, lse, mask, scale, causal)
    # the registry changed since the forward: no kernel here can read the forward's lse
    return _pytorch_grads(grad_out, q, k, v, mask, scale, causal)


_lib.impl("attention", _attention, "CompositeExplicitAutograd")
_lib.impl("attention_backward", _attention_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("metal_flash_sdpa::attention")
def _attention_fake(q, k, v, mask, scale, causal):
    layout = _kernel(q.device, cache=False).layout
    batch, heads, length, _ = q.shape
    out = _empty((batch, heads, length, v.shape[-1]), layout, q)
    return out, q.new_empty((batch, heads, length), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("metal_flash_sdpa::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, lse, mask, scale, causal, kernel=None):
    layout = _kernel(q.device, cache=False).layout
    return _empty(q.shape, layout, q), _empty(k.shape, layout, k), _empty(v.shape, layout, v)


class _Attention(torch.autograd.Function):
    """Autograd for the attention op (an autograd.Function: ~4.5 us, against ~18 us for
    torch.library.register_autograd's Python wrapper); torch.compile traces it."""

    @staticmethod
    def forward(ctx, kernel, q, k, v, mask, scale, causal):
        out, lse = _run_attention(kernel, q, k, v, mask, scale, causal)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.kernel = kernel  # the backward must be this kernel's: only it reads its lse
        ctx.scale = scale
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        kernel = ctx.kernel
        grad_out = to_layout(grad_out, kernel.layout)
        if _is_compiling() or _dispatch_modes():
            dq, dk, dv = _attention_backward_op(grad_out, q, k, v, out, lse, mask, ctx.scale, ctx.causal, kernel.name)
        else:
            dq, dk, dv = _backward(kernel, grad_out, q, k, v, out, lse, mask, ctx.scale, ctx.causal)
        return None, dq, dk, dv, None, None, None


_attention_op = torch.ops.metal_flash_sdpa.attention.default
_attention_backward_op = torch.ops.metal_flash_sdpa.attention_backward.default
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack


def _run_attention(kernel, q, k, v, mask, scale, causal):
    # Eager with no dispatch mode active, the dispatcher would only call _attention: skip
    # its ~2 us (a kernel failure propagates, and the caller answers with PyTorch's SDPA).
    # Compiled graphs and dispatch modes (fake tensors, flop counters) see the op.
    if _is_compiling() or _dispatch_modes():
        return _attention_op(q, k, v, mask, scale, causal)
    return _forward(kernel, q, k, v, mask, scale, causal)


def _as_4d(t):
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return t.unsqueeze(0)
    return t.reshape(-1, *t.shape[-3:])


def additive_mask(mask, dtype):
    """A bool mask (True = attend) as the additive one of ``dtype``: 0 / -inf."""
    return mask.new_full(mask.shape, -math.inf, dtype=dtype).masked_fill_(mask, 0.0)


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
    if mask.dtype == torch.bool:  # converted before broadcasting, to stay small
        mask = additive_mask(mask, q.dtype)
    return mask.expand(mask.shape[0], mask.shape[1], q.shape[-2], kv_len)


def attention(kernel, q, k, v, mask, causal, scale, needs_grad):
    """Run a call the rules accepted for ``kernel``; returns SDPA's output. Raises what the
    kernel raises: the dispatcher then answers the call with PyTorch's SDPA."""
    layout = kernel.layout
    if mask is not None:
        mask = _additive_mask_4d(mask, q, k.shape[-2])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q4, k4, v4 = to_layout(_as_4d(q), layout), to_layout(_as_4d(k), layout), to_layout(_as_4d(v), layout)
    if needs_grad:
        out = _Attention.apply(kernel, q4, k4, v4, mask, scale, causal)
    else:  # nothing saved for backward
        out, _ = _run_attention(kernel, q4, k4, v4, mask, scale, causal)
    return out if q.dim() == 4 else out.view(*q.shape[:-1], v.shape[-1])
