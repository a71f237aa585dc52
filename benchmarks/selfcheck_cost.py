"""One-time cost of the first-use self-check per kernel variant, for the reference kernel
on the CPU (metal_flash_sdpa.trust; the MFA kernel's cost on a Mac is not measured here).

For each variant: the first patched SDPA call (the check, then the call) against the same
call once the variant is known (the fastest of three), without and with grad; the difference
is what the check cost. The first check of a process also pays imports: shown apart.
Verdicts go to a temporary MFA_CACHE_DIR, not the user's.

Run: python benchmarks/selfcheck_cost.py [--threads N]
"""

import argparse
import os
import tempfile
import time

import torch
import torch.nn.functional as F

import metal_flash_sdpa
from metal_flash_sdpa import kernels, trust

VARIANTS = [  # dtype, q heads, kv heads, head dim, causal, mask ("none", "broadcast", "per-head")
    (torch.float32, 8, 8, 64, False, "none"),
    (torch.float32, 8, 8, 64, True, "none"),
    (torch.float16, 8, 8, 64, False, "none"),
    (torch.bfloat16, 8, 8, 64, False, "none"),
    (torch.bfloat16, 32, 8, 128, True, "none"),
    (torch.float16, 8, 8, 64, False, "broadcast"),
    (torch.float16, 8, 8, 128, False, "per-head"),
]
LENGTH = 512  # the user's call; the canary is at most 67 x 149 (trust.CANARY_LENGTHS)


def inputs(dtype, q_heads, kv_heads, head_dim, mask_kind, grad):
    q = torch.randn(1, q_heads, LENGTH, head_dim, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(1, kv_heads, LENGTH, head_dim, dtype=dtype, requires_grad=grad) for _ in "kv")
    mask = None if mask_kind == "none" else torch.rand(1, q_heads if mask_kind == "per-head" else 1, LENGTH, LENGTH) > 0.2
    return q, k, v, mask


def call(q, k, v, mask, causal, grad):
    start = time.perf_counter()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
    if grad:
        out.sum().backward()
    return time.perf_counter() - start


def first_and_later(dtype, q_heads, kv_heads, head_dim, causal, mask_kind, grad):
    """-> (first call s, later call s, variants checked)."""
    before = set(trust._known)
    first = call(*inputs(dtype, q_heads, kv_heads, head_dim, mask_kind, grad), causal, grad)
    later = min(call(*inputs(dtype, q_heads, kv_heads, head_dim, mask_kind, grad), causal, grad) for _ in range(3))
    new = [key for key in trust._known if key not in before]
    assert all(trust._known[key] is None for key in new), "a variant failed its self-check"
    return first, later, len(new)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    torch.set_num_threads(parser.parse_args().threads)
    os.environ["MFA_CACHE_DIR"] = tempfile.mkdtemp()
    trust.mode = "always"
    kernels.register_kernel("cpu", metal_flash_sdpa.ReferenceKernel())
    metal_flash_sdpa.enable()
    metal_flash_sdpa.MIN_SEQ_LEN = 0

    start = time.perf_counter()
    call(*inputs(torch.float32, 2, 2, 16, "none", True), False, True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), reference kernel on cpu, calls [1, H, {LENGTH}, D]")
    print(f"first self-checks of the process (forward and backward, with imports): {time.perf_counter() - start:.3f} s")
    print(f"{'variant':<46}{'grad':>6}{'first call s':>14}{'later call s':>14}{'check s':>10}")
    for dtype, q_heads, kv_heads, head_dim, causal, mask_kind in VARIANTS:
        name = f"{str(dtype)[6:]} Hq={q_heads} Hk={kv_heads} D={head_dim}{' causal' if causal else ''} mask={mask_kind}"
        for grad in (False, True):
            trust.forget()  # as a new process would, with MFA_SELFCHECK=always
            first, later, checks = first_and_later(dtype, q_heads, kv_heads, head_dim, causal, mask_kind, grad)
            print(f"{name:<46}{'yes' if grad else 'no':>6}{first:>14.4f}{later:>14.4f}{first - later:>10.4f}  ({checks} checks)")


if __name__ == "__main__":
    main()
