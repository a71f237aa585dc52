"""MFAKernel's coverage, computed on any machine: supports() is pure Python. Its limits are
checked at both sides of each boundary, and against the bridge's own re-check
(native/mfa_params.hpp, check_limits) as the MFA engine's driver runs it."""

import pathlib
import sys

import pytest
import torch

from metal_flash_sdpa.kernels.base import Call
from metal_flash_sdpa.kernels.mfa import MFAKernel, scratch_allocation, scratch_bytes, smallest_slice_scratch

REPO = pathlib.Path(__file__).resolve().parent.parent
# The engine's stand-in device's maxBufferLength (tools/engine/encode.py MAX_BUFFER_LENGTH),
# which the bridge would read on a Mac.
STAND_IN_MAX_BUFFER_LENGTH = 1 << 34


def kernel():
    """MFAKernel as loaded on the stand-in device."""
    k = MFAKernel()
    k.max_buffer_length = STAND_IN_MAX_BUFFER_LENGTH
    return k


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
    "head dim 512 (patch 0016)": call(head_dim=512, value_dim=512, needs_grad=True),
    "MLA 192 / 128": call(head_dim=192, value_dim=128, needs_grad=True, kv_heads=2, causal=True),
    "value dim wider, 64 / 128": call(head_dim=64, value_dim=128, mask="additive"),
    "batch 1, one head": call(batch=1, q_heads=1, kv_heads=1),
    "short": call(q_len=1, kv_len=1),
    "bf16": call(dtype=torch.bfloat16, needs_grad=True),
    "gqa": call(kv_heads=2, needs_grad=True),
    "mqa": call(kv_heads=1, needs_grad=True),
    # is_causal, top-left (patch 0007), any lengths, forward and backward, GQA and bf16 too
    "causal square": call(causal=True),
    "causal square with grad": call(causal=True, needs_grad=True),
    "causal fewer queries": call(causal=True, q_len=256, needs_grad=True),
    "causal more queries": call(causal=True, q_len=2048, kv_len=100, needs_grad=True),
    "causal gqa bf16": call(causal=True, dtype=torch.bfloat16, kv_heads=2, needs_grad=True),
    # attn_mask (patch 0008), bool or additive, shared or per head, forward and backward
    "additive mask": call(mask="additive"),
    "bool mask with grad": call(mask="bool", needs_grad=True),
    # long context (patch 0011): sliced, whatever ccv's unsliced scratch would be
    "64k tokens, 32 heads, with grad": call(q_len=65536, kv_len=65536, q_heads=32, kv_heads=32, head_dim=128, value_dim=128, needs_grad=True),
    "128k tokens, GQA 32:8, bf16, causal, with grad": call(
        dtype=torch.bfloat16, batch=1, q_len=131072, kv_len=131072, q_heads=32, kv_heads=8, head_dim=128, value_dim=128,
        causal=True, needs_grad=True,
    ),
    "per-head mask with grad, gqa": call(mask="additive", mask_per_head=True, kv_heads=2, needs_grad=True),
    "mask bf16 cross attention": call(mask="bool", dtype=torch.bfloat16, q_len=300, kv_len=1000, needs_grad=True),
    "scale 4, causal": call(scale=4.0, causal=True, needs_grad=True),
    "scale 2**-32": call(scale=2.0**-32),
    "scale 2**32, mask": call(scale=2.0**32, mask="additive"),
}

REFUSED = {
    "fp64": (call(dtype=torch.float64), "dtype float64"),
    "head dim 520": (call(head_dim=520, value_dim=520), "head dim 520"),
    "value dim 520": (call(value_dim=520), "head dim 520"),
    "head dim 72+1": (call(head_dim=73, value_dim=73), "head dim 73"),
    # the leading dimension counts the wider head dim: the kernels run there (value_dim.py)
    "value dim widens past 16-bit": (call(q_heads=136, kv_heads=136, head_dim=64, value_dim=512), "16-bit leading dimension"),
    "mask with causal": (call(mask="bool", causal=True), "is_causal with attn_mask"),
    "empty query": (call(q_len=0), "empty"),
    "empty keys": (call(kv_len=0), "empty"),
    "too many heads": (call(q_heads=70000, kv_heads=70000, q_len=1, kv_len=1), "16-bit leading dimension"),
    # patch 0010: positive finite scales from 2**-32 to 2**32 (tests/test_engine_scale.py)
    "scale 0": (call(scale=0.0), "scale 0.0 outside"),
    "negative scale": (call(scale=-0.125), "scale -0.125 outside"),
    "nan scale": (call(scale=float("nan")), "scale nan outside"),
    "infinite scale": (call(scale=float("inf")), "scale inf outside"),
    "scale too large": (call(scale=2.0**33), "2**-32 to 2**32"),
}


