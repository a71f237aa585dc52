"""torch.compile: a dispatched call compiles with zero graph breaks and reaches the kernel."""

import pytest
import torch
import torch.nn.functional as F

import metal_flash_sdpa
from metal_flash_sdpa import ops


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def attention_loss(q, k, v, mask=None, causal=False):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True).square().sum()


def inputs():
    q = torch.randn(1, 4, 24, 16, requires_grad=True)
    k = torch.randn(1, 2, 24, 16, requires_grad=True)
    v = torch.randn(1, 2, 24, 16, requires_grad=True)
    return q, k, v


def grads(fn, q, k, v, **kwargs):
    loss = fn(q, k, v, **kwargs)
    return (loss, *torch.autograd.grad(loss, (q, k, v)))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_fullgraph_forward_backward_reaches_kernel(reference_cpu, backend):
    q, k, v = inputs()
    mask = torch.rand(1, 1, 24, 24) > 0.2
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(attention_loss, fullgraph=True, backend=backend)
    got = grads(compiled, q, k, v, mask=mask)
    assert metal_flash_sdpa.get_dispatch_count() == 1, "the compiled graph did not call the kernel"
    expected = grads(attention_loss, q, k, v, mask=mask)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert dict(counters["graph_break"]) == {}
    compiled(q, k, v, mask=mask)
    assert metal_flash_sdpa.get_dispatch_count() == 3  # eager run + second compiled run


def test_compiled_causal_and_fallback(reference_cpu):
    q, k, v = inputs()
    compiled = torch.compile(attention_loss, fullgraph=True, backend="aot_eager")
    got = grads(compiled, q, k, v, causal=True)
    expected = grads(attention_loss, q, k, v, causal=True)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # a call the rules refuse compiles to PyTorch's own SDPA
    metal_flash_sdpa.MIN_SEQ_LEN = 1000
    torch._dynamo.reset()
    metal_flash_sdpa.reset_dispatch_count()
    with torch.no_grad():
        out = torch.compile(attention_loss, fullgraph=True, backend="aot_eager")(q, k, v)
    assert metal_flash_sdpa.get_dispatch_count() == 0
    torch.testing.assert_close(out, attention_loss(q, k, v))


def test_disable_recompiles_to_pytorch(reference_cpu):
    q, k, v = inputs()
    compiled = torch.compile(attention_loss, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        compiled(q, k, v)
        assert metal_flash_sdpa.get_dispatch_count() == 1
        metal_flash_sdpa.disable()
        compiled(q, k, v)
    assert metal_flash_sdpa.get_dispatch_count() == 1


def test_opcheck(reference_cpu):
    q = torch.randn(2, 4, 20, 16)
    k = torch.randn(2, 2, 20, 16)
    v = torch.randn(2, 2, 20, 8)
    mask = torch.randn(2, 1, 20, 20)
    torch.library.opcheck(torch.ops.metal_flash_sdpa.attention.default, (q, k, v, mask, 0.25, False))
    torch.library.opcheck(torch.ops.metal_flash_sdpa.attention.default, (q, k, v, None, 0.25, True))
    out, lse, _ = ops._attention_op(q, k, v, None, 0.25, True)
    grad = torch.randn_like(out)
    torch.library.opcheck(
        torch.ops.metal_flash_sdpa.attention_backward.default, (grad, q, k, v, out, lse, None, 0.25, True)
    )
    # with dropout: the seed the forward drew, handed to the backward
    torch.library.opcheck(torch.ops.metal_flash_sdpa.attention.default, (q, k, v, mask, 0.25, False, 0.2))
    out, lse, seed = ops._attention_op(q, k, v, mask, 0.25, False, 0.2)
    torch.library.opcheck(
        torch.ops.metal_flash_sdpa.attention_backward.default,
        (grad, q, k, v, out, lse, mask, 0.25, False, "reference", 0.2, seed),
    )


def test_compiled_under_autocast_casts_like_pytorch(reference_cpu):
    def loss(q, k, v, causal=False):  # the attention runs in bf16, the reduction in fp32
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        assert out.dtype == torch.bfloat16
        return out.float().square().sum()

    q, k, v = inputs()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grads(compiled, q, k, v, causal=True)
        expected = grads(loss, q, k, v, causal=True)
    assert metal_flash_sdpa.get_dispatch_count() == 2
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype == torch.float32
        # compiled and eager backward round to bf16 in a different order: compare as a whole
        assert ((a - b).norm() / b.norm()).item() < 3e-2  # seen: up to 1.1e-2, as ours vs PyTorch eager
