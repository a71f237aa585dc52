"""The accelerated path end to end on CPU: the reference kernel against PyTorch's SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F

import metal_flash_sdpa
from helpers import compare_with_pytorch
from metal_flash_sdpa import ReferenceKernel, rules
from metal_flash_sdpa.patterns import padding_causal_mask

TOL = ReferenceKernel.tolerances
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rand(*shape, dtype=torch.float32, grad=True):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# name -> (q shape, k shape, v shape, kwargs factory)
PATTERNS = {
    "causal": ((2, 4, 64, 32), (2, 4, 64, 32), (2, 4, 64, 32), lambda d: dict(is_causal=True)),
    "causal prefill Sq<Sk": ((2, 2, 40, 32), (2, 2, 72, 32), (2, 2, 72, 32), lambda d: dict(is_causal=True)),
    "causal Sq>Sk": ((1, 2, 72, 32), (1, 2, 40, 32), (1, 2, 40, 32), lambda d: dict(is_causal=True)),
    "gqa": ((2, 8, 48, 32), (2, 2, 48, 32), (2, 2, 48, 32), lambda d: dict(enable_gqa=True)),
    "gqa causal": ((1, 6, 48, 32), (1, 2, 48, 32), (1, 2, 48, 32), lambda d: dict(enable_gqa=True, is_causal=True)),
    "bool mask": (
        (2, 2, 40, 32), (2, 2, 56, 32), (2, 2, 56, 32),
        lambda d: dict(attn_mask=(torch.rand(2, 1, 40, 56) > 0.3) | torch.eye(40, 56, dtype=torch.bool)),
    ),
    "additive per-head mask": (
        (1, 3, 40, 32), (1, 3, 40, 32), (1, 3, 40, 32),
        lambda d: dict(attn_mask=torch.randn(1, 3, 40, 40, dtype=d)),
    ),
    "padding+causal 4-D mask": ((2, 2, 48, 32), (2, 2, 48, 32), (2, 2, 48, 32), lambda d: dict(attn_mask=padding_causal_mask(2, 48))),
    "all-True mask": ((1, 2, 40, 32), (1, 2, 40, 32), (1, 2, 40, 32), lambda d: dict(attn_mask=torch.ones(40, 40, dtype=torch.bool))),
    "no mask, long": ((1, 2, 320, 64), (1, 2, 320, 64), (1, 2, 320, 64), lambda d: {}),
    "3-D": ((4, 40, 32), (4, 56, 32), (4, 56, 32), lambda d: {}),
    "Dv != D": ((1, 2, 40, 32), (1, 2, 40, 32), (1, 2, 40, 64), lambda d: dict(scale=0.3)),
    "5-D, broadcast mask": (
        (2, 2, 2, 40, 16), (2, 2, 2, 40, 16), (2, 2, 2, 40, 16),
        lambda d: dict(attn_mask=torch.rand(2, 1, 1, 40, 40) > 0.2),
    ),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pattern_forward_and_backward(reference_cpu, pattern, dtype):
    q_shape, k_shape, v_shape, make_kwargs = PATTERNS[pattern]
    q, k, v = rand(*q_shape, dtype=dtype), rand(*k_shape, dtype=dtype), rand(*v_shape, dtype=dtype)
    kwargs = make_kwargs(dtype)
    assert metal_flash_sdpa.explain(q, k, v, **kwargs) is None
    before = metal_flash_sdpa.get_dispatch_count()
    compare_with_pytorch((q, k, v), kwargs, TOL)
    assert metal_flash_sdpa.get_dispatch_count() == before + 1
    assert set(metal_flash_sdpa.fallback_counts()) == {rules.DISABLED}  # PyTorch's own, for comparison


@pytest.mark.parametrize("head_dim", [32, 64, 80, 128, 256])
def test_head_dims(reference_cpu, head_dim):
    q, k, v = (rand(1, 2, 48, head_dim) for _ in range(3))
    compare_with_pytorch((q, k, v), dict(is_causal=True), TOL)
    assert metal_flash_sdpa.get_dispatch_count() == 1


@pytest.mark.parametrize("needs", ["q", "k", "v", "qk", "kv", "qv"])
def test_requires_grad_on_any_subset(reference_cpu, needs):
    q, k, v = (rand(1, 2, 40, 32, grad=name in needs) for name in "qkv")
    compare_with_pytorch((q, k, v), dict(is_causal=True), TOL)


def test_non_contiguous_inputs(reference_cpu):
    # transformers' layout: [B, S, H, D] projected, then transposed to [B, H, S, D]
    q, k, v = (rand(2, 40, 4, 32).transpose(1, 2) for _ in range(3))
    assert not q.is_contiguous()
    compare_with_pytorch((q, k, v), dict(is_causal=True), TOL)
    sliced = rand(1, 2, 40, 64)[..., ::2]
    compare_with_pytorch((sliced, sliced, sliced), {}, TOL)


def test_fully_masked_rows_give_zero_like_pytorch(reference_cpu):
    q, k, v = (rand(1, 2, 40, 32) for _ in range(3))
    mask = torch.ones(1, 1, 40, 40, dtype=torch.bool)
    mask[..., 3, :] = False
    out = compare_with_pytorch((q, k, v), dict(attn_mask=mask), TOL)
    assert torch.equal(out[..., 3, :], torch.zeros_like(out[..., 3, :]))
    additive = torch.zeros(1, 1, 40, 40).masked_fill(~mask, -math.inf)
    compare_with_pytorch((q, k, v), dict(attn_mask=additive), TOL)
    # finfo.min instead of -inf: a fully masked row is a uniform average, not zero
    finite = torch.zeros(1, 1, 40, 40).masked_fill(~mask, torch.finfo(torch.float32).min)
    out = compare_with_pytorch((q, k, v), dict(attn_mask=finite), TOL)
    torch.testing.assert_close(out[..., 3, :], v.mean(-2))


def test_blockwise_reference_matches_single_block():
    q, k, v = (torch.randn(1, 2, 100, 16) for _ in range(3))
    a = ReferenceKernel(block_size=7).forward(q, k, v, 0.25, True, None)
    b = ReferenceKernel(block_size=1000).forward(q, k, v, 0.25, True, None)
    torch.testing.assert_close(a, b)


def test_gradcheck_float64(reference_cpu):
    torch.manual_seed(0)
    q = rand(1, 4, 9, 8, dtype=torch.float64)
    k = rand(1, 2, 11, 8, dtype=torch.float64)
    v = rand(1, 2, 11, 6, dtype=torch.float64)
    mask = torch.randn(1, 1, 9, 11, dtype=torch.float64)

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    assert torch.autograd.gradcheck(attention, (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v)
    )
    assert metal_flash_sdpa.get_dispatch_count() > 0


def _saved_tensors(out):
    """Tensors autograd saved for ``out``'s backward (none when nothing will be needed)."""
    if out.grad_fn is None:
        return []
    return [t for t in out.grad_fn.saved_tensors if t is not None]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_nothing_saved_without_grad(reference_cpu, mode):
    q, k, v = (rand(1, 2, 40, 32) for _ in range(3))
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        expected = (torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(32) + torch.full((40, 40), -math.inf).triu(1), -1)) @ v
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    assert metal_flash_sdpa.get_dispatch_count() == 1


def test_saves_for_backward_only_what_backward_needs(reference_cpu):
    q, k, v = (rand(1, 2, 40, 32) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    saved = _saved_tensors(out)
    # q, k, v, the output and the per-row statistic: nothing of size Sq x Sk
    assert len(saved) == 5
    assert all(t.numel() <= 40 * 2 * 32 for t in saved)


def test_output_layout_is_usable_like_pytorchs(reference_cpu):
    q, k, v = (rand(2, 40, 4, 32).transpose(1, 2) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v)
    merged = out.transpose(1, 2).reshape(2, 40, 128)  # what attention modules do next
    torch.testing.assert_close(merged, pytorch_out(q, k, v).transpose(1, 2).reshape(2, 40, 128), atol=2e-5, rtol=1e-4)


def pytorch_out(*args, **kwargs):
    from conftest import pytorch_sdpa

    return pytorch_sdpa(*args, **kwargs)
