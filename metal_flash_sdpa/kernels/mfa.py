"""The Metal FlashAttention kernel: ccv's MFA v2, through the native bridge ``_mfa_native``.

What it serves is exactly what the pinned ccv (``subprojects/ccv.wrap``) with our patch
series runs on its runtime-generated v2 path, forward and backward, as verified by the CPU
executor (``tools/engine``; ``verified_rung``):

- float32, float16 and bfloat16 (bfloat16: patch 0005; half outputs go through fp32 scratch
  and one rounding cast, intermediates and LSE in float32);
- head dims up to 512, multiples of 8 (ccv's parameter tables end at 384; patch 0016's rows
  take them to 512); a value head dim that differs from the query's (MLA's 192 / 128) runs
  with the narrower side padded with zeros to the wider (``value_dim``), which all limits
  count;
- grouped-query attention with query heads a multiple of key/value heads, MQA included
  (patch 0006: K/V are read per group, never expanded; dK/dV summed inside the kernel);
- ``is_causal`` (PyTorch's top-left alignment, any query and key lengths), forward and
  backward (patch 0007: tiles above the diagonal skipped by loop bounds, the diagonal
  tiles masked);
- ``attn_mask``, bool or additive, broadcast over batch and heads or per head, forward and
  backward (patch 0008: read in place through its strides, never expanded, a bool mask as
  its bytes, never converted: patch 0012; rows without
  any key give 0, rows masked whole with a large finite value attend uniformly, as in
  PyTorch), not together with ``is_causal`` (PyTorch raises for that);
- heads x head dim under 65536 and tensors (masks included) under 2**32 elements (16-bit
  leading dimensions, 32-bit offsets: ccv would compute wrong results beyond, silently);
- any length whose tensors fit: ccv's fp32 scratch (copies of half outputs, the backward's
  D term) grows with B x H x L x D, so a long call runs as slices of batches or heads,
  each with at most 64 MiB of scratch (patch 0011, native/mfa_params.hpp plan_slices);
  refused only if one smallest slice (one batch's one KV group with its query heads)
  needs more than the device's largest buffer (``max_buffer_length``, from the bridge);
- attention dropout, forward and backward (patch 0015: metal_flash_sdpa.dropout's keep
  decisions, drawn in the kernels from the call's seed, never stored);
- the gradient of an additive mask that requires grad (patch 0017: added by the
  backward-key-value kernel into a zeroed tensor laid out as the mask, one launch per batch
  or key/value group that shares it), but not of a mask broadcast over query rows or keys;
- ``scale`` from 2**-32 to 2**32 (patch 0010: the keys a kernel excludes keep a finite,
  far negative score at every served scale; <= 0 and non-finite scales are refused);
- macOS 14 or later: the kernels compile as Metal 3.1, the first with ``bfloat`` (patch
  0009; PyTorch's MPS backend needs macOS 14 anyway). The bridge reports the macOS
  version when it loads (``macos_major``; NSProcessInfo's compatibility reading 16.x is
  macOS 26).

The bridge re-checks the same limits (``native/mfa_params.hpp``, ``check_limits``).

Everything else falls back to PyTorch. This module is pure Python and imports on any
machine; the native module loads on the first ``available()`` or kernel call.
"""

from __future__ import annotations

import importlib
import platform
import sys
import threading
from typing import Optional

import torch

from .. import dropout as _dropout
from .base import Call, Kernel
from . import value_dim as _value_dim
from .mask_tiles import MaskTiles

NATIVE_MODULE = "metal_flash_sdpa._mfa_native"

# ccv keeps leading dimensions (heads x head dim) in unsigned short
# (ccv_nnc_mfa_attention.cpp, v2/AttentionKernelDescriptor.hpp).
MAX_LEADING_DIMENSION = (1 << 16) - 1
# The kernels offset q, k, v and the outputs by 32-bit products of element counts (batch x
# batch stride, row x leading dimension), each below the tensor's element count.
MAX_ELEMENTS = (1 << 32) - 1
# The scales served (patch 0010): excluded keys (the edge block, above the causal diagonal)
# score -0.875 * FLT_MAX * min(scale, 1) after scaling, finite for every positive scale and
# far below any real score within this range; a scale <= 0 breaks the online softmax's
# running maximum. native/mfa_params.hpp check_scale re-checks it.
MIN_SCALE, MAX_SCALE = 2.0**-32, 2.0**32

