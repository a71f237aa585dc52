"""Rung 4 (DESIGN section 10) for grouped-query attention: our patch 0006 (issue #10 item 2).

Hq query heads share Hk key/value heads (Hq a multiple of Hk; MQA is Hk = 1), K and V never
expanded in memory: query head h reads key/value head h / (Hq / Hk), as torch's
enable_gqa (repeat_interleave) does, and dK/dV of a key/value head sum over its group,
accumulated by the backward-key-value kernel looping over the group's query heads.

Each case is encoded through ccv's own encode path, executed on the CPU and compared with
PyTorch's math SDPA in float64 (enable_gqa=True), within MFAKernel.tolerances. The matrix is a covering design over GQA ratios 1, 2, 4, 8
and MQA, head dims 32 to 256, both GPU families, both dtypes, lengths that are not
multiples of any block (97x130, 33x31), batch 2, macOS 26 (and one macOS 15, ccv's async
copies). Wrong variants (interleaved heads, the group loop not reset or not advanced) fail.
"""

import pytest

import engine_setup
from engine_setup import Case  # puts tools/ on sys.path

from engine import encode, execute  # noqa: E402  (after engine_setup)

KERNELS = ("attention_forward", "attention_backward_query", "attention_backward_key_value")


# ratio = heads / kv_heads. Every ratio (1, 2, 4, 8, and Hk = 1) and head dim appears, each
# dtype and family with several ratios, the long lengths with GQA and MQA.
MATRIX = [
    Case("apple9", "fp32", 97, 130, 4, 2, head_dim=32),  # ratio 2
    Case("apple9", "fp16", 33, 31, 8, 2, head_dim=64),  # ratio 4
    Case("apple7", "fp32", 33, 31, 8, 1, head_dim=80),  # ratio 8, MQA
    Case("apple7", "fp16", 97, 130, 4, 1, head_dim=96),  # MQA, ratio 4
    Case("apple9", "fp16", 33, 31, 2, 1, head_dim=128, macos=15),  # MQA, ratio 2; async copies
    Case("apple9", "fp32", 33, 31, 4, 2, head_dim=256),  # ratio 2, the largest head dim served here
    Case("apple7", "fp16", 33, 31, 8, 1, head_dim=32),  # ratio 8, MQA
    Case("apple7", "fp32", 97, 130, 4, 2, head_dim=64),  # ratio 2
    Case("apple9", "fp16", 33, 31, 2, 2, head_dim=80),  # ratio 1, multi-head through the same path
    Case("apple9", "fp32", 97, 130, 8, 1, head_dim=128),  # ratio 8, MQA, long
    Case("apple7", "fp32", 33, 31, 2, 1, head_dim=128, macos=15),  # MQA; async copies
]


def run(case: Case, edit=None) -> dict:
    return execute.run(case.call(), seed=2, edit=edit)


@pytest.fixture(scope="module")
def engine():
    engine_setup.precompile(case.call() for case in MATRIX)


@pytest.mark.parametrize("case", MATRIX, ids=str)
def test_gqa_matches_float64_pytorch(engine, case):
    result = run(case)
    assert result["ok"], result
    assert max(result["used"].values()) <= 0.5, result  # as tests/test_engine_execute.py
    assert set(result["max_abs"]) == {"out", "lse", "dq", "dk", "dv"}
    assert all(result["mma"][name] > 0 for name in KERNELS)


def test_backward_key_value_runs_over_the_key_value_heads(engine):
    # One threadgroup per key/value head and key block (the group loops inside), the forward
    # and backward-query one per query head and query block.
    case = Case("apple9", "fp32", 97, 130, 8, 2, head_dim=32)
    record = encode.encode(case.call())
    grids = {}
    for dispatch in record.dispatches:
        pipeline = record.raw["pipelines"][dispatch["pipeline"]]
        source = record.raw["libraries"][pipeline["library"]]["source"]
        grids[encode.kernel_name(pipeline["function"], source)] = dispatch["grid"][0]
    assert grids["attention_forward"] == -(-case.q_len // 16) * case.heads * case.batch
    assert grids["attention_backward_query"] == -(-case.q_len // 16) * case.heads * case.batch
    assert grids["attention_backward_key_value"] % (case.kv_heads * case.batch) == 0
    kv_blocks = grids["attention_backward_key_value"] // (case.kv_heads * case.batch)
    assert kv_blocks == -(-case.kv_len // kv_blocks_size(record))


def kv_blocks_size(record) -> int:
    source = next(k.source for k in record.kernels() if k.name == "attention_backward_key_value")
    # gid.x % ((C + BLOCK - 1) / BLOCK)
    return int(source.split("gid = { gid.x % ((C + ")[1].split(" ")[0])


# -- wrong variants: each must fail -------------------------------------------------------------

MUTANT = Case("apple9", "fp32", 33, 31, 4, 2, head_dim=32)
MUTATIONS = {
    # K/V of query head h taken as h % Hk (interleaved) instead of h / ratio (grouped).
    "interleaved_heads": (("attention_forward", "attention_backward_query"), "(gid.y / H_Hk_ratio)", "(gid.y % Hk)"),
    # dK/dV accumulators zeroed at every member of the group: only the last query head counts.
    "group_loop_resets_accumulators": (("attention_backward_key_value",), "(r == 0) && (member == 0)", "(r == 0)"),
    # The group loop not moving Q, dO, L, D to the member: the first query head, ratio times.
    "group_loop_does_not_advance": (("attention_backward_key_value",), "(gid.y * H_Hk_ratio + member)", "(gid.y * H_Hk_ratio)"),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_wrong_variant_fails(engine, name):
    kernels = MUTATIONS[name][0]
    seen = set()
    # The mutations stay inside every buffer, so they run in this process.
    result = run(MUTANT, edit=engine_setup.mutated([MUTATIONS[name]], seen))
    assert seen == set(kernels)
    assert not result["ok"], f"the wrong variant passed: {result}"
