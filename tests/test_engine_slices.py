"""Long context (issue #17): a call whose ccv scratch would pass the budget runs as slices
of batches or heads (patch 0011, native/mfa_params.hpp plan_slices), with extra memory
that grows linearly.

The targets are read from `plan` through the real driver (nothing executed): bf16 and fp16,
1 x 32 heads (8 KV heads) x D=128 at 128k tokens, causal, with grad, on Apple7 and Apple9,
are served with at most 512 MiB beyond the user's tensors, and at most 4.5x what 32k takes;
fp32 at 64k is served. The slicing itself is executed on the CPU at sizes it can run, with
the budget lowered so that slices split heads inside and across GQA groups, batches, masks
and the causal triangle, forward and backward, against float64 PyTorch within
MFAKernel.tolerances.
"""

import concurrent.futures
import dataclasses
import json
import sys

import pytest

import engine_setup

from engine import encode, execute  # noqa: E402  (after engine_setup)

CLI = engine_setup.REPO / "tools" / "mfa_engine.py"
sys.path.insert(0, str(CLI.parent))
from mfa_engine import plan  # noqa: E402

MiB = 1 << 20
LONG = dict(batch=1, heads=32, kv_heads=8, head_dim=128, causal=True, grad=True)


@dataclasses.dataclass(frozen=True)
class Case(engine_setup.Case):
    causal: bool = False
    mask: str = "none"
    mask_shape: str = "B1LS"
    scratch_budget: int = None
    slices: tuple = ()  # (forward, backward) ccv calls the budget makes

    def __str__(self):
        return f"{super().__str__()}-budget{self.scratch_budget}"


MATRIX = [
    # forward: one query head a slice (half a GQA group); backward: one group a slice
    Case("apple9", "fp16", 40, 56, 4, 2, head_dim=32, causal=True, scratch_budget=6000, slices=(8, 4)),
    # backward: runs of whole batches (2 + 1), a per-head mask offset by batch
    Case("apple9", "bf16", 33, 47, 2, 2, head_dim=16, batch=3, mask="additive", mask_shape="BHLS", scratch_budget=34000, slices=(1, 2)),
    # fp32: outputs in place, only the backward's D term in scratch; groups of 3 query heads
    Case("apple9", "fp32", 40, 24, 6, 2, head_dim=16, batch=1, mask="bool", scratch_budget=400, slices=(1, 2)),
    # one head a slice under a per-head mask, async copies (macOS 15) on Apple7
    Case("apple7", "fp16", 24, 40, 3, 3, head_dim=16, mask="bool", mask_shape="BHLS", macos=15, scratch_budget=7000, slices=(2, 6)),
]


def planned(**fields) -> dict:
    return plan(encode.encode(encode.Call(**fields)))


@pytest.fixture(scope="module")
def long_plans():
    """The long-context plans, two at a time: {(dtype, gpu, length): plan}."""
    engine_setup.precompile([])
    keys = [(d, g, 131072) for d in ("bf16", "fp16") for g in ("apple7", "apple9")]
    keys += [("bf16", "apple9", 32768), ("fp16", "apple9", 32768), ("fp32", "apple9", 65536)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        plans = pool.map(lambda key: planned(dtype=key[0], gpu=key[1], q_len=key[2], kv_len=key[2], **LONG), keys)
        return dict(zip(keys, plans))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("gpu", ["apple7", "apple9"])
def test_128k_backward_is_served_within_512_mib(long_plans, dtype, gpu):
    result = long_plans[(dtype, gpu, 131072)]
    assert result["extra_bytes"] <= 512 * MiB, result
    assert result["kernels"][-1] == "attention_backward_key_value" and result["slices"]["backward"] > 1
    # the scratch before slicing: fp32 dQ, dK, dV and the D term, 3 GiB
    assert result["extra_bytes"] < (4 * (131072 * 32 + 2 * 131072 * 8) * 128 + 4 * 131072 * 32) / 6


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_extra_memory_grows_linearly(long_plans, dtype):
    at_32k, at_128k = long_plans[(dtype, "apple9", 32768)], long_plans[(dtype, "apple9", 131072)]
    assert at_128k["extra_bytes"] <= 4.5 * at_32k["extra_bytes"], (at_32k, at_128k)


def test_fp32_at_64k_is_served(long_plans):
    result = long_plans[("fp32", "apple9", 65536)]
    assert result["slices"] == {"forward": 1, "backward": 1}  # the D term only: 8 MiB
    assert result["extra_bytes"] <= 9 * MiB


def test_plan_cli_prints_one_json_line_and_exits_as_source(capsys):
    """The command's own main() (the process around it is `source`'s, tested there)."""
    import mfa_engine

    flags = ["--dtype", "fp16", "--q-len", "64", "--kv-len", "64"]
    assert mfa_engine.main(["plan", *flags, "--head-dim", "64"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"kernels", "dispatches", "threadgroup_bytes", "slices", "extra_bytes", "mask_tile_bytes"}
    assert result["mask_tile_bytes"] == 0
    assert result["kernels"] == ["attention_forward", "cast_float_to_half"] and result["dispatches"] == 2
    assert 0 < result["threadgroup_bytes"] <= 32768
    assert mfa_engine.main(["plan", *flags, "--head-dim", "520"]) == 2
    assert "head dim 520" in capsys.readouterr().err


@pytest.fixture(scope="module")
def engine():
    engine_setup.precompile([case.call() for case in MATRIX])


@pytest.mark.parametrize("case", MATRIX, ids=str)
def test_slices_match_float64_pytorch(engine, case):
    call = case.call()
    slices = plan(encode.encode(call))["slices"]
    assert (slices["forward"], slices["backward"]) == case.slices
    result = execute.run(call, seed=5)
    assert result["ok"], result


def test_unsliced_calls_are_unchanged(engine):
    """Without slicing the casts are the plain ones of the pin; sliced, they write rows."""
    for budget, slices, rows in ((None, {"forward": 1, "backward": 1}, False), (6000, {"forward": 8, "backward": 4}, True)):
        record = encode.encode(MATRIX[0].call(scratch_budget=budget))
        assert plan(record)["slices"] == slices
        assert ("row_stride" in "".join(kernel.source for kernel in record.kernels())) == rows


def test_a_masked_long_call_needs_no_more_scratch(long_plans):
    # Its tile summaries are of the whole call, yet ccv's scratch stays that of its slices
    # (the summaries' kernels are built without preparing the whole call); the summaries
    # themselves are MFAKernel's small tensors. LONG's fields, a [L, S] bool mask instead of causal.
    fields = {**LONG, "causal": False, "mask": "bool", "mask_shape": "LS"}
    masked = planned(dtype="bf16", gpu="apple9", q_len=32768, kv_len=32768, **fields)
    unmasked = long_plans[("bf16", "apple9", 32768)]
    assert masked["slices"] == unmasked["slices"] and masked["slices"]["backward"] > 1
    assert masked["extra_bytes"] == unmasked["extra_bytes"], (masked, unmasked)
    assert 0 < masked["mask_tile_bytes"] < (4 << 20)