_native = None
_native_error: Optional[str] = None
_native_lock = threading.Lock()


def _load_native():
    """The native module, or None with ``_native_error`` saying why; tried once."""
    global _native, _native_error
    if _native is not None or _native_error is not None:
        return _native
    with _native_lock:
        if _native is None and _native_error is None:
            try:
                _native = importlib.import_module(NATIVE_MODULE)
            except ImportError as error:
                _native_error = f"the MFA bridge {NATIVE_MODULE} did not load: {error}"
    return _native


def scratch_bytes(call: Call) -> int:
    """Bytes of ccv's shared scratch buffer the call would need unsliced (forward, or
    backward if ``call.needs_grad``): fp32 copies of 16-bit outputs before their cast, and
    the backward's fp32 D term (as ``scratch_bytes`` in native/mfa_params.hpp)."""
    cast, dim = call.dtype != torch.float32, kernel_head_dim(call)
    q_rows, kv_rows = call.batch * call.q_heads * call.q_len, call.batch * call.kv_heads * call.kv_len
    forward = 4 * q_rows * dim if cast else 0
    if not call.needs_grad:
        return forward
    return max(forward, (4 * (q_rows + 2 * kv_rows) * dim if cast else 0) + 4 * q_rows)


def kernel_head_dim(call: Call) -> int:
    """The head dim the kernels run ``call`` at: the wider of its query and value head dims
    (the narrower side is padded with zeros: ``value_dim``)."""
    return max(call.head_dim, call.value_dim)


def smallest_slice_scratch(call: Call) -> int:
    """Bytes ccv allocates for the smallest slice the call can run as (one batch's one KV
    group; native/mfa_params.hpp plan_slices): what must fit in one device buffer."""
    group = call.q_heads // call.kv_heads if call.kv_heads else call.q_heads
    one = call._replace(batch=1, q_heads=group, kv_heads=1)
    if not call.needs_grad:  # a forward slices down to one query head
        one = one._replace(q_heads=1)
    return scratch_allocation(scratch_bytes(one))


