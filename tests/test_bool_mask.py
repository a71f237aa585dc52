"""Bool masks reach a kernel that reads them as they are (issue 18 item 2): the user's
tensor (a view of it), never a 0 / -inf copy at the mask's size, forward and backward; a
kernel that does not read them still gets the additive form."""

import pytest
import torch

import metal_flash_sdpa
from helpers import RecordingKernel, compare_with_pytorch
from metal_flash_sdpa import kernels, ops

B, H, L, S, D = 2, 4, 40, 56, 16


class MaskRecordingKernel(RecordingKernel):
    """A recording kernel that reads bool masks, or not."""

    def __init__(self, reads_bool_masks):
        super().__init__()
        self.reads_bool_masks = reads_bool_masks


def _keys(shape):
    """A bool mask of ``shape`` (last dim S): about a quarter of the keys excluded, every
    row keeping key 0."""
    mask = torch.rand(shape) > 0.25
    mask[..., 0] = True
    return mask


MASKS = {
    "[L, S]": lambda: _keys((L, S)),
    "[B, 1, L, S] (transformers' padding)": lambda: _keys((B, 1, L, S)),
    "[B, H, L, S]": lambda: _keys((B, H, L, S)),
    "[B, 1, 1, S] (key padding)": lambda: _keys((B, 1, 1, S)),
    "expanded [B, H, L, S] view": lambda: _keys((B, 1, 1, S)).expand(B, H, L, S),
}


@pytest.fixture
def kernel(request, restore_state, no_selfcheck):
    kernel = MaskRecordingKernel(reads_bool_masks=request.param)
    kernels.register_kernel("cpu", kernel)
    metal_flash_sdpa.enable()
    metal_flash_sdpa.MIN_SEQ_LEN = 0
    return kernel


def _run(mask, grad):
    q = torch.randn(B, H, L, D, requires_grad=grad)
    k, v = (torch.randn(B, H, S, D, requires_grad=grad) for _ in range(2))
    return compare_with_pytorch((q, k, v), {"attn_mask": mask}, metal_flash_sdpa.ReferenceKernel.tolerances)


@pytest.mark.parametrize("kernel", [True], indirect=True)
@pytest.mark.parametrize("grad", [False, True], ids=["no grad", "grad"])
@pytest.mark.parametrize("make", MASKS.values(), ids=MASKS.keys())
def test_bool_mask_is_handed_over_as_it_is(kernel, monkeypatch, make, grad):
    def no_conversion(*args):
        raise AssertionError("the op layer converted a bool mask")

    monkeypatch.setattr(ops, "additive_mask", no_conversion)
    mask = make()
    _run(mask, grad)
    assert [stage for stage, _ in kernel.masks] == (["forward", "backward"] if grad else ["forward"])
    for stage, seen in kernel.masks:
        assert seen.dtype == torch.bool, stage
        # the user's memory, viewed: no tensor of the mask's size was made for the call
        assert seen.untyped_storage().data_ptr() == mask.untyped_storage().data_ptr(), stage
        assert seen.untyped_storage().nbytes() == mask.untyped_storage().nbytes(), stage
    assert metal_flash_sdpa.get_dispatch_count() == 1


@pytest.mark.parametrize("kernel", [False], indirect=True)
def test_other_kernels_get_the_additive_form(kernel):
    mask = MASKS["[B, 1, L, S] (transformers' padding)"]()
    _run(mask, grad=True)
    for stage, seen in kernel.masks:
        assert seen.dtype == torch.float32, stage
        assert torch.equal(seen.isneginf(), ~mask.expand(seen.shape)), stage
    assert metal_flash_sdpa.get_dispatch_count() == 1


@pytest.mark.parametrize("kernel", [True], indirect=True)
def test_three_dim_query_and_rows_without_keys(kernel):
    # q [H, L, D] with a [L, S] mask, rows masked whole: 0, as PyTorch gives
    mask = _keys((L, S))
    mask[3] = False
    q, k, v = torch.randn(H, L, D), torch.randn(H, S, D), torch.randn(H, S, D)
    out = compare_with_pytorch((q, k, v), {"attn_mask": mask}, metal_flash_sdpa.ReferenceKernel.tolerances)
    assert (out[:, 3] == 0).all()
    assert kernel.masks[0][1].untyped_storage().data_ptr() == mask.untyped_storage().data_ptr()
