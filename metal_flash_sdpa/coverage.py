"""What each kernel serves, as a Markdown table built from its own ``supports()``.

Rows are representative calls (the dtypes, head dims, and the patterns the CLI checks, on
the ``meta`` device: shapes only); each cell is what the kernel's ``supports()`` says for
the forward alone and with a backward, and, for a kernel that declares ``verified_rung``,
how far the kernels serving the row were verified. Pure Python: it runs on any machine,
native bridge or not. The README's table is this function's output (``tests/test_coverage.py``).
"""

import torch

from . import rules
from .kernels.base import Call
from .kernels.mfa import MFAKernel
from .kernels.reference import ReferenceKernel
from .patterns import MPS_SIZES, PATTERNS, Maker

START = "<!-- coverage-table:start -->"
END = "<!-- coverage-table:end -->"


def _plain(dtype, head_dim=64, length=1024):
    return Call(dtype, 2, 8, 8, length, length, head_dim, head_dim, False, None, False, False)


def representative_calls():
    """(label, Call without grad) for every row, in order."""
    rows = [(f"{str(d).replace('torch.', '')}, no mask", _plain(d)) for d in (torch.float32, torch.float16, torch.bfloat16)]
    rows += [(f"float16, head dim {d}", _plain(torch.float16, d)) for d in (32, 128, 256, 384, 100, 512, 520)]
    mla = _plain(torch.float16, 192)._replace(value_dim=128, kv_heads=2, causal=True)
    rows.append(("float16, MLA: head dim 192, value head dim 128, GQA, causal", mla))
    # long context: sliced so that ccv's scratch stays bounded (patch 0011)
    huge = Call(torch.bfloat16, 1, 32, 8, 131072, 131072, 128, 128, True, None, False, False)
    rows.append(("bfloat16, 1 x 32 heads (8 KV) x 131072 tokens, head dim 128, causal", huge))
    learned = _plain(torch.float16)._replace(mask="additive", mask_per_head=True, mask_grad=True)
    rows.append(("float16, learned additive bias [1, H, L, S] (requires grad)", learned))
    rows.append(("float16, attention dropout 0.1", _plain(torch.float16)._replace(dropout_p=0.1)))
    rows.append(("float16, causal, attention dropout 0.1", _plain(torch.float16)._replace(causal=True, dropout_p=0.1)))
    for pattern in PATTERNS:
        q, k, v, kwargs = pattern.build(MPS_SIZES, Maker(torch.float16, "meta"))
        mask, causal = kwargs.get("attn_mask"), kwargs.get("is_causal", False)
        call = rules.describe(q.shape, k.shape, v.shape, q.dtype, mask, causal, False)
        rows.append((f"float16, {pattern.name}", call))
    return rows


# The rungs of DESIGN section 10's verification ladder, as the table names them.
RUNGS = {
    1: "rung 1: patches apply",
    2: "rung 2: source emitted",
    3: "rung 3: source checked",
    4: "rung 4: executed on CPU against PyTorch; not run on a Mac",
    5: "rung 5: run on a Mac",
}


def _cell(kernel, call):
    reason = kernel.supports(call)
    return "yes" if reason is None else f"no: {reason}"


def _rung_cell(kernel, call):
    served = kernel.supports(call) is None or kernel.supports(call._replace(needs_grad=True)) is None
    return RUNGS[kernel.verified_rung[call.dtype]] if served else "-"


def _rungs(kernel):
    return getattr(kernel, "verified_rung", None)


def coverage_table(kernels=None) -> str:
    """Markdown table: one row per representative call, forward and forward+backward per kernel."""
    kernels = kernels or (ReferenceKernel(), MFAKernel())
    header = ["call"]
    for k in kernels:
        header += [f"{k.name} forward", f"{k.name} with backward"] + ([f"{k.name} verified"] if _rungs(k) else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, call in representative_calls():
        cells = [label]
        for kernel in kernels:
            cells += [_cell(kernel, call), _cell(kernel, call._replace(needs_grad=True))]
            cells += [_rung_cell(kernel, call)] if _rungs(kernel) else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_table(text: str):
    """The table between the coverage markers of ``text``, or None if it has no markers."""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip()


if __name__ == "__main__":
    print(START)
    print(coverage_table())
    print(END)
