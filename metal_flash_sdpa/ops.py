"""The op layer: the torch.library ops a dispatched call runs through.

``attention`` and ``attention_backward`` are defined with ``Library.define`` (~2 us per
call, against 10-20 us for ``custom_op``) and have fake implementations, so torch.compile
traces them without graph breaks; ``_Attention`` connects them for autograd. The op
layer owns what is the same for every kernel: flattening to 4-D, the kernel's memory
layout, the default scale, and turning a mask into the 4-D form the contract promises
(additive, or a bool mask as it is for kernels that read bool masks: no per-call copy).

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
import weakref

import torch

from . import config, counters, dropout, kernels, rules, trust

_lib = torch.library.Library("metal_flash_sdpa", "DEF")
# The third output of attention is the dropout seed it drew when it ran (a 0-d int64 CPU
# tensor, so that a compiled graph never freezes one), which its backward is handed back.
# Seeded-nondeterministic: two calls on the same inputs are not one (no CSE in graphs).
_lib.define(
    "attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal, float dropout_p=0.0) "
    "-> (Tensor, Tensor, Tensor)",
    tags=(torch.Tag.nondeterministic_seeded,),
)
_lib.define(
    "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    "Tensor? mask, float scale, bool causal, str? kernel=None, float dropout_p=0.0, Tensor? seed=None, "
    "bool mask_grad=False) -> (Tensor, Tensor, Tensor, Tensor)"
)  # the fourth output: the mask's gradient (``_mask_grad_shape``) with mask_grad, else empty
_failed = kernels.failed
_failed_lock = threading.Lock()  # one warning per configuration, even under threads
_pytorch_sdpa = torch._C._nn.scaled_dot_product_attention  # PyTorch's own, whatever is patched
_aten_math_sdpa = torch.ops.aten._scaled_dot_product_attention_math  # takes a dropout keep mask
_NO_SEED = torch.zeros((), dtype=torch.int64)
# id -> the placeholder lse of a forward the op answered with PyTorch (a compiled graph or
# dispatch mode ran it): its backward is PyTorch's too, whatever the state is by then.
# Keyed by id, checked by identity: a tensor's == compares values.
_answered_by_pytorch = weakref.WeakValueDictionary()
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


def kernel_failed(kernel, error, stage, q, k, v, mask, causal, needs_grad, scale=None, dropout_p=0.0) -> str:
    """Stop sending this call's configuration (``rules.configuration``) to ``kernel`` after
    it raised ``error`` in ``stage`` ("forward" or "backward"), or failed its self-check
    (``trust.SelfCheckFailed``); -> the fallback reason, one per kernel, so that
    ``fallback_counts()`` adds its configurations up.

    ``q``, ``k``, ``v``, ``mask``, ``scale``: the user's call or the op's 4-D one (same configuration).
    A forward failure blocks the configuration with and without grad and the mask's gradient
    (the forward is the same kernel either way); a backward failure only with grad, and with
    the mask's gradient or without it as it failed (other kernels). The first failure of a
    configuration gives one warning line naming the kernel, the configuration and the error.
    """
    checked = isinstance(error, trust.SelfCheckFailed)
    reason = error.reason if checked else f"kernel {kernel.name} failed for this configuration"
    call = _call(q, k, v, mask, causal, needs_grad, scale, dropout_p)
    key = rules.configuration(kernel.name, q.device.type, call)
    # (mask_grad, needs_grad) last: the mask's gradient is asked for only with grad
    keys = [key] if stage == "backward" else [key[:-2] + last for last in ((False, False), (False, True), (True, True))]
    with _failed_lock:
        new = [c for c in keys if c not in _failed]
        _failed.update(dict.fromkeys(new, reason))
    if new and checked:  # the self-check's own line: the variant and the measured error
        config._warn(error.warning)
    elif new:  # warned once blocked: a warnings filter that raises leaves the state consistent
        fields = zip(rules.CONFIGURATION_FIELDS[1:-1], key[1:-1])
        described = " ".join(f"{name}={str(value).replace('torch.', '')}" for name, value in fields)
        config._warn(
            f"metal_flash_sdpa: kernel {kernel.name} failed in {stage} ({described}): "
            f"{trust.error_line(error)}; PyTorch's SDPA "
            f"serves this configuration{' with grad' if stage == 'backward' else ''} from now on"
        )
    return reason


def _call(q, k, v, mask, causal, needs_grad, scale=None, dropout_p=0.0):
    return rules.describe(q.shape, k.shape, v.shape, q.dtype, mask, causal, needs_grad, scale, dropout_p)


def _blocked(kernel, q, k, v, mask, scale, causal, needs_grad, dropout_p=0.0):
    """The fallback reason if this call's configuration is blocked for ``kernel``, else None."""
    call = _call(q, k, v, mask, causal, needs_grad, scale, dropout_p)
    return _failed.get(rules.configuration(kernel.name, q.device.type, call))