def scratch_allocation(size: int) -> int:
    """What ccv allocates for ``size`` bytes of scratch (patch 0011: whole MiB beyond 1 MiB,
    powers of two below; scratch_allocation in native/mfa_params.hpp)."""
    mib = 1 << 20
    return -(-size // mib) * mib if size > mib else 1 << max(size - 1, 0).bit_length()


class MFAKernel(Kernel):
    name = "mfa"
    # Q/O are read and written as [B, S, H, D] (leading dimension H * D), so a model's
    # x.view(B, S, H, D).transpose(1, 2) reaches the kernel without a copy.
    layout = "BSHD"
    dtypes = frozenset({torch.float32, torch.float16, torch.bfloat16})
    max_head_dim = 512  # patch 0016; tests/test_engine_head_dims.py
    head_dim_multiple = 8
    supports_value_dim_differs = True  # padded to one head dim (value_dim.py); tests/test_engine_head_dims.py
    supports_gqa = True
    causal_forward = "any"  # patch 0007, top-left as is_causal; tests/test_engine_causal.py
    causal_backward = "any"
    # patch 0008: bool and additive, [Sq, Sk], [B or 1, 1 or Hq, Sq, Sk] and broadcast rows;
    # tests/test_engine_mask.py
    mask_forward = True
    mask_backward = True
    mask_per_head = True
    reads_bool_masks = True  # patch 0012: a byte an element, never converted
    # patch 0015: metal_flash_sdpa.dropout's decisions, drawn in the kernels; with causal,
    # masks and GQA; tests/test_engine_dropout.py
    supports_dropout = True
    # patch 0017: the additive mask's gradient, added by the backward-key-value kernel, for
    # masks with a row per query and a column per key; tests/test_engine_mask_grad.py
    supports_mask_grad = True
    # (atol, rtol) for out, dq, dk, dv, from the CPU executor (tools/engine/execute.py: the
    # emitted kernels against float64 PyTorch on the same dtype-rounded inputs) over
    # tests/test_engine_execute.py's matrix with MFA_ENGINE_FULL=1 (every table row, both GPU
    # families and macOS modes, lengths to 1024, two seeds): the worst |ours - float64| /
    # (1 + |float64|) was 1.7e-6 in float32 (out, Apple9, D=384) and 3.3e-4 in float16 (dq:
    # rounding to half dominates). 4x that, rounded up. PyTorch's math SDPA in the dtype was
    # itself up to 8.6e-7 / 3.0e-4 from float64, so ours stays within these of it too: the
    # contract. The CPU does not round like a GPU (fast::exp2): `check --device mps` on a Mac
    # has the last word. float16 runs with float32 intermediates ("upcast"). With a mask
    # (patch 0008; tests/test_engine_mask.py's matrix, six seeds) float32 stayed within 0.16
    # of these; float16 and bfloat16 reached 1.81 (dK) and 1.32 (dQ) of them, in rows that
    # attend a few keys under sharp biases, where PyTorch's own result in the dtype used 1.73
    # and 1.18 of them: ours stayed within twice PyTorch's error, the rule `check` applies
    # beyond the tolerance.
    tolerances = {
        torch.float32: (7e-6, 7e-6),
        torch.float16: (1.5e-3, 1.5e-3),
        # bfloat16 x Apple7/Apple9 x macOS 15/26 x D 32-256 x ragged lengths, B=2, H=3:
        # worst 2.4e-3 (dQ, D=152; PyTorch's own bfloat16 math is 1.9e-3 from float64
        # there), 4x that, rounded up.
        torch.bfloat16: (1e-2, 1e-2),
    }
    # The highest rung of the verification ladder (DESIGN section 10; README "How the kernel
    # side is verified") that the kernels of each served dtype reached, forward and backward:
    # 4 = the emitted Metal, encoded as the bridge encodes it, executed on the CPU against
    # PyTorch (tests/test_engine_execute.py). None has run on a Mac (rung 5).
    verified_rung = {torch.float32: 4, torch.float16: 4, torch.bfloat16: 4}
    # PyTorch 2.13+ has fused MPS forwards that may beat ours on some Macs: calls without
    # grad go to the faster, measured on the user's Mac (trust.py). Its backward is composite.
    calibrated = True
    # Every kernel compiles as Metal 3.1 (patch 0009), which macOS 14 brought.
    min_macos_major = 14
    # The macOS major version the bridge reports when it loads (native/mfa_platform.hpp:
    # NSProcessInfo's 16.x, what processes linked against an older SDK are told on macOS
    # 26, reads as 26); None until then, and off a Mac.
    macos_major: Optional[int] = None
    # The device's maxBufferLength in bytes, as the bridge reports it when it loads; None
    # until then, and off a Mac.
    max_buffer_length: Optional[int] = None

    def available(self) -> Optional[str]:
        if sys.platform != "darwin":
            return f"the MFA kernel needs macOS on Apple silicon (this is {sys.platform})"
        if platform.machine() != "arm64":
            return f"the MFA kernel needs Apple silicon (this machine is {platform.machine()})"
        native = _load_native()
        if native is None:
            return _native_error
        self.macos_major = int(native.macos_major())
        self.max_buffer_length = int(native.max_buffer_length())
        if not torch.backends.mps.is_available():
            return "torch.backends.mps.is_available() is False"
        return None

    def supports(self, call: Call) -> Optional[str]:
        reason = super().supports(call)
        if reason is not None:
            return reason
        if self.macos_major is not None and self.macos_major < self.min_macos_major:
            return (
                f"{self.name} compiles its kernels as Metal 3.1 (bfloat16 needs it), which needs "
                f"macOS {self.min_macos_major}; this is macOS {self.macos_major}"
            )
        if min(call.batch, call.q_heads, call.q_len, call.kv_len, call.head_dim) < 1:
            return f"empty attention not sent to {self.name}"
        scale = call.softmax_scale
        if not MIN_SCALE <= scale <= MAX_SCALE:  # False for NaN
            return f"scale {scale!r} outside the scales {self.name} serves (2**-32 to 2**32; <= 0 and non-finite never)"
        leading = max(call.q_heads, call.kv_heads) * kernel_head_dim(call)
        if leading > MAX_LEADING_DIMENSION:
            return f"heads x head dim {leading} beyond the 16-bit leading dimension of {self.name}"
        elements = call.batch * max(call.q_len * call.q_heads, call.kv_len * call.kv_heads) * kernel_head_dim(call)
        if elements > MAX_ELEMENTS:
            return f"a tensor of {elements} elements beyond the 32-bit offsets of {self.name}"
        if call.mask is not None and call.causal:  # PyTorch raises; the kernels apply one or the other
            return f"is_causal with attn_mask not supported by {self.name}"
        if call.mask_grad and call.needs_grad and call.mask_lines:  # rows would add into one element at once
            return f"attn_mask gradient of a mask broadcast over query rows or keys not supported by {self.name}"
        # the most a mask can span: per batch (and head) elements, whether or not it broadcasts
        mask_elements = call.batch * (call.q_heads if call.mask_per_head else 1) * call.q_len * call.kv_len
        if call.mask is not None and mask_elements > MAX_ELEMENTS:
            return f"an attn_mask of up to {mask_elements} elements beyond the 32-bit offsets of {self.name}"
        if self.max_buffer_length is not None and smallest_slice_scratch(call) > self.max_buffer_length:
            return (
                f"its smallest slice needs {smallest_slice_scratch(call)} bytes of {self.name} scratch, "
                f"beyond this device's largest buffer ({self.max_buffer_length} bytes)"
            )
        return None

    def machine(self, device) -> dict:
        # the bridge's view of this Mac: gpu, macos_version, macos_build, async_copies and
        # metal_language (the probed copy mode and language version the kernels compile with)
        return {key: str(value) for key, value in _require_native().device_info().items()}

    def __init__(self):
        # the tile summaries of masks (patch 0013), reused while a mask is unchanged
        self.mask_tiles = MaskTiles()

    def forward(self, q, k, v, scale: float, causal: bool, mask, dropout=None):
        if q.shape[-1] != v.shape[-1]:
            return _value_dim.forward(self._forward, self.layout, q, k, v, scale, causal, mask, dropout)
        return self._forward(q, k, v, scale, causal, mask, dropout)

    def backward(self, grad_out, q, k, v, out, lse, scale: float, causal: bool, mask, dropout=None, mask_grad=False):
        args = (lse, scale, causal, mask, dropout, mask_grad)
        if q.shape[-1] != v.shape[-1]:
            return _value_dim.backward(self._backward, self.layout, grad_out, q, k, v, out, *args)
        return self._backward(grad_out, q, k, v, out, *args)

    def _forward(self, q, k, v, scale, causal, mask, dropout):
        native = _require_native()
        batch, heads, q_len, _ = q.shape
        # logical [B, H, S, D] views of [B, S, H, D] memory (the op layer's contract)
        out = torch.empty((batch, q_len, heads, v.shape[-1]), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
        q, k, v = (aligned(t.transpose(1, 2)) for t in (q, k, v))
        self._masked(native.attention_forward, (q, k, v, out, lse), scale, causal, mask, False, dropout)
        return out.transpose(1, 2), lse

    def _backward(self, grad_out, q, k, v, out, lse, scale, causal, mask, dropout, mask_grad=False):
        native = _require_native()
        dq, dk, dv = (_empty_bshd(t) for t in (q, k, v))
        q, k, v, grad_out = (aligned(t.transpose(1, 2)) for t in (q, k, v, grad_out))
        tensors = (q, k, v, out.transpose(1, 2), lse, grad_out, dq, dk, dv)
        dmask = None
        if mask_grad:  # patch 0017: the kernels add into a zeroed gradient laid out as the mask
            mask, own = dense(mask)
            dmask = torch.zeros_like(own)
        self._masked(native.attention_backward, tensors, scale, causal, mask, True, dropout, dmask)
        grads = dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
        return grads if dmask is None else (*grads, dmask)

    def _masked(self, encode, tensors, scale, causal, mask, backward, dropout, mask_grad=None):
        """``encode(*tensors, scale, causal, mask, ...)``, a masked call with its mask's tile
        summaries: written by this call unless kept from an earlier one of the same mask;
        ``dropout`` (p, seed) as ccv takes it; ``mask_grad``: the backward's mask gradient,
        the mask's compact form, which the kernels add into (as a view of the mask's strides)."""
        scale, causal = float(scale), bool(causal)
        options = {} if dropout is None else {"dropout": dropout_parameters(*dropout)}
        if mask is None:
            return encode(*tensors, scale, causal, **options)
        mask = keys_contiguous(mask)
        q, k, v = tensors[:3]
        grad = mask_grad is not None
        shape_key = (backward, tuple(q.shape), tuple(k.shape), q.dtype, grad)  # what sizes the summaries
        sizing = dict(options, mask_grad=grad)

        def make():  # builds this call's kernels (with its dropout and gradient), which the summaries are of
            sizes = _require_native().mask_tiles_bytes(q, k, v, scale, causal, mask, backward, **sizing)
            return [torch.empty(size, dtype=torch.uint8, device=q.device) for size in sizes]

        if grad:
            options["mask_grad"] = mask_grad.expand(mask.shape)
        with self.mask_tiles.lock:
            summaries, summarize = self.mask_tiles.get(mask, shape_key, make)
            encode(*tensors, scale, causal, mask, summaries, summarize, **options)
            if summarize:
                self.mask_tiles.written(mask, shape_key)


def keys_contiguous(mask):
    """The op layer's mask ([Bm, Hm, Sq, Sk], maybe a broadcast view) with contiguous keys,
    as the kernels read it (patch 0008: every other dim at its own stride, 0 where it
    broadcasts). Only a mask whose keys are not contiguous is copied, and then only at the
    size it has before broadcasting (over the other dims)."""
    if mask is None or mask.stride(-1) == 1 or mask.shape[-1] == 1:
        return mask
    return _own(mask, keys=False).contiguous().expand(mask.shape)


def dense(mask):
    """-> (``mask``, its own elements): the op layer's 4-D view (stride 0 where it
    broadcasts) read from a dense tensor of its own size, copied there only if its memory has
    gaps. A mask's gradient is laid out as that tensor (zeros_like), so the kernels find each
    element of the gradient at its mask element's place (patch 0017)."""
    own = _own(mask)
    if not own.is_contiguous():
        own = own.contiguous()
        mask = own.expand(mask.shape)
    return mask, own


def _own(mask, keys=True):
    """``mask`` without the repeats of its broadcast dims (the keys' kept unless ``keys``)."""
    strides = mask.stride() if keys else mask.stride()[:-1]
    return mask[tuple(slice(0, 1) if stride == 0 else slice(None) for stride in strides)]


def dropout_parameters(p: float, seed: int) -> tuple:
    """What ccv's dropout (patch 0015) takes for dropout ``p`` and ``seed``: the threshold
    2^32 p (metal_flash_sdpa.dropout.threshold), 1 / (1 - p) rounded to float32, and the
    seed as an unsigned 64-bit int."""
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32).item()
    return _dropout.threshold(p), scale, seed & (2**64 - 1)


def aligned(t):
    """``t``, or a copy of it when its first byte is not at a multiple of 16 in its buffer.
    ccv copies tiles of q, k, v and grad_out with 16-byte vectors (patch 0014) and refuses a
    tensor bound elsewhere; a view at another offset (a slice of a fused projection at an
    odd element) is rare, and copying it keeps the kernels those the self-check ran."""
    if t.storage_offset() * t.element_size() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _empty_bshd(t):
    """Uninitialised [B, S, H, D] memory for the logical [B, H, S, D] tensor ``t``."""
    batch, heads, length, dim = t.shape
    return torch.empty((batch, length, heads, dim), dtype=t.dtype, device=t.device)


def _require_native():
    native = _load_native()
    if native is None:
        raise RuntimeError(_native_error)
    return native
