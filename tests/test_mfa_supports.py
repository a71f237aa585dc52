"""MFAKernel's coverage, computed on any machine: supports() is pure Python."""

import sys

import pytest
import torch

from metal_flash_sdpa.kernels.base import Call
from metal_flash_sdpa.kernels.mfa import MAX_SCRATCH_BYTES, MFAKernel, scratch_bytes


def call(**changes):
    fields = dict(
        dtype=torch.float16,
        batch=2,
        q_heads=8,
        kv_heads=8,
        q_len=1024,
        kv_len=1024,
        head_dim=64,
        value_dim=64,
        causal=False,
        mask=None,
        mask_per_head=False,
        needs_grad=False,
    )
    fields.update(changes)
    return Call(**fields)


ACCEPTED = {
    "fp16": call(),
    "fp32": call(dtype=torch.float32),
    "fp16 with grad": call(needs_grad=True),
    "fp32 with grad": call(dtype=torch.float32, needs_grad=True),
    "cross attention": call(q_len=512, kv_len=2048, needs_grad=True),
    "head dim 8": call(head_dim=8, value_dim=8),
    "head dim 128": call(head_dim=128, value_dim=128, needs_grad=True),
    "head dim 384": call(head_dim=384, value_dim=384),
    "batch 1, one head": call(batch=1, q_heads=1, kv_heads=1),
    "short": call(q_len=1, kv_len=1),
}

REFUSED = {
    "bf16": (call(dtype=torch.bfloat16), "dtype bfloat16"),
    "fp64": (call(dtype=torch.float64), "dtype float64"),
    "head dim 512": (call(head_dim=512, value_dim=512), "head dim 512"),
    "head dim 72+1": (call(head_dim=73, value_dim=73), "head dim 73"),
    "value dim differs": (call(value_dim=128), "value head dim"),
    "gqa": (call(kv_heads=2), "grouped-query"),
    "causal square": (call(causal=True), "is_causal not supported"),
    "causal square with grad": (call(causal=True, needs_grad=True), "is_causal not supported"),
    "causal rectangular": (call(causal=True, q_len=256), "is_causal"),
    "additive mask": (call(mask="additive"), "attn_mask not supported"),
    "bool mask": (call(mask="bool"), "attn_mask not supported"),
    "mask with grad": (call(mask="additive", needs_grad=True), "attn_mask not supported by mfa with grad"),
    "per-head mask": (call(mask="additive", mask_per_head=True), "attn_mask"),
    "empty query": (call(q_len=0), "empty"),
    "empty keys": (call(kv_len=0), "empty"),
    "too many heads": (call(q_heads=70000, kv_heads=70000, q_len=1, kv_len=1), "16/32-bit"),
    "scratch too large": (call(q_len=65536, kv_len=65536, q_heads=32, kv_heads=32, head_dim=128, value_dim=128), "scratch"),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepts(name):
    assert MFAKernel().supports(ACCEPTED[name]) is None


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refuses_with_reason(name):
    the_call, fragment = REFUSED[name]
    reason = MFAKernel().supports(the_call)
    assert isinstance(reason, str) and fragment in reason, reason


def test_capabilities_are_data():
    kernel = MFAKernel()
    assert kernel.layout == "BSHD"
    assert kernel.dtypes == {torch.float32, torch.float16}
    assert kernel.max_head_dim == 384 and kernel.head_dim_multiple == 8
    assert kernel.causal_forward is None and kernel.causal_backward is None
    assert not kernel.mask_forward and not kernel.mask_backward and not kernel.mask_per_head
    assert not kernel.supports_gqa and not kernel.supports_value_dim_differs
    assert set(kernel.tolerances) == set(kernel.dtypes)
    for atol, rtol in kernel.tolerances.values():
        assert 0 < atol < 1 and 0 < rtol < 1


def test_scratch_counts_backward_only_with_grad():
    fp16 = call(q_len=4096, kv_len=4096)
    assert scratch_bytes(fp16) == 4 * 4096 * 2 * 8 * 64
    assert scratch_bytes(fp16._replace(needs_grad=True)) == 4 * (4096 + 2 * 4096) * 2 * 8 * 64 + 4 * 4096 * 2 * 8
    assert scratch_bytes(call(dtype=torch.float32)) == 0
    assert scratch_bytes(call(dtype=torch.float32, needs_grad=True)) == 4 * 1024 * 2 * 8
    # the boundary itself is accepted, one step beyond is not
    edge = call(dtype=torch.float32, needs_grad=True, batch=1, q_heads=1, kv_heads=1, q_len=MAX_SCRATCH_BYTES // 4)
    assert MFAKernel().supports(edge) is None
    assert MFAKernel().supports(edge._replace(q_len=edge.q_len + 1)) is not None


@pytest.mark.skipif(sys.platform == "darwin", reason="the Linux answer")
def test_not_available_off_macos_and_says_why():
    reason = MFAKernel().available()
    assert isinstance(reason, str) and "macOS" in reason


def test_available_is_none_or_a_reason():
    reason = MFAKernel().available()
    assert reason is None or (isinstance(reason, str) and reason)
    if reason is None:
        assert torch.backends.mps.is_available()


def test_module_imports_without_native_extension():
    import metal_flash_sdpa.kernels.mfa as mfa

    # importing the kernel module never loads the bridge
    assert mfa.NATIVE_MODULE == "metal_flash_sdpa._mfa_native"
    if sys.platform != "darwin":
        assert mfa._native is None
