"""The tile summaries of masks (patch 0013) are written once per mask and reused while it is
unchanged, never stale (issue 18 item 1): the cache and MFAKernel's use of it, with a
stand-in for the bridge that records what each call is told."""

import pytest
import torch

from metal_flash_sdpa.kernels import mask_tiles


@pytest.fixture
def kernel(recorded_mfa):
    return recorded_mfa


def qkv(length=40):
    return (torch.randn(2, 4, length, 16) for _ in range(3))


def forward(kernel, mask, length=40):
    q, k, v = qkv(length)
    kernel.forward(q, k, v, 0.25, False, mask.expand(2, 4, length, length))  # a fresh view each call, as the op layer's
    return kernel.bridge.calls[-1]


def test_written_once_and_reused_across_calls(kernel):
    mask = torch.rand(2, 1, 40, 40) > 0.3
    first, second, third = (forward(kernel, mask) for _ in range(3))
    assert first[1] and not second[1] and not third[1]
    assert first[2] == second[2] == third[2]  # the same summary tensors


def test_backward_has_its_own(kernel):
    mask = torch.rand(2, 1, 40, 40) > 0.3
    forward(kernel, mask)
    q, k, v = qkv()
    for _ in range(2):
        kernel.backward(q, q, k, v, q, torch.zeros(2, 4, 40), 0.25, False, mask.expand(2, 4, 40, 40))
    assert [(c[0], c[1], len(c[2])) for c in kernel.bridge.calls] == [("forward", True, 1), ("backward", True, 2), ("backward", False, 2)]


def test_changed_mask_is_summarised_again(kernel):
    mask = torch.rand(2, 1, 40, 40) > 0.3
    forward(kernel, mask)
    mask[0, 0, 3, :] = False  # in place: the version counter moves
    assert forward(kernel, mask)[1]
    assert not forward(kernel, mask)[1]
    mask.view(-1)[7] = True  # through a view
    assert forward(kernel, mask)[1]


def test_freed_mask_is_never_taken_for_a_new_one(kernel):
    # a new mask in the memory of a freed one, same shape and strides (and version): each a
    # storage of its own over the same bytes, as an allocator may hand memory out again
    memory = bytearray(2 * 40 * 40)
    seen = set()
    for _ in range(3):
        mask = torch.frombuffer(memory, dtype=torch.bool).view(2, 1, 40, 40).fill_(True)
        seen.add(mask.data_ptr())
        assert forward(kernel, mask)[1], "a new mask reused a summary"
        assert not forward(kernel, mask)[1]  # while it lives, it is the same mask
        del mask  # freed: nothing else refers to its storage
    assert len(seen) == 1


def test_other_shapes_and_dtypes_are_other_summaries(kernel):
    mask = torch.rand(2, 1, 40, 40) > 0.3
    forward(kernel, mask)
    assert forward(kernel, torch.zeros(2, 1, 40, 40))[1]  # an additive mask
    assert forward(kernel, mask[:, :, :32, :32], length=32)[1]


def test_failed_call_leaves_no_summary_to_reuse(kernel):
    mask = torch.rand(2, 1, 40, 40) > 0.3
    bridge = kernel.bridge
    original = bridge.attention_forward

    def fail(*args):
        raise RuntimeError("encode failed")

    bridge.attention_forward = fail
    with pytest.raises(RuntimeError):
        forward(kernel, mask)
    bridge.attention_forward = original
    assert forward(kernel, mask)[1]


def test_the_cache_stays_bounded():
    cache = mask_tiles.MaskTiles()
    masks = [torch.ones(4, 4) for _ in range(mask_tiles.MAX_ENTRIES + 10)]
    for mask in masks:
        tiles, summarize = cache.get(mask, "key", lambda: [torch.empty(1)])
        cache.written(mask, "key")
    assert len(cache) == mask_tiles.MAX_ENTRIES
    assert cache.get(masks[-1], "key", lambda: [])[1] is False
    assert cache.get(masks[0], "key", lambda: [torch.empty(1)])[1] is True  # the oldest went first
