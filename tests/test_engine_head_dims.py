"""Rung 4 (DESIGN section 10) for head dims above 384 (patch 0016) and value head dims that
differ from the query's (metal_flash_sdpa/kernels/value_dim.py), issue #20 items 1 and 2.

Head dims 392-512 run the tables' rows of patch 0016: here at 512 and at 456 (a multiple of 8
that leaves a partial head block of 8), in fp32, fp16 and bf16, both GPU families and copy
modes, causal, bool and additive masks and GQA, forward and backward. A value head dim of its
own runs the kernels at the wider dim with the narrower side padded with zeros, by the
package's own functions (the executor pads and cuts as MFAKernel does): MLA's 192 / 128,
128 / 64 and the other way round, 64 / 128. Each case is encoded through ccv's own encode
path, executed on the CPU and compared with PyTorch's math SDPA in float64 at the call's own
head dims, within MFAKernel.tolerances.
"""

import dataclasses
import json
import subprocess
import sys

import pytest

import engine_setup
from conftest import REPO
from engine_setup import Case, copies_even  # puts tools/ on sys.path

from engine import encode, execute  # noqa: E402  (after engine_setup)

CLI = REPO / "tools" / "mfa_engine.py"
KERNELS = ("attention_forward", "attention_backward_query", "attention_backward_key_value")


@dataclasses.dataclass(frozen=True)
class DimCase(Case):
    value_dim: int = None
    causal: bool = False
    mask: str = "none"
    mask_shape: str = "B1LS"


MATRIX = [
    # head dims above 384: patch 0016's rows
    DimCase("apple9", "fp32", 33, 40, 2, 1, head_dim=512, causal=True),  # GQA 2:1, causal, no async copies
    DimCase("apple7", "bf16", 33, 40, 2, 2, head_dim=456, mask="additive", mask_shape="BHLS", macos=15),
    DimCase("apple9", "fp16", 17, 47, 4, 2, head_dim=456, mask="bool", batch=1, macos=15),  # GQA 2:1, async copies
    DimCase("apple7", "fp16", 40, 33, 2, 1, head_dim=512, causal=True, batch=1),  # MQA, causal, fewer keys
    # value head dims of their own: the narrower padded
    DimCase("apple9", "fp16", 33, 40, 4, 2, head_dim=192, value_dim=128, causal=True),  # MLA, GQA
    DimCase("apple7", "fp32", 33, 40, 2, 2, head_dim=128, value_dim=64, mask="additive", macos=15),
    DimCase("apple9", "bf16", 40, 33, 2, 1, head_dim=64, value_dim=128, mask="bool", mask_shape="BHLS"),  # wider V
]


@pytest.fixture(scope="module")
def engine():
    engine_setup.precompile(case.call() for case in MATRIX)


@pytest.mark.parametrize("case", MATRIX, ids=lambda case: f"{case}-v{case.value_dim or case.head_dim}")
def test_kernels_match_float64_pytorch(engine, case):
    result = execute.run(case.call(), seed=4)
    assert result["ok"], result  # within MFAKernel.tolerances (bf16 at 456 with a mask used 0.7 of them)
    assert all(result["mma"][name] > 0 for name in KERNELS)
    if case.macos >= 26:  # each thread copies its share (patch 0014) at these head dims too
        assert all(copies_even(result["copies"][name]) for name in KERNELS), result["copies"]


def test_a_value_dim_runs_the_kernels_of_the_wider_head_dim(engine):
    # What `source` prints for 192 / 128 is what 192 / 192 runs: the same kernels, padded operands.
    mla, square = MATRIX[4].call(), dataclasses.replace(MATRIX[4].call(), value_dim=None)
    assert [k.source for k in encode.encode(mla).kernels()] == [k.source for k in encode.encode(square).kernels()]
    # and the bytes the executor compares are the call's own: out and dv at 128, dq and dk at 192
    inputs = execute.random_inputs(mla, seed=4)
    assert inputs["v"].shape[-1] == inputs["do"].shape[-1] == 128 and inputs["q"].shape[-1] == 192
    padded = execute.kernel_inputs(mla, inputs)
    assert all(padded[name].shape[-1] == 192 for name in ("q", "k", "v", "do"))
    assert padded["v"][..., 128:].eq(0).all() and padded["v"][..., :128].equal(inputs["v"])


def test_a_value_dim_wider_than_16_bit_leading_dimensions_is_refused():
    # heads x the wider head dim bounds the leading dimension: 136 heads of 480 / 64 is 65280,
    # of 64 / 512 it is 69632
    args = ["plan", "--dtype", "fp16", "--q-len", "8", "--kv-len", "8", "--heads", "136"]
    ok = subprocess.run([sys.executable, str(CLI), *args, "--head-dim", "480", "--value-dim", "64"], capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout)["kernels"] == ["attention_forward", "cast_float_to_half"], ok.stderr
    refused = subprocess.run([sys.executable, str(CLI), *args, "--head-dim", "64", "--value-dim", "512"], capture_output=True, text=True)
    assert refused.returncode == 2 and "16-bit leading dimension" in refused.stderr, refused.stderr


def test_threadgroup_memory_of_the_512_rows_is_within_32_kib(engine):
    # AttentionDescriptor::row (patch 0016): the largest block, 128 x 16 x 4 bytes on Apple9 and
    # 80 x 16 x 4 on Apple7, at any head dim up to 512
    for gpu, most in (("apple9", 8192), ("apple7", 5120)):
        args = ["plan", "--dtype", "fp32", "--q-len", "40", "--kv-len", "40", "--head-dim", "512", "--grad", "--gpu", gpu]
        result = subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["threadgroup_bytes"] == most <= 32768
