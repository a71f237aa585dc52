"""The dispatch rules (DESIGN section 5), in the one order they are checked.

A call goes to a kernel only when every rule passes; the first that fails names the
reason, which is counted, and the call runs PyTorch's original SDPA untouched. Anything
invalid fails a rule, so PyTorch raises its own error. The dispatcher, ``explain()`` and
the fallback counters all run ``evaluate``, so they cannot disagree; that includes the
configurations a kernel failed on, which go to PyTorch for the rest of the process.

The order puts the cheap rules that reject most calls first (scoped disable, no kernel for
the device, short sequences): the fallback path has a budget of under 1 us. No rule may
synchronise the device: they read shapes, dtypes, devices and flags, never tensor values.
"""

import math
import sys
from contextvars import ContextVar
from typing import Optional

import torch

from . import kernels
from . import trust as _trust
from .kernels.base import Call

# Set by metal_flash_sdpa.disabled(); per thread and per asyncio task.
scoped_off = ContextVar("metal_flash_sdpa_disabled", default=False)

_Tensor = torch.Tensor
_NUMBERS = (float, int)
_has_torch_function = torch.overrides.has_torch_function_variadic
_torch_function_enabled = torch._C._is_torch_function_enabled
_flash_enabled = torch._C._get_flash_sdp_enabled
_efficient_enabled = torch._C._get_mem_efficient_sdp_enabled
_is_compiling = torch.compiler.is_compiling
_is_grad_enabled = torch.is_grad_enabled
_is_any_autocast_enabled = torch._C._is_any_autocast_enabled
_functorch_transform = torch._C._functorch.peek_interpreter_stack
_package = sys.modules[__package__]

DISABLED = "inside metal_flash_sdpa.disabled()"
NOT_TENSORS = "query, key, value or attn_mask is not a tensor"
# A subclass or mode that overrides torch functions expects to see the SDPA call itself: it
# gets PyTorch's builtin, as unpatched (the dispatcher hands CausalBias masks to their
# override first). So does a call made with torch functions disabled.
TORCH_FUNCTION = "tensor subclass or mode with __torch_function__"
# explain() only: a CausalBias mask calls SDPA again, with is_causal or a materialised mask
CAUSAL_BIAS = "a CausalBias attn_mask: its own SDPA call is dispatched (is_causal or a plain mask)"
# torch.nn.attention.sdpa_kernel: the kernels stand in for the fused backends, flash
# attention and memory-efficient attention; a selection without both goes to PyTorch.
BACKENDS = "sdpa_kernel selection excludes the fused backends"
SHORT = "query length < MIN_SEQ_LEN"
FEW_DIMS = "query has fewer than 3 dims"
NESTED = "nested tensors"
AUTOCAST = "autocast is enabled"  # not a fallback: the dispatcher casts, as autocast would
FUNCTORCH = "inside a torch.func transform"
DEVICES = "tensors on different devices"
DTYPES = "query, key and value have different dtypes"
ARGUMENT_TYPES = "dropout_p, is_causal, scale or enable_gqa of the wrong type"
# 0 < dropout_p < 1 goes to a kernel that supports_dropout; 1, negative or NaN to PyTorch
DROPOUT = "dropout_p outside [0, 1)"
CAUSAL_WITH_MASK = "is_causal with attn_mask"
BATCH_DIMS = "batch dims differ between query, key and value"
EMPTY = "empty tensors"


_kernel_or_reason = kernels.by_device
_failed = kernels.failed


