"""Rung 4 (DESIGN section 10) for our patch 0014 (issue 18 item 3): without async copies
(macOS 26 and later) every thread of the threadgroup takes part in each tile copy, by 8-
and 16-byte vectors, with no division per element.

The executor checks the copies (every access aligned to its size; every thread in every
copy; each element of a tile written once) and counts them: `run`'s "copies" per kernel,
balance (the busiest thread's elements over an even split), balance_floor (the same for the
most even split into 8-byte accesses) and vector_share. Every case of
tests/test_engine_execute.py's matrix asserts the figures (engine_setup.copies_even, and a
vector share of 90% or more) in the macOS 26 mode. Here: the results are bit for bit those
of ccv's async copies (each dtype, both families); a binding the vectors could not use is
refused; wrong variants are caught, each by what it breaks (a figure or a check).
"""

import dataclasses

import pytest
import torch

import engine_setup
from engine_setup import Case  # puts tools/ on sys.path

from engine import encode, execute, metal  # noqa: E402  (after engine_setup)

KERNELS = ("attention_forward", "attention_backward_query", "attention_backward_key_value")

# Each dtype and family; kernels other test modules compile in both modes.
SAME_BITS = [
    Case("apple9", "fp32", 97, 130, 3, 3, head_dim=72),  # cached and uncached operands, R % 4 = 1
    Case("apple7", "fp16", 63, 31, 2, 2, head_dim=16),  # an fp32 scratch cast into fp16
    Case("apple7", "bf16", 97, 130, 3, 3, head_dim=64),  # Apple7's accumulator round trip
]
MUTANT = SAME_BITS[0]


@pytest.fixture(scope="module")
def engine():
    calls = [dataclasses.replace(case, macos=macos).call() for case in SAME_BITS for macos in (15, 26)]
    engine_setup.precompile(calls)


@pytest.mark.parametrize("case", SAME_BITS, ids=str)
def test_results_are_the_async_copies_bits(engine, case):
    # A copy moves bits: whoever moves them, the kernels compute the same values.
    inputs = execute.random_inputs(case.call(), seed=4)
    runs = {}
    for macos in (15, 26):
        call = dataclasses.replace(case, macos=macos).call()
        runs[macos] = execute.execute(encode.encode(call), inputs)
    assert {name for name, copies in runs[26].copies().items() if copies} == set(KERNELS)
    assert not any(runs[15].copies().values())  # the copy engine's
    for name, tensor in runs[26].outputs.items():
        assert torch.equal(tensor.view(torch.uint8), runs[15].outputs[name].view(torch.uint8)), (case, name)


def test_a_binding_off_16_bytes_is_refused_without_async_copies(engine):
    # ccv's precondition (an exception the bridge reports), never a misaligned vector; the
    # async copies take any element offset. MFAKernel copies such a view first
    # (tests/test_mfa_alignment.py).
    for macos, offset in ((26, 8), (15, 8), (26, 16)):
        call = dataclasses.replace(MUTANT, macos=macos).call()
        if macos == 26 and offset % 16:
            with pytest.raises(encode.EngineError, match="tensor_offsets"):
                encode.encode(call, "--offset", str(offset))
        else:
            assert encode.encode(call, "--offset", str(offset)).dispatches


# -- wrong variants: each must be caught -------------------------------------------------------

FORWARD = ("attention_forward",)
APPLE9, APPLE7 = SAME_BITS[0], SAME_BITS[2]  # Apple7 copies whole blocks of K and V
MUTATIONS = {
    # 16-byte chunks even where 8-byte ones keep more threads busy: right values, uneven
    "always_16_bytes": (APPLE9, FORWARD, "if (rows && most < least) {", "if (rows && bytes == 16) {"),
    # every SIMD group copies the whole tile: right values, twice the work
    "each_simd_group_copies_all": (APPLE7, FORWARD, "event(sidx * 32 + lane_id, 128)", "event(lane_id, 32)"),
    # the second SIMD group on skips its share of each copy
    "one_simd_group_copies": (APPLE7, FORWARD, "switch (chunk_bytes(", "if (index >= 32) return;\n      switch (chunk_bytes("),
    # element by element: no vector moves a byte
    "no_vectors": (APPLE7, FORWARD, "const bool vectors = true && aligned;", "const bool vectors = false && aligned;"),
    # the walk skips a row after every pass of the threads
    "rows_skipped": (APPLE7, FORWARD, "rows_step = stride / chunks_per_row;", "rows_step = stride / chunks_per_row + 1;"),
    # L and D read by vectors though their rows start at R floats a head (R = 97)
    "misaligned_rows": (APPLE9, ("attention_backward_key_value",), "lane_id, 64, R % 4 == 0)", "lane_id, 64, true)"),
}
# What catches each: the run's figures, or the executor's checks (the error it raises).
CAUGHT_BY = {
    "always_16_bytes": "balance",
    "each_simd_group_copies_all": "elements of a tile of",
    "one_simd_group_copies": "not made by every thread",
    "no_vectors": "vector_share",
    "rows_skipped": "elements of a tile of",
    "misaligned_rows": "Metal needs its vectors aligned",
}


def run_mutant(name):
    case, kernels, old, new = MUTATIONS[name]
    seen = set()
    call = case.call(grad=kernels != FORWARD)
    try:
        result = execute.run(call, seed=5, edit=engine_setup.mutated([(kernels, old, new)], seen))
    except metal.MetalExecutionError as caught:
        result = {"ok": False, "error": str(caught)}
    assert seen == set(kernels), "the mutation is in no kernel: it would test nothing"
    return result


@pytest.mark.parametrize("name", MUTATIONS)
def test_wrong_variant_is_caught(engine, name):
    result = run_mutant(name)
    caught_by = CAUGHT_BY[name]
    if caught_by == "balance":
        copies = result["copies"]["attention_forward"]
        assert result["ok"] and not engine_setup.copies_even(copies), copies
    elif caught_by == "vector_share":
        assert result["ok"] and result["copies"]["attention_forward"]["vector_share"] < 0.9, result
    else:
        assert caught_by in result.get("error", ""), result