def _dropout(dropout_p, seed):
    """What a kernel is handed as ``dropout``: None, or (p, the seed as an int)."""
    return (dropout_p, dropout.seed_value(seed)) if dropout_p else None


def _forward(kernel, q, k, v, mask, scale, causal, dropout_p=0.0, seed=None):
    # the variant's self-check on its first use; counted once the kernel returned: a call it
    # failed on ends up in PyTorch, not here
    _verify(kernel, "forward", q, k, v, mask, scale, causal, bool(dropout_p))
    if dropout_p:  # kernels that never drop need not take the argument
        result = kernel.forward(q, k, v, scale, causal, mask, dropout=_dropout(dropout_p, seed))
    else:
        result = kernel.forward(q, k, v, scale, causal, mask)
    counters.count_dispatch()
    return result


def _backward(kernel, grad_out, q, k, v, out, lse, mask, scale, causal, dropout_p=0.0, seed=None, mask_grad=False):
    """The kernel's backward, -> (dq, dk, dv) or with ``mask_grad`` (dq, dk, dv, dmask);
    PyTorch's gradients if it raises or the configuration is blocked."""
    if not _failed or _blocked(kernel, q, k, v, mask, scale, causal, True, dropout_p) is None:
        options = {}  # kernels that never drop nor differentiate masks need not take these
        if dropout_p:
            options["dropout"] = _dropout(dropout_p, seed)
        if mask_grad:
            options["mask_grad"] = True
        try:
            _verify(kernel, "backward", q, k, v, mask, scale, causal, bool(dropout_p), mask_grad)
            return kernel.backward(grad_out, q, k, v, out, lse, scale, causal, mask, **options)
        except Exception as error:
            kernel_failed(kernel, error, "backward", q, k, v, mask, causal, True, scale, dropout_p)
    return _pytorch_grads(grad_out, q, k, v, mask, scale, causal, False, dropout_p, seed, mask_grad)


def _pytorch_attention(q, k, v, mask, scale, causal, dropout_p=0.0, seed=None):
    """PyTorch's SDPA on the op-level tensors (4-D, 4-D mask, scale resolved); with
    dropout, PyTorch's math SDPA given the kernels' keep decisions for ``seed``."""
    if dropout_p:
        batch, heads, length, _ = q.shape
        keep = dropout.keep_mask(dropout.seed_value(seed), dropout_p, batch, heads, length, k.shape[2], q.device)
        return math_sdpa(q, k, v, mask, causal, scale, dropout_p, keep)
    gqa = k.shape[1] != q.shape[1]
    if gqa:
        return _pytorch_sdpa(q, k, v, mask, 0.0, causal, scale=scale, enable_gqa=True)
    return _pytorch_sdpa(q, k, v, mask, 0.0, causal, scale=scale)


def math_sdpa(q, k, v, mask, causal, scale, dropout_p=0.0, keep=None):
    """PyTorch's math SDPA, its aten op (which takes a dropout keep mask) on 4-D tensors ->
    out; a bool mask as SDPA takes it (the op itself would add it as 0 / 1)."""
    if mask is not None and mask.dtype == torch.bool:
        mask = additive_mask(mask, q.dtype)
    gqa = k.shape[1] != q.shape[1]
    return _aten_math_sdpa(q, k, v, mask, dropout_p, causal, keep, scale=scale, enable_gqa=gqa)[0]


