"""Rung 4 (DESIGN section 10) for our patch 0015 (issue 19): attention dropout in the forward
and both backward kernels.

Each case is encoded through ccv's own encode path, executed on the CPU and compared with
PyTorch's math SDPA in float64 given the keep decisions of metal_flash_sdpa.dropout
(`aten._scaled_dot_product_attention_math` takes a `dropout_mask`), within
MFAKernel.tolerances: a kernel that dropped other elements, scaled them otherwise, or took
the dropped P into the softmax statistics, misses by far more. The matrix covers each dtype,
family and copy mode, causal, masked (bool and additive), GQA, and a call sliced by heads
(whose decisions must stay those of its heads' places in the tensors). The generator in the
kernels' source, executed on the CPU, equals the Python one bit for bit; the Python one's
statistics are tests/test_dropout.py's. A backward that redraws other decisions fails.
"""

import dataclasses
import re

import pytest
import torch

import engine_setup
from engine_setup import Case  # puts tools/ on sys.path

from engine import encode, execute, metal  # noqa: E402  (after engine_setup)
from metal_flash_sdpa import dropout  # noqa: E402

SEED = 0x0123456789ABCDEF


@dataclasses.dataclass(frozen=True)
class DropoutCase(Case):
    dropout: float = 0.1
    dropout_seed: int = SEED
    causal: bool = False
    mask: str = "none"
    scratch_budget: int = None


MATRIX = [
    DropoutCase("apple9", "fp32", 97, 130, 2, 2, head_dim=32),
    DropoutCase("apple7", "fp16", 97, 130, 4, 2, head_dim=32, causal=True, dropout=0.5),  # GQA
    DropoutCase("apple9", "bf16", 33, 31, 2, 1, head_dim=32, mask="bool", macos=15),  # MQA; async copies
    DropoutCase("apple7", "fp32", 33, 31, 2, 2, head_dim=16, mask="additive", dropout=0.3, macos=15),
    # head slices (patch 0011): each ccv call draws for its own heads' places
    DropoutCase("apple9", "fp16", 40, 56, 4, 2, head_dim=32, scratch_budget=6000),
]


def run(case, edit=None, seed=6):
    return execute.run(case.call(), seed=seed, edit=edit, check_refusal=False)


@pytest.fixture(scope="module")
def engine():
    engine_setup.precompile(case.call() for case in MATRIX)


@pytest.mark.parametrize("case", MATRIX, ids=lambda case: f"{case}-p{case.dropout}")
def test_dropout_matches_float64_pytorch_with_its_keep_mask(engine, case):
    result = run(case)
    assert result["ok"], result
    # as tests/test_engine_execute.py, for values (and their errors) scaled by 1 / (1 - p)
    assert max(result["used"].values()) <= 0.5 / (1 - case.dropout), result
    assert set(result["max_abs"]) == {"out", "lse", "dq", "dk", "dv"}


def test_a_sliced_call_is_sliced(engine):
    # The last case runs as several ccv calls: the decisions are the tensors', not a slice's.
    record = encode.encode(MATRIX[-1].call(), check_refusal=False)
    assert sum(1 for d in record.dispatches if record.kernel_of(d) == "attention_forward") > 1


def test_the_kernels_generator_is_the_python_one(engine):
    # The source's dropout_draws, run by one thread per counter on the executor, against
    # metal_flash_sdpa.dropout.philox4x32 over a grid of (column, row, head, batch), with the
    # call's first batch and head added as a slice's would be.
    source = next(k.source for k in encode.encode(MATRIX[0].call(), check_refusal=False).kernels())
    functions = source[source.index("// metal-flash-sdpa: attention dropout's keep decisions.") :]
    functions = functions[: functions.index("METAL_FUNC float2 dropout_factors(")]
    kernel = metal.load_kernel(
        "#include <metal_stdlib>\nusing namespace metal;\n" + functions + GRID_KERNEL, "draw_grid"
    )
    columns, rows, heads, batches = 12, 5, 3, 2
    count = columns * rows * heads * batches
    key = dropout.split_seed(SEED)
    parameters = torch.tensor([key[0], key[1], 0, 0, 7, 3], dtype=torch.int64).to(torch.int32)
    out = torch.zeros(count * 4, dtype=torch.int32)
    kernel.run((count, 1, 1), (1, 1, 1), {0: out.data_ptr(), 1: parameters.data_ptr()}, {}, {})
    index = torch.arange(count)
    counter = (index % columns, index // columns % rows, index // (columns * rows) % heads + 3, index // (columns * rows * heads) + 7)
    expected = torch.stack(dropout.philox4x32(counter, key), dim=-1).reshape(-1)
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, expected)


GRID_KERNEL = """
kernel void draw_grid(device uint4* out [[buffer(0)]], constant uint* parameters [[buffer(1)]],
                      uint index [[thread_position_in_grid]]) {
  const uint columns = 12, rows = 5, heads = 3;
  out[index] = dropout_draws(parameters, index / (columns * rows * heads), index / (columns * rows) % heads,
                             index / columns % rows, index % columns * 4);
}
"""


def test_a_backward_with_other_decisions_fails(engine):
    # backward-query reads the keep decision of the next query row
    case = MATRIX[0]
    seen = set()
    edit = engine_setup.mutated(
        [(("attention_backward_query",), "dropout_factors_columns(dropout_parameters, gid.z, gid.y, parallelization_group_offset",
          "dropout_factors_columns(dropout_parameters, gid.z, gid.y, 1 + parallelization_group_offset")], seen
    )
    result = run(case, edit=edit)
    assert seen == {"attention_backward_query"}
    assert not result["ok"] and result["used"]["dq"] > 1 and result["used"]["out"] <= 0.5, result


def test_kernels_without_dropout_are_unchanged(engine):
    # Patch 0015 adds its code only to dropout kernels.
    for case in (MATRIX[0], MATRIX[2]):
        plain = dataclasses.replace(case, dropout=0.0).call()
        for kernel in encode.encode(plain).kernels():
            assert not re.search(r"dropout", kernel.source), kernel.name
