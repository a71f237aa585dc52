"""Additive masks that require grad (learned biases: T5's relative positions, ALiBi-like
slopes): the call dispatches to a kernel that declares ``supports_mask_grad`` and the mask's
gradient is PyTorch's, at the mask's own size."""

import pytest
import torch
import torch.nn.functional as F

import metal_flash_sdpa
from metal_flash_sdpa import kernels
from metal_flash_sdpa.check import compare

B, H, L, S, D = 2, 4, 19, 23, 8
MASK_SHAPES = {
    "shared [L, S]": (L, S),
    "per batch [B, 1, L, S]": (B, 1, L, S),
    "per head [1, H, L, S]": (1, H, L, S),
    "per batch and head": (B, H, L, S),
    "keys [B, 1, 1, S]": (B, 1, 1, S),
    "3-D [H, 1, S]": (H, 1, S),
}


class NoMaskGrad(metal_flash_sdpa.ReferenceKernel):
    name = "no-mask-grad"
    supports_mask_grad = False


def inputs(dtype, mask_shape, kv_heads=H, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()

    return leaf(B, H, L, D), leaf(B, kv_heads, S, D), leaf(B, kv_heads, S, D), leaf(*mask_shape)


def grads(fn, q, k, v, mask, grad_out, **kwargs):
    out = fn(q, k, v, attn_mask=mask, **kwargs)
    return [out, *torch.autograd.grad(out, (q, k, v, mask), grad_out)]


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("shape", list(MASK_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_mask_gradient_matches_pytorch(reference_cpu, dtype, shape, gqa):
    q, k, v, mask = inputs(dtype, MASK_SHAPES[shape], kv_heads=2 if gqa else H)
    grad_out = torch.randn(B, H, L, D, dtype=torch.float64).to(dtype)
    ours = grads(F.scaled_dot_product_attention, q, k, v, mask, grad_out, enable_gqa=gqa)
    assert metal_flash_sdpa.get_dispatch_count() == 1 and metal_flash_sdpa.fallback_counts() == {}
    with metal_flash_sdpa.disabled():
        theirs = grads(F.scaled_dot_product_attention, q, k, v, mask, grad_out, enable_gqa=gqa)
        gold_inputs = [t.detach().double().requires_grad_() for t in (q, k, v, mask)]
        gold = grads(F.scaled_dot_product_attention, *gold_inputs, grad_out.double(), enable_gqa=gqa)
    assert ours[4].shape == mask.shape and ours[4].dtype == mask.dtype
    atol, rtol = metal_flash_sdpa.ReferenceKernel.tolerances[dtype]
    for name, a, b, g in zip(("out", "dq", "dk", "dv", "dmask"), ours, theirs, gold):
        miss = compare(a.double(), b.double(), g, atol, rtol)
        assert miss is None, f"{name}: {miss}"


@pytest.mark.parametrize("shape", ["shared [L, S]", "per batch [B, 1, L, S]", "per batch and head", "keys [B, 1, 1, S]"])
def test_gradcheck(reference_cpu, shape):
    small = {"shared [L, S]": (5, 6), "per batch [B, 1, L, S]": (2, 1, 5, 6), "per batch and head": (2, 2, 5, 6),
             "keys [B, 1, 1, S]": (2, 1, 1, 6)}[shape]
    leaves = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in ((2, 2, 5, 4), (2, 2, 6, 4), (2, 2, 6, 4), small)]
    assert torch.autograd.gradcheck(
        lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), leaves
    )
    assert metal_flash_sdpa.get_dispatch_count() > 0 and metal_flash_sdpa.fallback_counts() == {}


def test_only_the_mask_requires_grad(reference_cpu):
    q, k, v, mask = inputs(torch.float32, (1, H, L, S))
    q, k, v = (t.detach() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    (ours,) = torch.autograd.grad(out.square().sum(), mask)
    with metal_flash_sdpa.disabled():
        (theirs,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).square().sum(), mask)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    assert metal_flash_sdpa.get_dispatch_count() == 1


def test_an_expanded_mask_gets_its_gradient(reference_cpu):
    q, k, v, bias = inputs(torch.float64, (L, S))
    mask = bias.expand(B, H, L, S)  # stride 0 over batch and heads
    grad_out = torch.randn(B, H, L, D, dtype=torch.float64)
    ours = grads(F.scaled_dot_product_attention, q, k, v, mask, grad_out)
    with metal_flash_sdpa.disabled():
        theirs = grads(F.scaled_dot_product_attention, q, k, v, mask, grad_out)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    (ours_bias,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum(), bias)
    with metal_flash_sdpa.disabled():
        (their_bias,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum(), bias)
    torch.testing.assert_close(ours_bias, their_bias)


def test_a_kernel_without_mask_gradients_falls_back(reference_cpu):
    kernels.register_kernel("cpu", NoMaskGrad())
    q, k, v, mask = inputs(torch.float32, (L, S))
    reason = "attn_mask gradient not supported by no-mask-grad"
    assert metal_flash_sdpa.explain(q, k, v, attn_mask=mask) == reason
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert metal_flash_sdpa.fallback_counts() == {reason: 1}
    with torch.no_grad():  # no gradient wanted: served
        assert metal_flash_sdpa.explain(q, k, v, attn_mask=mask) is None


class Materialising(metal_flash_sdpa.ReferenceKernel):
    """A kernel that makes the per-batch, per-head L x S gradient and sums it afterwards."""

    name = "materialising"

    def backward(self, *args, **options):
        grads = super().backward(*args, **options)
        q, k = args[1], args[2]
        torch.zeros(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).sum()
        return grads


def whole_mask_sized(kernel):
    """Shapes of [.., L, S] tensors with more than L x S elements that ops of the backward
    of a call with a shared [L, S] mask read."""
    kernels.register_kernel("cpu", kernel)
    q, k, v, mask = inputs(torch.float32, (L, S))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with torch.profiler.profile(record_shapes=True) as profile:
        dmask = torch.autograd.grad(out, mask, torch.ones_like(out))[0]
    assert dmask.shape == (L, S)
    shapes = [tuple(s) for event in profile.events() for s in event.input_shapes if len(s) >= 2]
    return [s for s in shapes if s[-2:] == (L, S) and torch.Size(s).numel() > L * S]


def test_a_shared_mask_gradient_is_accumulated_at_its_own_size(reference_cpu, no_selfcheck):
    """No per-batch L x S tensor for a mask the batch shares: the reference kernel
    accumulates blocks of rows straight into the [1, 1, L, S] gradient."""
    assert whole_mask_sized(metal_flash_sdpa.ReferenceKernel(block_size=4)) == []
    assert (B, H, L, S) in whole_mask_sized(Materialising(block_size=4))  # the check sees it


def test_t5_training_step(reference_cpu):
    """T5 passes its learned relative position bias as the additive mask: every attention
    call dispatches, and the step (the bias's gradient included) is PyTorch's."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
        relative_attention_num_buckets=8, decoder_start_token_id=0,
    )
    config._attn_implementation = "sdpa"
    model = transformers.T5ForConditionalGeneration(config).train()
    ids = torch.randint(1, 64, (2, 24))
    labels = torch.randint(1, 64, (2, 20))

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ours = step()
    # encoder self-attention x2, decoder self- and cross-attention x2
    assert metal_flash_sdpa.get_dispatch_count() == 6 and metal_flash_sdpa.fallback_counts() == {}
    with metal_flash_sdpa.disabled():
        theirs = step()
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    assert ours[1].keys() == theirs[1].keys()
    bias = [n for n in ours[1] if "relative_attention_bias" in n]
    assert len(bias) == 2 and all(ours[1][n].abs().sum() > 0 for n in bias)
    for name, grad in ours[1].items():
        torch.testing.assert_close(grad, theirs[1][name], atol=1e-5, rtol=1e-4, msg=name)


def test_mfa_hands_its_bridge_a_zeroed_gradient_laid_out_as_the_mask(recorded_mfa):
    # patch 0017: the kernels add into a tensor read through the mask's own strides; a mask
    # shared by the batch ([1, H, L, S] broadcast to B) gets a gradient of [1, H, L, S]
    q, k, v = (torch.randn(2, 40, 3, 16).transpose(1, 2) for _ in range(3))
    bias = torch.randn(1, 3, 40, 40)[..., :40]
    mask = bias.expand(2, 3, 40, 40)
    out, lse = recorded_mfa.forward(q, k, v, 0.25, False, mask)
    dq, dk, dv, dmask = recorded_mfa.backward(torch.randn_like(out), q, k, v, out, lse, 0.25, False, mask, mask_grad=True)
    handed_mask, handed_grad = recorded_mfa.bridge.tensors[-1][-2:]
    assert handed_grad.shape == handed_mask.shape and handed_grad.stride() == handed_mask.stride() == (0, 1600, 40, 1)
    assert dmask.shape == (1, 3, 40, 40) and dmask.dtype == mask.dtype and dmask.eq(0).all()  # the bridge adds nothing
    assert handed_grad.data_ptr() == dmask.data_ptr()

    gapped = torch.randn(1, 3, 40, 48)[..., :40].expand(2, 3, 40, 40)  # keys contiguous, rows 48 apart
    recorded_mfa.backward(torch.randn_like(out), q, k, v, out, lse, 0.25, False, gapped, mask_grad=True)
    handed_mask, handed_grad = recorded_mfa.bridge.tensors[-1][-2:]
    assert handed_mask.stride() == handed_grad.stride() == (0, 1600, 40, 1) and torch.equal(handed_mask, gapped)
