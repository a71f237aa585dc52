"""The kernel contract (DESIGN section 6): what every kernel declares and implements.

A kernel states its limits as data; ``supports()`` turns them into a reason string, so the
dispatcher, ``explain()`` and the docs all read the same facts. Nothing here touches a
device: ``supports()`` must be pure Python and cheap, because it runs on every call.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch


class Call(NamedTuple):
    """A valid SDPA call, reduced to what a kernel needs to decide whether it can serve it.

    Shapes are the flattened 4-D view the op layer hands the kernel:
    q ``[batch, q_heads, q_len, head_dim]``, k ``[batch, kv_heads, kv_len, head_dim]``,
    v ``[batch, kv_heads, kv_len, value_dim]``.
    """

    dtype: torch.dtype
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    value_dim: int
    causal: bool  # PyTorch's is_causal: top-left aligned
    mask: Optional[str]  # None, "bool" or "additive" (as the user passed it)
    mask_per_head: bool  # the mask differs between heads (its head dim is not 1)
    needs_grad: bool  # autograd will ask this kernel for a backward
    scale: Optional[float] = None  # SDPA's scale argument; None: 1/sqrt(head_dim)
    dropout_p: float = 0.0  # in [0, 1): the rules send no other value to a kernel
    mask_grad: bool = False  # an additive mask that requires grad: the backward returns its gradient
    mask_lines: bool = False  # the mask broadcasts over query rows or keys (its dim -2 or -1 is 1)

    @property
    def softmax_scale(self) -> float:
        """The scale the kernel applies to q @ k^T: the argument, or SDPA's default (PyTorch's
        and the op layer's expression: head_dim ** -0.5 differs in the last bit for some dims)."""
        return 1.0 / math.sqrt(self.head_dim) if self.scale is None else float(self.scale)


