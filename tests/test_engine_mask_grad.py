"""Rung 4 (DESIGN section 10) for the gradient of an additive mask: our patch 0017 (issue #20
item 3).

The backward-key-value kernel adds dS^T / scale into a zeroed tensor of the mask's type laid
out as the mask; a backward whose mask is shared by batches or key/value heads runs one
launch per shared index (native/mfa_params.hpp, plan_slices). Each case runs
`mfa_engine.py run --mask additive --mask-grad` in-process: the mask's gradient ("dmask")
against float64 PyTorch autograd of the same mask, summed over what it broadcasts, within
MFAKernel.tolerances, with out, LSE, dQ, dK, dV as always. Masks shared by everything
([L, S]), per batch ([B, 1, L, S]), per head ([1, H, L, S], T5's) and per head and batch
([B, H, L, S]); GQA, dropout, a
sliced call; each dtype, both GPU families and copy modes. A kernel that stores instead of
adding fails.
"""

import dataclasses

import pytest

import engine_setup
from engine_setup import Case, mutated  # puts tools/ on sys.path

from engine import encode, execute  # noqa: E402  (after engine_setup)


@dataclasses.dataclass(frozen=True)
class GradCase(Case):
    mask_shape: str = "BHLS"
    dropout: float = 0.0
    scratch_budget: int = None

    def call(self, **fixed) -> encode.Call:
        return super().call(mask="additive", mask_grad=True, **fixed)


MATRIX = [
    GradCase("apple9", "fp32", 33, 40, 2, 2, head_dim=32),  # per batch and head: one launch
    GradCase("apple7", "fp16", 33, 40, 4, 2, head_dim=64, mask_shape="LS", macos=15),  # shared by all, GQA 2:1
    GradCase("apple9", "bf16", 47, 31, 2, 1, head_dim=48, mask_shape="B1LS"),  # per batch, MQA: the group adds
    GradCase("apple7", "fp32", 31, 47, 2, 2, head_dim=40, mask_shape="LS", dropout=0.3),  # dropout's dS
    GradCase("apple9", "fp16", 33, 40, 4, 4, head_dim=64, mask_shape="B1LS", macos=15),  # shared by heads
    GradCase("apple9", "fp32", 33, 40, 2, 2, head_dim=32, scratch_budget=6000),  # sliced by heads anyway
    GradCase("apple7", "bf16", 40, 33, 4, 2, head_dim=32, mask_shape="1HLS"),  # T5's bias: shared by the batches
]


@pytest.fixture(scope="module")
def engine():
    engine_setup.precompile(case.call() for case in MATRIX)


@pytest.mark.parametrize("case", MATRIX, ids=lambda case: f"{case}-p{case.dropout}")
def test_mask_gradient_matches_float64_autograd(engine, case):
    # float16 and bfloat16 by `check`'s rule, as tests/test_engine_mask.py: a gradient shared
    # by n batches or heads is rounded n times as it is added up (PyTorch's once), and the
    # bfloat16 [1, H, L, S] case used 1.04 of the tolerance, twice PyTorch's own error
    call = case.call(dropout_seed=7)
    inputs = execute.random_inputs(call, seed=5)
    assert engine_setup.misses(call, inputs, against_pytorch=call.dtype != "fp32" and not call.dropout) == {}
    assert set(execute.output_names(call)) == {"out", "lse", "dq", "dk", "dv", "dmask"}


def test_launches_never_add_to_one_element_twice(engine):
    # one backward launch per batch for [L, S] (shared by the batches), one per key/value head
    # and batch for [B, 1, L, S] with 4 key/value heads; [B, H, L, S] runs whole
    def backward_launches(case):
        record = encode.encode(case.call())
        return sum(1 for d in record.dispatches if record.kernel_of(d) == "attention_backward_key_value")

    assert backward_launches(MATRIX[0]) == 1
    assert backward_launches(MATRIX[1]) == MATRIX[1].batch * MATRIX[1].kv_heads  # [L, S]: shared by both
    assert backward_launches(MATRIX[4]) == MATRIX[4].batch * MATRIX[4].kv_heads
    assert backward_launches(MATRIX[6]) == MATRIX[6].batch  # [1, H, L, S]: all heads at once


def test_a_kernel_that_stores_instead_of_adding_fails(engine):
    seen = set()
    store = mutated([(("attention_backward_key_value",), "(float(*element) + ", "(0.0f + ")], seen)
    case = MATRIX[2]  # per batch with two query heads per group: each element gets two adds
    result = execute.run(case.call(), seed=5, edit=store)
    assert seen == {"attention_backward_key_value"}
    assert not result["ok"] and result["used"]["dmask"] > 1, result
    assert all(result["used"][name] <= 1 for name in ("out", "dq", "dk", "dv"))


def test_nothing_of_size_l_x_s_beyond_the_gradient(engine):
    # `plan`'s extra_bytes (ccv's scratch) are at most those of the same call without the
    # gradient (its launches of one batch or group need less), and the only buffer added is
    # the gradient, at the mask's own size: [L, S] for a mask shared by the batches and heads,
    # not one per batch or head
    import mfa_engine

    for case in (MATRIX[1], MATRIX[4]):
        with_grad = encode.encode(case.call())
        without = encode.encode(dataclasses.replace(case.call(), mask_grad=False))
        assert mfa_engine.plan(with_grad)["extra_bytes"] <= mfa_engine.plan(without)["extra_bytes"]
        names = [{b["name"] for b in record.raw["buffers"]} for record in (with_grad, without)]
        assert names[0] - names[1] == {"mask_grad"}
        (length,) = [b["length"] for b in with_grad.raw["buffers"] if b["name"] == "mask_grad"]
        bm, hm, rows, keys = case.call().mask_dims()
        assert length == bm * hm * rows * keys * 2 and bm * hm == (1 if case.mask_shape == "LS" else case.batch)
