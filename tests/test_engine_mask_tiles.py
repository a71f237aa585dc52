"""Rung 4 (DESIGN section 10) for the mask's tile summary: our patch 0013 (issue 18 item 1).

A masked call first runs the summary's kernels on the mask (mask_tiles, mask_ranges: a
class a kernel tile, and each block's range of tiles that attend any key), then the
attention kernels, which loop over that range only, skip the excluded tiles inside it and
read no mask in the clean ones. Checked here, executed on the CPU:
- the work the patterns models pass leave, by the executor's multiply-accumulate count
  over all kernels (the summary's own reads counted as one multiply-add each, 512 to an
  8x8x8 multiply-accumulate) against the same call unmasked: fp16, D=64, L=S=2048, grad;
- results within tolerance of float64 PyTorch for those patterns, and for masks whose
  excluded tiles sit inside a block's range, per head, with GQA, bool and additive, both
  families and copy modes;
- wrong summaries and wrong skips fail.
"""

import dataclasses

import pytest

import engine_setup  # puts tools/ on sys.path

from engine import encode, execute, masks, metal  # noqa: E402  (after engine_setup)

KERNELS = ("attention_forward", "attention_backward_query", "attention_backward_key_value")
TILES = tuple(name.replace("attention", "mask_tiles") for name in KERNELS)  # the summary's kernels
RANGES = tuple(name.replace("attention", "mask_ranges") for name in KERNELS)
# One multiply-accumulate of the executor's count is an 8x8x8 simdgroup multiply: 512 multiply-adds.
MULTIPLY_ADDS = 512

# The targets: the share of the unmasked call's work a pattern may take.
LENGTH = 2048
TARGETS = {"causal": 0.56, "window:256": 0.25, "docs:4": 0.20, "keypad:0.5": 0.56, "random": 1.02}


def work(result: dict) -> float:
    """A run's multiply-accumulates over all kernels, the summary's reads included."""
    return sum(result["mma"].values()) + result["mask_tile_reads"] / MULTIPLY_ADDS


@pytest.fixture(scope="module")
def unmasked():
    with engine_setup.engine_required():
        result = execute.run(encode.Call(dtype="fp16", q_len=LENGTH, kv_len=LENGTH, head_dim=64, grad=True), check_refusal=False)
    assert result["ok"], result
    return result


@pytest.mark.parametrize("pattern", TARGETS)
def test_masked_work_within_target(unmasked, pattern):
    call = encode.Call(dtype="fp16", q_len=LENGTH, kv_len=LENGTH, head_dim=64, grad=True, mask="bool", mask_pattern=pattern)
    result = execute.run(call, check_refusal=False)
    assert result["ok"], result
    share = work(result) / work(unmasked)
    assert share <= TARGETS[pattern], (pattern, share, result["mma"])
    if pattern != "random":  # every kernel skips, not only their sum
        for name in KERNELS:
            assert result["mma"][name] < 0.6 * unmasked["mma"][name], (name, result["mma"])


# Kernel configurations as in test_engine_mask.py's matrix (they compile once), with masks
# that leave excluded tiles inside a block's range and differ between heads.
Case = engine_setup.Case


def holes(call: encode.Call, generator):
    """A per-head bool mask with a band of 300 keys excluded from every row (whole tiles of
    up to 128 keys inside each block's range), shifted per head, and the padding of
    masks.make."""
    keep = masks.make(call, generator)
    for head in range(keep.shape[1]):
        keep[:, head, :, 40 + 24 * head : 340 + 24 * head] = False
    return keep


MATRIX = [
    (Case("apple9", "fp16", 130, 420, 4, 2), "bool"),
    (Case("apple7", "bf16", 290, 420, 4, 1), "additive"),
    (Case("apple9", "fp32", 200, 420, 2, 2, head_dim=128, macos=15), "bool"),
]