class Kernel:
    """Base class: subclasses set the capability attributes and implement the three methods."""

    name = "kernel"
    # Memory order the kernel reads and writes, outermost first. The op layer makes
    # q/k/v/grad_out contiguous in this order (a no-op when they already are) and passes
    # them as logical [B, H, S, D] views; outputs come back as logical [B, H, S, D] too.
    layout = "BHSD"  # or "BSHD"
    dtypes: frozenset = frozenset()
    max_head_dim = 0
    head_dim_multiple = 1  # head dims must be a multiple of this
    supports_value_dim_differs = False
    supports_gqa = False
    # Causal (PyTorch top-left alignment): "any" length, "square" only when q_len == kv_len
    # (where top-left and bottom-right agree), or None.
    causal_forward: Optional[str] = None
    causal_backward: Optional[str] = None
    mask_forward = False
    mask_backward = False
    mask_per_head = False  # False: masks must broadcast over heads
    # Whether ``forward``/``backward`` take a bool mask as it is; else the op layer converts
    # it to 0 / -inf in q's dtype on every call, at the mask's size.
    reads_bool_masks = False
    # Attention dropout with metal_flash_sdpa.dropout's keep decisions, forward and backward
    supports_dropout = False
    # The gradient of an additive mask (learned biases: T5's relative positions, ALiBi-like)
    supports_mask_grad = False
    # Whether calls without grad are timed against PyTorch's SDPA on this machine (trust.py,
    # MFA_CALIBRATE) and sent to the faster: for kernels that stand in for PyTorch's own
    # fused kernels, not for test and reference kernels.
    calibrated = False
    # Per-dtype tolerances this kernel promises against PyTorch's math SDPA: (atol, rtol).
    tolerances: dict = {}

    def available(self) -> Optional[str]:
        """None when the kernel can run on this machine, else why not."""
        return None

    def supports(self, call: Call) -> Optional[str]:
        """None when this kernel serves ``call``, else the first reason it does not."""
        if call.dtype not in self.dtypes:
            return f"dtype {str(call.dtype).replace('torch.', '')} not supported by {self.name}"
        for dim in (call.head_dim, call.value_dim):
            if dim > self.max_head_dim or dim % self.head_dim_multiple:
                return f"head dim {dim} not supported by {self.name}"
        if call.value_dim != call.head_dim and not self.supports_value_dim_differs:
            return f"value head dim != query head dim not supported by {self.name}"
        if call.q_heads != call.kv_heads and not self.supports_gqa:
            return f"grouped-query attention not supported by {self.name}"
        if call.causal:
            reason = self._check_causal(call, self.causal_backward if call.needs_grad else self.causal_forward)
            if reason:
                return reason + (" with grad" if call.needs_grad else "")
        if call.dropout_p and not self.supports_dropout:
            return f"dropout not supported by {self.name}"
        if call.mask is not None:
            if not (self.mask_backward if call.needs_grad else self.mask_forward):
                return f"attn_mask not supported by {self.name}" + (" with grad" if call.needs_grad else "")
            if call.mask_per_head and not self.mask_per_head:
                return f"per-head attn_mask not supported by {self.name}"
            if call.needs_grad and call.mask_grad and not self.supports_mask_grad:
                return f"attn_mask gradient not supported by {self.name}"
        return None

    def _check_causal(self, call: Call, alignment: Optional[str]) -> Optional[str]:
        if alignment == "any":
            return None
        if alignment == "square" and call.q_len == call.kv_len:
            return None
        if alignment == "square":
            return f"is_causal with q_len != kv_len not supported by {self.name}"
        return f"is_causal not supported by {self.name}"

    def machine(self, device) -> dict:
        """What of ``device`` can change this kernel's results, as strings: the self-check keys
        its verdicts with it (``metal_flash_sdpa.trust``). Here the device type and, where torch
        knows it, the device's name."""
        info = {"device": device.type}
        get_name = getattr(getattr(torch, device.type, None), "get_device_name", None)
        if get_name is not None:
            try:
                info["name"] = str(get_name(device))
            except Exception:  # a device module that cannot name this device: the type is all
                pass
        return info

    def forward(self, q, k, v, scale: float, causal: bool, mask, dropout=None):
        """-> (out, lse).

        ``out``: logical ``[B, Hq, Sq, Dv]`` in q's dtype, memory contiguous in ``layout``
        order. ``lse``: ``[B, Hq, Sq]``, contiguous, float32 (float64 for float64 inputs);
        the kernel's own per-row statistic, read only by its backward.
        ``mask`` is None or a mask, 4-D ``[Bm, Hm, Sq, Sk]`` with ``Bm`` in (1, B) and
        ``Hm`` in (1, Hq), possibly a broadcast (stride-0) view: additive in q's dtype, or
        the user's bool mask (True = attend, a view of it) for a kernel that
        ``reads_bool_masks``; for others the op layer converted it to 0 / -inf.
        ``dropout``: passed only to a kernel that ``supports_dropout``, and only when the call
        drops: ``(p, seed)``, 0 < p < 1 and a 64-bit seed; probabilities are kept as
        ``metal_flash_sdpa.dropout.keep_mask`` decides and scaled by 1/(1-p), after the
        softmax statistics (``lse`` is that of the softmax without dropout).
        """
        raise NotImplementedError

    def backward(self, grad_out, q, k, v, out, lse, scale: float, causal: bool, mask, dropout=None, mask_grad=False):
        """-> (dq, dk, dv) with the shapes and dtypes of q, k, v, contiguous in ``layout``
        order; GQA grads summed over the query heads of each key head. ``grad_out`` is
        contiguous in ``layout`` order. ``dropout``: the forward's, when it dropped.
        ``mask_grad`` (passed only to a kernel that ``supports_mask_grad``): also return
        dmask, the gradient of the scores summed over every dim the mask broadcasts (size 1
        where ``mask``'s stride is 0), in the mask's dtype: (dq, dk, dv, dmask)."""
        raise NotImplementedError
