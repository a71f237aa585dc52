"""The coverage table (what dispatches, what falls back) against the dispatcher itself, and
the README's copy of it against coverage_table()."""

import pytest
import torch

import metal_flash_sdpa
from conftest import REPO
from metal_flash_sdpa import ReferenceKernel, kernels
from metal_flash_sdpa.coverage import coverage_table, readme_table
from metal_flash_sdpa.kernels.mfa import MFAKernel
from metal_flash_sdpa.patterns import MPS_SIZES, PATTERNS, Maker


class MFARulesOnCpu(MFAKernel):
    """MFAKernel's supports() and limits, registrable on any machine (never run: explain only)."""

    def available(self):
        return None


def parse(table):
    """{row label: [cells]} of a Markdown table."""
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.parametrize("kernel_class", [ReferenceKernel, MFARulesOnCpu], ids=["reference", "mfa"])
def test_table_says_what_the_dispatcher_does(restore_state, kernel_class):
    """Each pattern row, built as real tensors on the CPU, dispatches (explain() is None)
    exactly when the table says yes, and otherwise for the reason the table gives."""
    kernel = kernel_class()
    rows = parse(coverage_table((kernel,)))
    kernels.register_kernel("cpu", kernel)
    metal_flash_sdpa.enable()
    metal_flash_sdpa.MIN_SEQ_LEN = 0
    for pattern in PATTERNS:
        q, k, v, kwargs = pattern.build(MPS_SIZES, Maker(torch.float16, "cpu"))
        forward, with_backward = rows[f"float16, {pattern.name}"][:2]
        for cell, grad in ((forward, False), (with_backward, True)):
            inputs = [t.requires_grad_(grad) for t in (q, k, v)]
            reason = metal_flash_sdpa.explain(*inputs, **kwargs)
            assert cell == ("yes" if reason is None else f"no: {reason}"), (pattern.name, grad)


def test_table_rows():
    rows = parse(coverage_table())
    assert all(cells[:2] == ["yes", "yes"] for cells in rows.values())  # the reference kernel serves every row
    mfa_yes = {label for label, cells in rows.items() if cells[2] == "yes"}
    assert mfa_yes == {
        "float32, no mask",
        "float16, no mask",
        "bfloat16, no mask",
        "float16, head dim 32",
        "float16, head dim 128",
        "float16, head dim 256",
        "float16, head dim 384",
        "float16, head dim 512",  # patch 0016
        "float16, MLA: head dim 192, value head dim 128, GQA, causal",  # padded: kernels/value_dim.py
        "float16, value dim != head dim",
        "bfloat16, 1 x 32 heads (8 KV) x 131072 tokens, head dim 128, causal",
        "float16, no mask, long sequence",
        "float16, 3-D input [H, L, D]",
        "float16, GQA, no mask",
        "float16, causal, Sq == Sk",
        "float16, causal, Sq < Sk",
        "float16, GQA, causal",
        "float16, bool mask [L, S]",
        "float16, additive mask [B, 1, L, S]",
        "float16, causal+padding bool mask [B, 1, L, S]",
        "float16, GQA, per-head ALiBi mask [1, H, L, S]",
        "float16, learned additive bias [1, H, L, S] (requires grad)",  # its forward
        "float16, attention dropout 0.1",  # patch 0015
        "float16, causal, attention dropout 0.1",
    }
    assert rows["bfloat16, 1 x 32 heads (8 KV) x 131072 tokens, head dim 128, causal"][3] == "yes"  # sliced
    learned = rows["float16, learned additive bias [1, H, L, S] (requires grad)"]
    assert learned[2:4] == ["yes", "yes"]  # patch 0017
    for dropout in ("float16, attention dropout 0.1", "float16, causal, attention dropout 0.1"):
        assert rows[dropout][2:4] == ["yes", "yes"]  # patch 0015, forward and backward
    # the rung column names how far the kernels of a served row were verified, and only there
    rung = {label: cells[4] for label, cells in rows.items()}
    assert {label for label, cell in rung.items() if cell != "-"} == mfa_yes
    assert rung["float32, no mask"] == "rung 4: executed on CPU against PyTorch; not run on a Mac"


def test_readme_table_is_coverage_table():
    readme = (REPO / "README.md").read_text()
    table = readme_table(readme)
    if table is None:
        pytest.skip("README.md has no coverage-table markers yet")
    assert table == coverage_table(), "regenerate with: python -m metal_flash_sdpa.coverage"