@pytest.mark.parametrize("case, kind", MATRIX, ids=lambda x: str(x))
def test_excluded_tiles_inside_the_range(case, kind):
    call = case.call(mask=kind, mask_shape="BHLS")
    inputs = execute.random_inputs(call, seed=3)
    import torch

    keep = holes(dataclasses.replace(call, mask="bool"), torch.Generator().manual_seed(3))
    inputs["mask"] = keep if kind == "bool" else masks.additive(keep, call.torch_dtype)
    inputs["kernel_mask"] = masks.kernel_form(inputs["mask"], call.torch_dtype)
    with engine_setup.engine_required():
        record = encode.encode(call, check_refusal=False)
    execution = execute.execute(record, inputs)
    comparison = execute.compare(execution, execute.reference(call, inputs), execute.tolerances(call))
    assert comparison.ok, comparison.used
    # the band skips tiles: less work than the same call with every key attended
    full = dict(inputs, mask=torch.ones_like(keep) if kind == "bool" else torch.zeros(keep.shape, dtype=call.torch_dtype))
    full["kernel_mask"] = masks.kernel_form(full["mask"], call.torch_dtype)
    attended = execute.execute(record, full)
    for name in KERNELS:
        assert execution.mma[name] < attended.mma[name], (name, execution.mma, attended.mma)


def test_self_check_canary_skips_tiles():
    # The self-check's canary (trust.canary_inputs) makes MFA's kernels skip tiles on the
    # user's Mac, where a variant is checked before its first use: fewer multiply-accumulates
    # in every kernel than with its masked band attended, and results within tolerance.
    import torch

    from metal_flash_sdpa import trust

    key = (None, None, "backward", torch.float16, 4, 2, 64, 64, 0.125, False, trust.MASK_KINDS.index("bool per-head"), False)
    q, k, v, mask, grad_out = trust.canary_inputs(key, 100, 1000)
    call = encode.Call(dtype="fp16", heads=4, kv_heads=2, q_len=q.shape[2], kv_len=k.shape[2], head_dim=64, grad=True,
                       mask="bool", mask_shape="BHLS", scale=0.125)
    inputs = {name: t.transpose(1, 2).contiguous() for name, t in zip(("q", "k", "v", "do"), (q, k, v, grad_out))}
    with engine_setup.engine_required():
        record = encode.encode(call, check_refusal=False)
    runs = []
    for band in (mask, mask | (torch.arange(call.kv_len) >= 32)):
        inputs["mask"] = inputs["kernel_mask"] = band
        execution = execute.execute(record, inputs)
        comparison = execute.compare(execution, execute.reference(call, inputs, scale=0.125), execute.tolerances(call))
        assert comparison.ok, comparison.used
        runs.append(execution.mma)
    for name in KERNELS:
        assert runs[0][name] < runs[1][name], (name, runs)


# -- wrong variants: each must fail -------------------------------------------------------------

MUTANT = (Case("apple9", "fp16", 64, 420, 4, 2), "bool")  # MATRIX[0]'s kernels, fewer rows
MUTATIONS = {
    # mixed tiles skipped as excluded
    "mixed_skipped": (KERNELS, "if (mask_tile == MASK_TILE_EXCLUDED) {", "if (mask_tile != MASK_TILE_CLEAN) {"),
    # a tile with excluded keys summarised as clean: its mask is never read
    "excluded_keys_clean": (TILES, "clean = clean && (bits != 0);", "clean = clean && true;"),
    # the range ends a tile early
    "range_short": (RANGES, "((device uint*)entry)[1] = min((last + 1) *", "((device uint*)entry)[1] = min((last + 0) *"),
    # a block without keys skips its only tile: its outputs are never written
    "empty_block_skipped": (RANGES, "entry[8] = MASK_TILE_MIXED;", "entry[8] = MASK_TILE_EXCLUDED;"),
    # backward-key-value reads the first member's entries for every query head of the group
    "member_head_ignored": (
        ("attention_backward_key_value",),
        "(mask_head_stride != 0 ? (gid.y * H_Hk_ratio + member) : 0)",
        "(mask_head_stride != 0 ? (gid.y * H_Hk_ratio) : 0)",
    ),
}


@pytest.mark.parametrize("name", MUTATIONS)
def test_wrong_variant_fails(name):
    case, kind = MUTANT
    kernels = MUTATIONS[name][0]
    call = case.call(mask=kind, mask_shape="BHLS")
    import torch

    inputs = execute.random_inputs(call, seed=3)
    inputs["mask"] = inputs["kernel_mask"] = holes(call, torch.Generator().manual_seed(3))
    seen = set()
    with engine_setup.engine_required():
        record = encode.encode(call, check_refusal=False)
    try:
        execution = execute.execute(record, inputs, edit=engine_setup.mutated([MUTATIONS[name]], seen))
        comparison = execute.compare(execution, execute.reference(call, inputs), execute.tolerances(call))
        failed = not comparison.ok
    except (metal.MetalExecutionError, execute.ReplayError):
        failed = True
    assert seen == set(kernels)
    assert failed, "the wrong variant passed"
