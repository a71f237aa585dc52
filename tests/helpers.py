"""Comparisons against PyTorch's SDPA shared by the correctness tests."""

import torch

from conftest import pytorch_sdpa


def _grads(out, inputs, grad_out):
    wanted = [t for t in inputs if t.requires_grad]
    return torch.autograd.grad(out, wanted, grad_out) if wanted else ()


def compare_with_pytorch(fn_inputs, kwargs, tolerances, check_grads=True):
    """Run the patched SDPA and PyTorch's (same dtype, and float64 as gold) on the same
    inputs; assert ours is within the kernel's tolerance of PyTorch, or no further from
    the float64 result than twice PyTorch's own error (half types round differently)."""
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
        close = torch.isclose(a.double(), b.double(), atol=atol, rtol=rtol).all()
        ours_error = (a.double() - g).abs().max().item()
        their_error = (b.double() - g).abs().max().item()
        assert close or ours_error <= 2 * their_error + atol, (
            f"{name}: max |ours - float64| = {ours_error:.3g}, max |pytorch - float64| = {their_error:.3g}, "
            f"max |ours - pytorch| = {(a.double() - b.double()).abs().max().item():.3g}"
        )
    return ours
