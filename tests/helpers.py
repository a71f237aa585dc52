"""Comparisons against PyTorch's SDPA shared by the correctness tests."""

import torch

import metal_flash_sdpa
from conftest import pytorch_sdpa
from metal_flash_sdpa import rules
from metal_flash_sdpa.check import compare


def fallbacks():
    """fallback_counts() but for the tests' own PyTorch calls (inside disabled())."""
    return {reason: n for reason, n in metal_flash_sdpa.fallback_counts().items() if reason != rules.DISABLED}


class RecordingKernel(metal_flash_sdpa.ReferenceKernel):
    """The reference kernel, recording the ``dropout`` argument of every forward and backward,
    and in ``masks`` (stage, the mask it was handed)."""

    name = "recording"

    def __init__(self, block_size=16):
        super().__init__(block_size)
        self.forwards, self.backwards, self.masks = [], [], []

    def forward(self, *args, dropout=None):
        self.forwards.append(dropout)
        self.masks.append(("forward", args[5]))  # q, k, v, scale, causal, mask
        return super().forward(*args, dropout=dropout)

    def backward(self, *args, dropout=None):
        self.backwards.append(dropout)
        self.masks.append(("backward", args[8]))  # grad_out, q, k, v, out, lse, scale, causal, mask
        return super().backward(*args, dropout=dropout)


# What MFAKernel declares of the calls it serves (its capability attributes).
MFA_CAPABILITIES = (
    "dtypes",
    "max_head_dim",
    "head_dim_multiple",
    "supports_value_dim_differs",
    "supports_gqa",
    "causal_forward",
    "causal_backward",
    "mask_forward",
    "mask_backward",
    "mask_per_head",
    "supports_dropout",
    "supports_mask_grad",
)


def with_mfa_capabilities(cls):
    """A kernel class (an MFAKernel subclass computing as another kernel) given MFAKernel's
    capability attributes and tolerances, as a class decorator."""
    from metal_flash_sdpa.kernels.mfa import MFAKernel

    for attribute in (*MFA_CAPABILITIES, "tolerances"):
        setattr(cls, attribute, getattr(MFAKernel, attribute))
    return cls


class RecordingBridge:
    """Stands in for MFAKernel's native bridge: records per call (pass, summarize, the
    summaries' ids) in ``calls``, the tensors it is handed in ``tensors`` and its dropout
    argument in ``dropouts`` (``sized``: that of each summary sizing); sizes summaries by
    the mask."""

    def __init__(self):
        self.calls = []
        self.tensors = []
        self.dropouts = []
        self.sized = []

    def mask_tiles_bytes(self, q, k, v, scale, causal, mask, backward, dropout=None, mask_grad=False):
        self.sized.append(dropout)
        return [mask.shape[-2] + 8] * (2 if backward else 1)

    def attention_forward(self, q, k, v, out, lse, scale, causal, mask=None, tiles=(), summarize=True, dropout=None):
        self.calls.append(("forward", mask is not None and summarize, [id(t) for t in tiles]))
        self.tensors.append((q, k, v, out, lse))
        self.dropouts.append(dropout)

    def attention_backward(
        self, q, k, v, out, lse, grad_out, dq, dk, dv, scale, causal, mask=None, tiles=(), summarize=True, dropout=None,
        mask_grad=None,
    ):
        self.calls.append(("backward", mask is not None and summarize, [id(t) for t in tiles]))
        self.tensors.append((q, k, v, out, lse, grad_out, dq, dk, dv) + ((mask, mask_grad) if mask_grad is not None else ()))
        self.dropouts.append(dropout)


class NoDropoutKernel(metal_flash_sdpa.ReferenceKernel):
    name = "no-dropout"
    supports_dropout = False


def _grads(out, inputs, grad_out):
    wanted = [t for t in inputs if t.requires_grad]
    return torch.autograd.grad(out, wanted, grad_out) if wanted else ()


def compare_with_pytorch(fn_inputs, kwargs, tolerances, check_grads=True):
    """Run the patched SDPA and PyTorch's (same dtype, and float64 as gold) on the same
    inputs; assert each result passes ``check.compare``, the criterion
    ``python -m metal_flash_sdpa check`` applies."""
    q, k, v = fn_inputs[:3]
    mask = kwargs.get("attn_mask")
    ours = torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    theirs = pytorch_sdpa(q, k, v, **kwargs)
    gold_inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in (q, k, v)]
    gold_kwargs = dict(kwargs)
    if mask is not None and mask.dtype != torch.bool:
        gold_kwargs["attn_mask"] = mask.double()
    gold = pytorch_sdpa(*gold_inputs, **gold_kwargs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    pairs = [("out", ours, theirs, gold)]
    if check_grads and ours.requires_grad:
        grad_out = torch.randn_like(ours)
        names = [n for n, t in zip("qkv", (q, k, v)) if t.requires_grad]
        pairs += zip(
            [f"d{n}" for n in names],
            _grads(ours, (q, k, v), grad_out),
            _grads(theirs, (q, k, v), grad_out),
            _grads(gold, gold_inputs, grad_out.double()),
        )
    atol, rtol = tolerances[q.dtype]
    for name, a, b, g in pairs:
        miss = compare(a.double(), b.double(), g.double(), atol, rtol)
        assert miss is None, f"{name}: {miss}; max |ours - pytorch| = {(a.double() - b.double()).abs().max().item():.3g}"
    return ours