def evaluate(q, k, v, mask, dropout_p, causal, scale, gqa):
    """-> (None, kernel, needs_grad) when the call can go to ``kernel``; (trust.PENDING, kernel,
    False) when it can once its length bucket is calibrated; else (reason, None, False)."""
    # ContextVar.get breaks a torch.compile graph; compiled code follows enable()/disable().
    compiling = _is_compiling()
    if not compiling and scoped_off.get():
        return DISABLED, None, False
    if not (isinstance(q, _Tensor) and isinstance(k, _Tensor) and isinstance(v, _Tensor)) or (
        mask is not None and not isinstance(mask, _Tensor)
    ):
        return NOT_TENSORS, None, False
    if _has_torch_function(q, k, v, mask) or not _torch_function_enabled():
        return TORCH_FUNCTION, None, False
    device = q.device
    # The per-device cache is filled as calls come; a compiled graph must not guard on it.
    kernel = None if compiling else _kernel_or_reason.get(device)
    if kernel is None:
        kernel = kernels.resolve(device, cache=not compiling)
    if type(kernel) is str:
        return kernel, None, False
    # before any shape is read: a strided nested tensor raises on .shape
    if q.is_nested or k.is_nested or v.is_nested or (mask is not None and mask.is_nested):
        return NESTED, None, False
    if q.dim() < 3:
        return FEW_DIMS, None, False
    if q.shape[-2] < _package.MIN_SEQ_LEN:
        return SHORT, None, False
    # Not while compiling: dynamo would fold the flags into the graph without a guard; the
    # op reads them when it runs (ops._attention).
    if not compiling and not fused_backends_selected():
        return BACKENDS, None, False
    if _is_any_autocast_enabled() and torch.is_autocast_enabled(device.type):
        return AUTOCAST, None, False
    if not compiling and _functorch_transform() is not None:
        return FUNCTORCH, None, False
    if k.device != device or v.device != device or (mask is not None and mask.device != device):
        return DEVICES, None, False
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return DTYPES, None, False
    if (
        type(dropout_p) not in _NUMBERS
        or (scale is not None and type(scale) not in _NUMBERS)
        or type(causal) is not bool
        or type(gqa) is not bool
    ):
        return ARGUMENT_TYPES, None, False
    if dropout_p != 0 and not 0 < dropout_p < 1:
        return DROPOUT, None, False
    qs, ks, vs = q.shape, k.shape, v.shape
    reason = check_shapes(qs, ks, vs, gqa)
    if reason is None and mask is not None:
        reason = CAUSAL_WITH_MASK if causal else check_mask(mask, q.dtype, qs, ks)
    if reason is None and (0 in qs or 0 in ks or 0 in vs):
        reason = EMPTY
    if reason is None:
        grad = _is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad or (mask is not None and mask.requires_grad)
        )
        call = describe(qs, ks, vs, q.dtype, mask, causal, grad, scale, dropout_p)
        reason = kernel.supports(call)
        # The last rule: not a configuration the kernel raised on (ops.kernel_failed); looked
        # up only once a kernel has failed. Not while compiling (a graph would guard on the
        # dict): compiled graphs send the op, which checks when it runs.
        key = None
        if reason is None and not compiling and _failed:
            key = configuration(kernel.name, device.type, call)
            reason = _failed.get(key)
        # Without grad, the faster of the kernel and PyTorch's SDPA, as measured on this
        # machine for the call's length bucket (trust.py); PENDING: not measured yet.
        if reason is None and not grad and kernel.calibrated and not compiling and not dropout_p and _trust.calibrating:
            reason = _trust.choice(key or configuration(kernel.name, device.type, call), qs[-2], ks[-2])
        if reason is None or reason is _trust.PENDING:
            return reason, kernel, grad
    return reason, None, False


def is_causal_bias(mask) -> bool:
    """Whether ``mask`` is a torch.nn.attention.bias.CausalBias, without importing that
    module (it pulls in torch._dynamo, seconds): a CausalBias exists only once it was."""
    bias = sys.modules.get("torch.nn.attention.bias")
    return bias is not None and isinstance(mask, bias.CausalBias)


def fused_backends_selected() -> bool:
    """Whether torch.nn.attention.sdpa_kernel (or torch.backends.cuda.enable_*_sdp) leaves
    flash or memory-efficient attention, the backends the kernels stand in for, enabled."""
    return _flash_enabled() or _efficient_enabled()


def check_shapes(q, k, v, gqa) -> Optional[str]:
    rank = len(q)
    if len(k) != rank or len(v) != rank:
        return "query, key and value have different ranks"
    if rank == 4:
        if k[0] != q[0] or v[0] != q[0]:
            return BATCH_DIMS
    elif k[:-3] != q[:-3] or v[:-3] != q[:-3]:
        return BATCH_DIMS
    if q[-1] != k[-1]:
        return "query and key head dims differ"
    if k[-2] != v[-2]:
        return "key and value lengths differ"
    if k[-3] != v[-3]:
        return "key and value head counts differ"
    if q[-3] != k[-3]:
        if not gqa:
            return "query and key head counts differ without enable_gqa"
        if k[-3] == 0 or q[-3] % k[-3]:
            return "query heads not a multiple of key heads"
    return None


