"""MFAKernel hands ccv only tensors that start at a multiple of 16 bytes in their buffer:
ccv copies tiles of them with 16-byte vectors (patch 0014) and refuses other bindings. A
view at another offset is copied first; an aligned one is passed as it is. With a stand-in
for the bridge that records the tensors it is handed."""

import torch

from metal_flash_sdpa.kernels import mfa


def offset_bytes(t):
    return t.storage_offset() * t.element_size()


def fused_views(length, heads, dim, dtype, start):
    """q, k, v as [B, H, S, D] views of one [B, S, 3 H D + start] projection, from element
    `start` on: zero-copy views in the kernel's [B, S, H, D] layout, at offsets start, start
    + H D and start + 2 H D elements."""
    fused = torch.randn(2, length, 3 * heads * dim + start, dtype=dtype)[..., start:]
    return [part.unflatten(-1, (heads, dim)).transpose(1, 2) for part in fused.split(heads * dim, dim=-1)]


def test_misaligned_views_are_copied_aligned_ones_are_not(recorded_mfa):
    q, k, v = fused_views(24, 2, 8, torch.float16, start=1)  # 2-byte offsets: not aligned
    grad_out = torch.randn(2, 24, 2 * 8 + 3, dtype=torch.float16)[..., 3:].unflatten(-1, (2, 8)).transpose(1, 2)
    out, lse = recorded_mfa.forward(q, k, v, 0.3, False, None)
    recorded_mfa.backward(grad_out, q, k, v, out, lse, 0.3, False, None)
    forward, backward = recorded_mfa.bridge.tensors
    handed = {"q": forward[0], "k": forward[1], "v": forward[2], "backward q": backward[0], "grad_out": backward[5]}
    given = {"q": q, "k": k, "v": v, "backward q": q, "grad_out": grad_out}
    for name, tensor in handed.items():
        assert offset_bytes(tensor) % 16 == 0, name
        assert torch.equal(tensor, given[name].transpose(1, 2)), name  # the same values, [B, S, H, D]
    assert all(offset_bytes(t) % 16 == 0 for t in forward + backward)

    q, k, v = fused_views(24, 2, 8, torch.float16, start=8)  # 16-byte offsets
    recorded_mfa.forward(q, k, v, 0.3, False, None)
    handed = recorded_mfa.bridge.tensors[-1][:3]
    assert [t.data_ptr() for t in handed] == [t.data_ptr() for t in (q, k, v)]  # no copy


def test_aligned_keeps_the_values_and_the_layout():
    t = torch.randn(3 * 40 + 2)[2:].view(3, 5, 8)  # 8-byte offset in float32
    copy = mfa.aligned(t)
    assert offset_bytes(copy) == 0 and copy.is_contiguous() and torch.equal(copy, t)
    assert mfa.aligned(copy) is copy