def _with_autograd():
    """A dispatch mode runs the op's implementation with autograd excluded from dispatch
    (grad mode alone does not bring it back): lift that for the recompute."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _pytorch_grads(grad_out, q, k, v, mask, scale, causal, batched=False, dropout_p=0.0, seed=None, mask_grad=False):
    """dq, dk, dv (and with ``mask_grad`` dmask, as a kernel returns it) recomputed by
    PyTorch from the saved inputs, with their strides (the layout the kernel contract and
    the fake implementation promise), except for a ``batched`` grad_out (under vmap), whose
    gradients vmap lays out itself."""
    primals = (q, k, v, mask) if mask_grad else (q, k, v)

    def attention(q, k, v, *masked):
        return _pytorch_attention(q, k, v, masked[0] if masked else mask, scale, causal, dropout_p, seed)

    if _functorch_transform() is not None:  # requires_grad_ is refused inside functorch transforms
        grads = torch.func.vjp(attention, *primals)[1](grad_out)
    else:
        inputs = [t.detach().requires_grad_() for t in primals]
        with _with_autograd(), torch.enable_grad():
            grads = torch.autograd.grad(attention(*inputs), inputs, grad_out)
    if mask_grad:  # PyTorch's is the size of the broadcast mask: summed as a kernel's is
        grads = (*grads[:3], grads[3].sum_to_size(_mask_grad_shape(mask)))
    if batched:
        return grads
    laid_out = (g if g.stride() == t.stride() else torch.empty_like(t).copy_(g) for t, g in zip((q, k, v), grads))
    return (*laid_out, *grads[3:])


def _attention(q, k, v, mask, scale, causal, dropout_p=0.0):
    kernel = _kernel(q.device)
    # drawn as the op runs, also in a compiled graph; a placeholder without dropout
    seed = dropout.draw_seed() if dropout_p else _NO_SEED.clone()
    if not rules.fused_backends_selected():  # compiled graphs decide as they run
        reason = rules.BACKENDS
    else:
        reason = _blocked(kernel, q, k, v, mask, scale, causal, False, dropout_p) if _failed else None
    if reason is None:
        try:
            return (*_forward(kernel, q, k, v, mask, scale, causal, dropout_p, seed), seed)
        except Exception as error:
            reason = kernel_failed(kernel, error, "forward", q, k, v, mask, causal, False, scale, dropout_p)
    # Run by a compiled graph or under a dispatch mode: no user call to hand back to, so
    # PyTorch answers from these tensors. The lse is a placeholder, remembered so that the
    # backward recomputes with PyTorch and never reads it.
    counters.count_fallback(reason)
    batch, heads, length, _ = q.shape
    out = to_layout(_pytorch_attention(q, k, v, mask, scale, causal, dropout_p, seed), kernel.layout)
    lse = q.new_zeros((batch, heads, length), dtype=_lse_dtype(q.dtype))
    _answered_by_pytorch[id(lse)] = lse
    return out, lse, seed


def _attention_backward(
    grad_out, q, k, v, out, lse, mask, scale, causal, kernel=None, dropout_p=0.0, seed=None, mask_grad=False
):
    current = kernels.by_device.get(q.device) or kernels.resolve(q.device)
    answered_by_kernel = _answered_by_pytorch.get(id(lse)) is not lse
    if answered_by_kernel and type(current) is not str and (kernel is None or current.name == kernel):
        grads = _backward(current, grad_out, q, k, v, out, lse, mask, scale, causal, dropout_p, seed, mask_grad)
    else:  # PyTorch answered the forward, or the registry changed since: no kernel can read the lse
        grads = _pytorch_grads(grad_out, q, k, v, mask, scale, causal, False, dropout_p, seed, mask_grad)
    return grads if mask_grad else (*grads, q.new_empty(0))


_lib.impl("attention", _attention, "CompositeExplicitAutograd")
_lib.impl("attention_backward", _attention_backward, "CompositeExplicitAutograd")


@torch.library.register_fake("metal_flash_sdpa::attention")
def _attention_fake(q, k, v, mask, scale, causal, dropout_p=0.0):
    layout = _kernel(q.device, cache=False).layout
    batch, heads, length, _ = q.shape
    out = _empty((batch, heads, length, v.shape[-1]), layout, q)
    seed = torch.empty((), dtype=torch.int64, device="cpu")
    return out, q.new_empty((batch, heads, length), dtype=_lse_dtype(q.dtype)), seed


@torch.library.register_fake("metal_flash_sdpa::attention_backward")
def _attention_backward_fake(
    grad_out, q, k, v, out, lse, mask, scale, causal, kernel=None, dropout_p=0.0, seed=None, mask_grad=False
):
    layout = _kernel(q.device, cache=False).layout
    dmask = mask.new_empty(_mask_grad_shape(mask)) if mask_grad else q.new_empty(0)
    return _empty(q.shape, layout, q), _empty(k.shape, layout, k), _empty(v.shape, layout, v), dmask


def _mask_grad_shape(mask):
    """The shape of an additive mask's gradient as kernels return it: 1 where it broadcasts."""
    return tuple(1 if stride == 0 or size == 1 else size for size, stride in zip(mask.shape, mask.stride()))