def check_mask(mask, dtype, q, k) -> Optional[str]:
    """``q``, ``k``: shapes; the mask must broadcast to (..., L, S) as PyTorch's does."""
    if mask.dtype != torch.bool and mask.dtype != dtype:
        return "attn_mask dtype is neither bool nor the query dtype"
    target = (*q[:-1], k[-2])
    if mask.dim() > len(target):
        return "attn_mask has more dims than query"
    for have, want in zip(reversed(mask.shape), reversed(target)):
        if have != want and have != 1:
            return "attn_mask does not broadcast to (..., L, S)"
    return None


def describe(q, k, v, dtype, mask, causal, needs_grad, scale=None, dropout_p=0.0) -> Call:
    """The call as a kernel's ``supports()`` sees it (shapes ``q``, ``k``, ``v`` as 4-D,
    leading dims flattened into the batch)."""
    return Call(
        dtype,
        q[0] if len(q) == 4 else math.prod(q[:-3]),
        q[-3],
        k[-3],
        q[-2],
        k[-2],
        q[-1],
        v[-1],
        causal,
        None if mask is None else ("bool" if mask.dtype == torch.bool else "additive"),
        mask is not None and mask.dim() >= 3 and mask.shape[-3] != 1,
        needs_grad,
        scale,
        float(dropout_p),
        needs_grad and mask is not None and mask.requires_grad,
        mask is not None and (mask.dim() < 2 or mask.shape[-2] != q[-2] or mask.shape[-1] != k[-2]),
    )


def configuration(kernel_name: str, device_type: str, call: Call) -> tuple:
    """What makes a distinct compiled kernel: ``call`` without batch and lengths, for
    ``kernel_name`` on ``device_type``. The mask counts by presence and head shape, not by
    kind: the op layer hands every kernel an additive mask, so a bool and an additive mask
    run the same kernel (and the op layer, seeing only the converted mask, finds the same key).
    The scale counts resolved (a kernel may compile it in, as MFA does). ``mask_grad`` and
    ``needs_grad`` come last (a forward failure blocks every value of both: ops.kernel_failed)."""
    dtype, _, q_heads, kv_heads, _, _, head_dim, value_dim, causal, mask, per_head, needs_grad, _, dropout_p, mask_grad, _ = call
    masked, dropout, scale = mask is not None, dropout_p > 0, call.softmax_scale
    return (
        kernel_name, device_type, dtype, head_dim, value_dim, q_heads, kv_heads, scale, causal, masked, per_head,
        dropout, mask_grad, needs_grad,
    )


# names of configuration()'s fields, for messages
CONFIGURATION_FIELDS = (
    "kernel", "device", "dtype", "head_dim", "value_dim", "q_heads", "kv_heads",
    "scale", "causal", "masked", "mask_per_head", "dropout", "mask_grad", "needs_grad",
)


def autocast_inputs(q, k, v, mask):
    """The tensors autocast would hand SDPA: PyTorch's policy for it (lower_precision_fp)
    casts every floating tensor but float64 to the autocast dtype. Call under autocast."""
    dtype = torch.get_autocast_dtype(q.device.type)

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype == torch.float64 or t.dtype == dtype:
            return t
        return t.to(dtype)

    return cast(q), cast(k), cast(v), cast(mask)


def explain(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """None if this SDPA call would go to a kernel, else the reason it would fall back."""
    from . import patch

    if not patch.is_enabled():
        return "metal_flash_sdpa is not enabled"
    if is_causal_bias(attn_mask):
        return CAUSAL_BIAS
    reason = evaluate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0]
    if reason is AUTOCAST:
        query, key, value, attn_mask = autocast_inputs(query, key, value, attn_mask)
        with torch.autocast(query.device.type, enabled=False):
            reason = evaluate(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0]
    return None if reason is _trust.PENDING else reason  # the kernel, until its first call measures
