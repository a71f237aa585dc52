"""A value head dim of its own (MLA's 192 / 128; issue #20 item 2): MFAKernel runs MFA's
one-head-dim kernels with the narrower side padded with zeros (kernels/value_dim.py) and cuts
the outputs back. The padding's arithmetic against PyTorch's SDPA, with the reference
kernel's math as the one-head-dim kernel; and what MFAKernel hands its bridge (a stand-in
that records the tensors). tests/test_engine_head_dims.py runs MFA's kernels so padded."""

import pytest
import torch

import metal_flash_sdpa
from metal_flash_sdpa.kernels import value_dim


def one_head_dim(compute):
    """``compute`` (the reference kernel's forward or backward), refusing operands whose head
    dims differ: what MFA's kernels take."""

    def kernel(*tensors_and_args, **options):
        tensors = [t for t in tensors_and_args[:5] if isinstance(t, torch.Tensor) and t.dim() == 4]
        assert len({t.shape[-1] for t in tensors}) == 1, [tuple(t.shape) for t in tensors]
        return compute(*tensors_and_args, **options)

    return kernel


@pytest.mark.parametrize("dims", [(192, 128), (64, 128), (24, 8)], ids=lambda d: f"{d[0]}-{d[1]}")
def test_padding_gives_pytorchs_results(dims):
    head_dim, v_dim = dims
    reference = metal_flash_sdpa.ReferenceKernel(block_size=16)
    generator = torch.Generator().manual_seed(sum(dims))
    q, k = (torch.randn(2, 3, 37, head_dim, generator=generator, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, 37, v_dim, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(2, 3, 37, v_dim, generator=generator, dtype=torch.float64)
    scale = head_dim**-0.5
    out, lse = value_dim.forward(one_head_dim(reference.forward), "BHSD", q, k, v, scale, True, None)
    grads = value_dim.backward(one_head_dim(reference.backward), "BHSD", grad_out, q, k, v, out, lse, scale, True, None)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want)


def test_mfa_hands_its_bridge_one_head_dim_and_cuts_the_outputs(recorded_mfa):
    q, k = (torch.randn(2, 4, 40, 192).transpose(1, 2).contiguous().transpose(1, 2) for _ in range(2))  # BSHD memory
    v = torch.randn(2, 4, 40, 128).transpose(1, 2).contiguous().transpose(1, 2)
    out, lse = recorded_mfa.forward(q, k, v, 0.3, False, None)
    assert out.shape == (2, 4, 40, 128) and out.transpose(1, 2).is_contiguous()  # the kernel contract's layout
    handed = recorded_mfa.bridge.tensors[-1]
    assert [t.shape[-1] for t in handed[:4]] == [192] * 4  # q, k, v, out as [B, S, H, D]
    assert handed[2][..., :128].equal(v.transpose(1, 2)) and handed[2][..., 128:].eq(0).all()

    grad_out = torch.randn_like(out)
    dq, dk, dv = recorded_mfa.backward(grad_out, q, k, v, out, lse, 0.3, False, None)
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
    assert all(t.transpose(1, 2).is_contiguous() for t in (dq, dk, dv))
    handed = recorded_mfa.bridge.tensors[-1]  # q, k, v, out, lse, grad_out, dq, dk, dv
    assert [handed[i].shape[-1] for i in (0, 1, 2, 3, 5, 6, 7, 8)] == [192] * 8
    assert handed[5][..., 128:].eq(0).all() and handed[3][..., 128:].eq(0).all()
