"""Eager per-call overhead of the patched SDPA, as ratios measured in one run.

- fallback path: patched SDPA on a call no kernel serves, against PyTorch's SDPA called
  directly (budget: under 1 us added);
- dispatched path: patched SDPA sending the call to a no-op kernel, against calling that
  kernel directly (budget: at most 10 us added), with and without autograd.

Run: python benchmarks/dispatch_overhead.py [--calls N]
"""

import argparse
import os
import statistics
import tempfile
import timeit

import torch
import torch.nn.functional as F

import metal_flash_sdpa
from metal_flash_sdpa import kernels, patch
from metal_flash_sdpa.kernels.reference import ReferenceKernel


class NoOpKernel(ReferenceKernel):
    """Returns preallocated outputs: measures everything but the arithmetic. While
    ``computing`` (the self-check of the first calls) it is the reference kernel."""

    name = "no-op"
    computing = False

    def __init__(self, out, lse, grads):
        super().__init__()
        self.out, self.lse, self.grads = out, lse, grads

    def forward(self, q, k, v, scale, causal, mask):
        if self.computing:
            return super().forward(q, k, v, scale, causal, mask)
        return self.out, self.lse

    def backward(self, grad_out, q, k, v, out, lse, scale, causal, mask):
        if self.computing:
            return super().backward(grad_out, q, k, v, out, lse, scale, causal, mask)
        return self.grads


def per_call_us(fn, calls, repeats=7):
    fn()
    times = timeit.repeat(fn, number=calls, repeat=repeats)
    return statistics.median(times) / calls * 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    calls = parser.parse_args().calls
    torch.set_num_threads(1)
    os.environ["MFA_CACHE_DIR"] = tempfile.mkdtemp()  # the no-op kernel's verdicts: not in the user's cache

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    original = F.scaled_dot_product_attention
    patch.enable()
    metal_flash_sdpa.MIN_SEQ_LEN = 0
    patched = F.scaled_dot_product_attention

    kernels.register_kernel("cpu", None)
    direct = per_call_us(lambda: original(q, k, v), calls)
    fallback = per_call_us(lambda: patched(q, k, v), calls)

    noop = NoOpKernel(torch.empty(1, 2, 8, 16), torch.empty(1, 2, 8), (q.clone(), k.clone(), v.clone()))
    kernels.register_kernel("cpu", noop)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    noop.computing = True  # the first calls' self-checks pass: the variants are trusted
    patched(q, k, v)
    patched(qg, kg, vg).sum().backward()
    noop.computing = False
    metal_flash_sdpa.reset_dispatch_count()
    kernel_direct = per_call_us(lambda: noop.forward(q, k, v, 0.25, False, None), calls)
    dispatched = per_call_us(lambda: patched(q, k, v), calls)
    dispatched_grad = per_call_us(lambda: patched(qg, kg, vg), calls)
    assert not metal_flash_sdpa.fallback_counts(), f"not the dispatched path: {metal_flash_sdpa.fallback_counts()}"
    kernels.register_kernel("cpu", None)
    patch.disable()

    print(f"torch {torch.__version__}, {calls} calls per sample, median of 7, tensors [1, 2, 8, 16] fp32 on cpu")
    print(f"{'path':<44}{'us/call':>10}{'added us':>10}{'ratio':>8}")
    rows = [
        ("PyTorch SDPA, direct", direct, direct),
        ("patched SDPA, fallback (no kernel)", fallback, direct),
        ("no-op kernel forward, direct", kernel_direct, kernel_direct),
        ("patched SDPA -> no-op kernel", dispatched, kernel_direct),
        ("patched SDPA -> no-op kernel, requires_grad", dispatched_grad, kernel_direct),
    ]
    for name, value, base in rows:
        print(f"{name:<44}{value:>10.2f}{value - base:>10.2f}{value / base:>8.2f}")


if __name__ == "__main__":
    main()