class _Attention(torch.autograd.Function):
    """Autograd for the attention op (an autograd.Function: ~4.5 us, against ~18 us for
    torch.library.register_autograd's Python wrapper); torch.compile traces it."""

    @staticmethod
    def forward(ctx, kernel, q, k, v, mask, scale, causal, dropout_p):
        # ``mask`` not yet expanded over rows and keys: a learned bias's gradient comes back
        # at its own size (the kernel sums over what broadcasts)
        mask = None if mask is None else _expand_mask(mask, q.shape[2], k.shape[2])
        out, lse, seed = _run_attention(kernel, q, k, v, mask, scale, causal, dropout_p)
        ctx.save_for_backward(q, k, v, out, lse, mask, seed)
        ctx.kernel = kernel  # the backward must be this kernel's: only it reads its lse
        ctx.scale = scale
        ctx.causal = causal
        ctx.dropout_p = dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask, seed = ctx.saved_tensors
        kernel, scale, causal, dropout_p = ctx.kernel, ctx.scale, ctx.causal, ctx.dropout_p
        mask_grad = ctx.needs_input_grad[4]
        if _is_compiling() or _dispatch_modes():
            grad_out = to_layout(grad_out, kernel.layout)
            grads = _attention_backward_op(
                grad_out, q, k, v, out, lse, mask, scale, causal, kernel.name, dropout_p, seed, mask_grad
            )
        elif _functorch_transform() is not None or _is_legacy_batched(grad_out):
            # under vmap (is_grads_batched, gradcheck's batched check, torch.func.vmap over
            # a backward): a kernel cannot batch, PyTorch's own backward can
            grads = _pytorch_grads(grad_out, q, k, v, mask, scale, causal, True, dropout_p, seed, mask_grad)
        else:
            grad_out = to_layout(grad_out, kernel.layout)
            grads = _backward(kernel, grad_out, q, k, v, out, lse, mask, scale, causal, dropout_p, seed, mask_grad)
        return None, *grads[:3], grads[3] if mask_grad else None, None, None, None


_attention_op = torch.ops.metal_flash_sdpa.attention.default
_attention_backward_op = torch.ops.metal_flash_sdpa.attention_backward.default
_is_compiling = torch.compiler.is_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_transform = torch._C._functorch.peek_interpreter_stack
_is_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def _run_attention(kernel, q, k, v, mask, scale, causal, dropout_p):
    """-> (out, lse, the dropout seed: None without dropout in eager)."""
    # Eager with no dispatch mode active, the dispatcher would only call _attention: skip
    # its ~2 us (a kernel failure propagates, and the caller answers with PyTorch's SDPA).
    # Compiled graphs and dispatch modes (fake tensors, flop counters) see the op.
    if _is_compiling() or _dispatch_modes():
        return _attention_op(q, k, v, mask, scale, causal, dropout_p)
    seed = dropout.draw_seed() if dropout_p else None
    return (*_forward(kernel, q, k, v, mask, scale, causal, dropout_p, seed), seed)


def _as_4d(t):
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        return t.unsqueeze(0)
    return t.reshape(-1, *t.shape[-3:])


def additive_mask(mask, dtype):
    """A bool mask (True = attend) as the additive one of ``dtype``: 0 / -inf."""
    return mask.new_full(mask.shape, -math.inf, dtype=dtype).masked_fill_(mask, 0.0)


def kernel_mask_4d(mask, q, kv_len, reads_bool=False):
    """``mask`` as the kernel contract wants it: [Bm, Hm, Sq, Sk], additive in q's dtype,
    or a bool mask as it is (a view) for a kernel that ``reads_bool_masks``."""
    return _expand_mask(_mask_4d(mask, q, reads_bool), q.shape[-2], kv_len)


def _expand_mask(mask, q_len, kv_len):
    return mask.expand(mask.shape[0], mask.shape[1], q_len, kv_len)


def _mask_4d(mask, q, reads_bool=False):
    """``mask`` 4-D [Bm, Hm, Sq or 1, Sk or 1], not yet expanded: additive in q's dtype, or
    bool as it is (views only) when ``reads_bool``."""
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
    if mask.dtype == torch.bool and not reads_bool:  # converted before broadcasting, to stay small
        mask = additive_mask(mask, q.dtype)
    return mask


def attention(kernel, q, k, v, mask, causal, scale, needs_grad, dropout_p=0.0):
    """Run a call the rules accepted for ``kernel``; returns SDPA's output. Raises what the
    kernel raises: the dispatcher then answers the call with PyTorch's SDPA."""
    layout = kernel.layout
    if mask is not None:
        mask = _mask_4d(mask, q, kernel.reads_bool_masks)
        if mask.requires_grad and any(stride == 0 and size > 1 for size, stride in zip(mask.shape, mask.stride())):
            # an expanded view of a learned bias: autograd wants its gradient per element
            # (and sums it itself), where a kernel sums over every dim of stride 0
            mask = mask.contiguous()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q4, k4, v4 = to_layout(_as_4d(q), layout), to_layout(_as_4d(k), layout), to_layout(_as_4d(v), layout)
    dropout_p = float(dropout_p)
    if needs_grad:
        out = _Attention.apply(kernel, q4, k4, v4, mask, scale, causal, dropout_p)
    else:  # nothing saved for backward
        if mask is not None:
            mask = _expand_mask(mask, q.shape[-2], k.shape[-2])
        out = _run_attention(kernel, q4, k4, v4, mask, scale, causal, dropout_p)[0]
    return out if q.dim() == 4 else out.view(*q.shape[:-1], v.shape[-1])