def edge(**changes):
    """The smallest fp32 call (head dim 8), grown only along the dimension under test."""
    fields = dict(dtype=torch.float32, batch=1, q_heads=1, kv_heads=1, q_len=1, kv_len=1, head_dim=8, value_dim=8)
    fields.update(changes)
    return call(**fields)


def heads(n, head_dim=8):
    return dict(q_heads=n, kv_heads=n, head_dim=head_dim, value_dim=head_dim)


# Each limit from both sides: (the last call accepted, the first refused, words of both
# reasons, supports()'s and check_limits').
BOUNDARIES = {
    "heads x head dim 8": (edge(**heads(8191)), edge(**heads(8192)), "16-bit leading dimension"),
    "heads x head dim 64": (edge(**heads(1023, 64)), edge(**heads(1024, 64)), "16-bit leading dimension"),
    "query elements": (edge(q_len=2**29 - 1), edge(q_len=2**29), "32-bit offsets"),
    "key elements": (edge(kv_len=2**29 - 1), edge(kv_len=2**29), "32-bit offsets"),
    "elements over the batch": (edge(batch=2, q_len=2**28 - 1), edge(batch=2, q_len=2**28), "32-bit offsets"),
    # a per-head mask's elements, 65536 x 65535 < 2^32 <= 65536 x 65536
    "mask elements": (
        edge(mask="additive", mask_per_head=True, q_len=2**16, kv_len=2**16 - 1),
        edge(mask="additive", mask_per_head=True, q_len=2**16, kv_len=2**16),
        "32-bit offsets",
    ),
    # one query row and 2**31 - 1 keys (dK, dV: 64 bytes a key): the smallest slice's scratch
    # at the stand-in device's largest buffer (2**34 bytes) and just beyond
    "smallest slice beyond the largest buffer": (
        edge(dtype=torch.float16, needs_grad=True, kv_len=(2**34 - 36) // 64),
        edge(dtype=torch.float16, needs_grad=True, kv_len=(2**34 - 36) // 64 + 1),
        "largest buffer",
    ),
}


@pytest.mark.parametrize("name", sorted(BOUNDARIES))
def test_limits_at_both_sides(name):
    accepted, refused, words = BOUNDARIES[name]
    assert kernel().supports(accepted) is None
    reason = kernel().supports(refused)
    assert isinstance(reason, str) and words in reason, reason


@pytest.fixture(scope="module")
def engine():
    """tools/engine's encode, its driver built; skips with one line when it cannot be built
    here, unless MFA_ENGINE_REQUIRED=1."""
    from engine_setup import build, engine_required
    from engine import encode

    with engine_required():
        build.build()
    return encode


def engine_call(encode, c):
    dtype = {torch.float32: "fp32", torch.float16: "fp16"}[c.dtype]
    # macOS 15 mode, as the other engine tests run: the limits do not depend on it
    return encode.Call(
        dtype=dtype,
        batch=c.batch,
        heads=c.q_heads,
        kv_heads=c.kv_heads,
        q_len=c.q_len,
        kv_len=c.kv_len,
        head_dim=c.head_dim,
        grad=c.needs_grad,
        macos=15,
        mask="none" if c.mask is None else c.mask,
        mask_shape="BHLS" if c.mask_per_head else "B1LS",
    )


@pytest.mark.parametrize("name", sorted(BOUNDARIES))
def test_bridge_check_limits_agrees(engine, name):
    """The driver refuses exactly when supports() does: it runs check_limits before ccv."""
    accepted, refused, words = BOUNDARIES[name]
    record = engine.encode(engine_call(engine, accepted), check_refusal=False)
    assert record.dispatches
    with pytest.raises(engine.Refused, match=words):
        engine.encode(engine_call(engine, refused), check_refusal=False)


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepts(name):
    assert kernel().supports(ACCEPTED[name]) is None


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refuses_with_reason(name):
    the_call, fragment = REFUSED[name]
    reason = kernel().supports(the_call)
    assert isinstance(reason, str) and fragment in reason, reason


def test_capabilities_are_data():
    kernel = MFAKernel()
    assert kernel.layout == "BSHD"
    assert kernel.dtypes == {torch.float32, torch.float16, torch.bfloat16}
    assert kernel.max_head_dim == 512 and kernel.head_dim_multiple == 8
    assert kernel.causal_forward == "any" and kernel.causal_backward == "any"
    assert kernel.mask_forward and kernel.mask_backward and kernel.mask_per_head
    assert kernel.supports_gqa and kernel.supports_value_dim_differs
    assert set(kernel.tolerances) == set(kernel.dtypes)
    for atol, rtol in kernel.tolerances.values():
        assert 0 < atol < 1 and 0 < rtol < 1


def test_scratch_counts_backward_only_with_grad():
    fp16 = call(q_len=4096, kv_len=4096)
    assert scratch_bytes(fp16) == 4 * 4096 * 2 * 8 * 64
    assert scratch_bytes(fp16._replace(needs_grad=True)) == 4 * (4096 + 2 * 4096) * 2 * 8 * 64 + 4 * 4096 * 2 * 8
    assert scratch_bytes(call(dtype=torch.float32)) == 0
    assert scratch_bytes(call(dtype=torch.float32, needs_grad=True)) == 4 * 1024 * 2 * 8


def test_the_smallest_slice_is_one_group_or_one_query_head():
    """What must fit in one device buffer (native/mfa_params.hpp plan_slices): the backward
    of one batch's one KV group, or the forward of one query head; allocated in whole MiB
    beyond 1 MiB, powers of two below (patch 0011)."""
    long = call(batch=4, q_heads=32, kv_heads=8, q_len=131072, kv_len=131072, head_dim=128, value_dim=128)
    assert smallest_slice_scratch(long) == 4 * 131072 * 128  # one query head's fp32 O: 64 MiB
    group = 4 * (131072 * 4 + 2 * 131072) * 128 + 4 * 131072 * 4
    assert smallest_slice_scratch(long._replace(needs_grad=True)) == -(-group // 2**20) * 2**20
    assert [scratch_allocation(n) for n in (0, 1, 3, 65536, 2**20, 2**20 + 1)] == [1, 1, 4, 65536, 2**20, 2**21]
    small = kernel()
    small.max_buffer_length = 2**26  # below one group's scratch, above one head's
    assert small.supports(long) is None
    assert "largest buffer" in small.supports(long._replace(needs_grad=True))
    assert MFAKernel().supports(long._replace(needs_grad=True)) is None  # off a Mac: no device to ask


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


def test_needs_macos_14_as_the_bridge_reports_it():
    """The kernels compile as Metal 3.1 (patch 0009; bfloat16 needs it): below macOS 14 every
    call is refused, bf16 included, with the reason; unknown (no bridge yet) decides nothing."""
    assert MFAKernel().macos_major is None and MFAKernel().supports(ACCEPTED["bf16"]) is None
    for major, refused in ((13, True), (14, False), (15, False), (26, False)):
        kernel = MFAKernel()
        kernel.macos_major = major
        for the_call in (ACCEPTED["bf16"], ACCEPTED["fp32"]):
            reason = kernel.supports(the_call)
            if refused:
                assert "Metal 3.1" in reason and "macOS 14" in reason and "macOS 13" in reason, reason
            else:
                assert reason is None, (major, reason)


@pytest.mark.parametrize("macos,os_reports,refused", [(13, None, True), (14, None, False), (26, "16.0.0", False)])
def test_bridge_macos_check_agrees(engine, macos, os_reports, refused):
    """The driver, as the bridge, refuses below macOS 14 by what NSProcessInfo reports, 16.x
    read as 26, before ccv compiles anything."""
    the_call = engine.Call(dtype="bf16", q_len=9, kv_len=9, head_dim=64, macos=macos, os_reports=os_reports)
    if refused:
        with pytest.raises(engine.Refused, match="needs macOS 14; this is macOS 13"):
            engine.encode(the_call, check_refusal=False)
    else:
        assert engine.encode(the_call, check_refusal=False).raw["platform"]["macos_major"] == (26 if os_reports else macos)
