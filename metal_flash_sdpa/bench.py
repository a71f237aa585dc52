"""``python -m metal_flash_sdpa bench``: the kernel against PyTorch's own SDPA, same device.

For each dtype and sequence length: forward time (under ``no_grad``) and forward+backward
time, median of ``iters`` runs after warm-up, with the device synchronised around each run;
the kernel runs with the patch on, the baseline inside ``metal_flash_sdpa.disabled()``.
A call the kernel does not serve is reported as falling back, with the reason, never timed
as if it were the kernel's. On mps, the peak memory of each is the growth of the Metal
driver's allocation over one forward+backward, measured after ``torch.mps.empty_cache()``;
on cpu no honest per-call peak is available, so it is reported as n/a.
"""

import json
import statistics
import sys
import time

import torch

import metal_flash_sdpa

from . import kernels
from .check import dtype_name, serving

MPS_DEFAULTS = dict(
    dtypes=(torch.float16, torch.bfloat16, torch.float32), seq_lens=(256, 512, 1024, 2048, 4096, 8192), heads=8, iters=10
)
CPU_DEFAULTS = dict(dtypes=(torch.float32,), seq_lens=(128, 256), heads=4, iters=3)
SMOKE_NOTE = (
    "SMOKE RUN on cpu with the pure-PyTorch ReferenceKernel: these numbers show that the benchmark "
    "runs; they are NOT a speed claim (the reference kernel is not built for speed)."
)


def _sync(device):
    if device.type == "mps":
        torch.mps.synchronize()


def _median_ms(fn, device, iters, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _peak_bytes(fn, device):
    """Growth of the MPS driver allocation over one run of ``fn`` (the caching allocator
    keeps what it grew to until empty_cache), or None off mps."""
    if device.type != "mps":
        return None
    _sync(device)
    torch.mps.empty_cache()
    before = torch.mps.driver_allocated_memory()
    fn()
    _sync(device)
    return torch.mps.driver_allocated_memory() - before


def _is_oom(error):
    return "out of memory" in str(error).lower()


def _measure(run, device, iters, count_dispatches):
    """-> dict(ms=..., peak_bytes=...) or dict(error=...)."""
    try:
        before = metal_flash_sdpa.get_dispatch_count()
        ms = _median_ms(run, device, iters)
        peak = _peak_bytes(run, device)
        dispatched = metal_flash_sdpa.get_dispatch_count() - before
    except RuntimeError as error:
        if device.type == "mps":
            torch.mps.empty_cache()
        return dict(error="out of memory" if _is_oom(error) else f"{type(error).__name__}: {error}")
    runs = iters + 2 + (device.type == "mps")
    if count_dispatches and dispatched != runs:
        return dict(error=f"{dispatched} of {runs} runs reached the kernel")
    if not count_dispatches and dispatched:
        return dict(error=f"{dispatched} baseline runs reached the kernel")
    return dict(ms=ms, peak_bytes=peak)


def bench_case(device, dtype, seq_len, causal, shape, iters):
    """One row: forward and forward+backward, kernel and PyTorch."""
    batch, heads, head_dim = shape
    gen = torch.Generator().manual_seed(seq_len)
    q, k, v = (torch.randn(batch, heads, seq_len, head_dim, generator=gen).to(device, dtype) for _ in range(3))
    grad_out = torch.randn(batch, heads, seq_len, head_dim, generator=gen).to(device, dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    row = dict(dtype=dtype_name(dtype), seq_len=seq_len, causal=causal)

    def forward():
        with torch.no_grad():
            sdpa(q, k, v, is_causal=causal)

    leaves = [t.requires_grad_() for t in (q.clone(), k.clone(), v.clone())]

    def forward_backward():
        torch.autograd.grad(sdpa(*leaves, is_causal=causal), leaves, grad_out)

    parts = (("forward", forward, (q, k, v), False), ("forward_backward", forward_backward, leaves, True))
    for label, run, inputs, grad in parts:
        with torch.set_grad_enabled(grad):
            reason = metal_flash_sdpa.explain(*inputs, is_causal=causal)
        result = dict(kernel_falls_back=reason)
        if reason is None:
            result["kernel"] = _measure(run, device, iters, count_dispatches=True)
        with metal_flash_sdpa.disabled():
            result["pytorch"] = _measure(run, device, iters, count_dispatches=False)
        ours, theirs = result.get("kernel", {}).get("ms"), result["pytorch"].get("ms")
        result["speedup"] = theirs / ours if ours and theirs else None
        row[label] = result
    return row


def _cell_ms(result, key):
    part = result.get(key)
    if part is None:
        return "falls back"
    return f"{part['ms']:.3f}" if "ms" in part else part["error"][:12]


def _cell_mib(part):
    if part is None or "ms" not in part:
        return "-"
    return "n/a" if part["peak_bytes"] is None else f"{part['peak_bytes'] / 2**20:.0f}"


def format_table(rows):
    header = (
        f"{'dtype':9} {'seq':>6} {'causal':6} | {'fwd ms':>10} {'torch':>10} {'x':>6} | "
        f"{'fwd+bwd ms':>10} {'torch':>10} {'x':>6} | {'peak MiB':>8} {'torch':>8}"
    )
    lines = [header, "-" * len(header)]
    reasons = {}
    for row in rows:
        cells = []
        for label in ("forward", "forward_backward"):
            result = row[label]
            x = f"{result['speedup']:.2f}" if result["speedup"] else "-"
            cells.append(f"{_cell_ms(result, 'kernel'):>10} {_cell_ms(result, 'pytorch'):>10} {x:>6}")
            if result["kernel_falls_back"]:
                reasons[result["kernel_falls_back"]] = True
        fb = row["forward_backward"]
        lines.append(
            f"{row['dtype']:9} {row['seq_len']:>6} {'yes' if row['causal'] else 'no':6} | {cells[0]} | {cells[1]} | "
            f"{_cell_mib(fb.get('kernel')):>8} {_cell_mib(fb['pytorch']):>8}"
        )
    lines.append("x = PyTorch's time / the kernel's time; peak = forward+backward")
    lines += [f"falls back: {reason}" for reason in reasons]
    return "\n".join(lines)


def _progress(done, total, text):
    if sys.stderr.isatty():
        sys.stderr.write(f"\rbench [{done}/{total}] {text:40}")
        if done == total:
            sys.stderr.write("\n")
    else:
        sys.stderr.write(f"bench [{done}/{total}] {text}\n")
    sys.stderr.flush()


def main(args) -> int:
    device = torch.device(args.device)
    smoke = device.type == "cpu"
    defaults = CPU_DEFAULTS if smoke else MPS_DEFAULTS
    if smoke:
        kernel = metal_flash_sdpa.ReferenceKernel()
    else:
        kernel = kernels.registered_kernels().get(device.type)
        if kernel is None:
            reason = kernels.no_kernel_reason(device.type)
            message = f"bench: no kernel for {device.type} on this machine ({reason}); nothing to measure"
            print(json.dumps(dict(device=device.type, kernel=None, reason=reason, results=[])) if args.json else message)
            if not args.json:
                print("bench: `--device cpu` runs a smoke run of the reference kernel (not a speed claim)")
            return 0
    dtypes = args.dtypes or defaults["dtypes"]
    seq_lens = args.seq_lens or defaults["seq_lens"]
    shape = (args.batch, args.heads or defaults["heads"], args.head_dim)
    iters = args.iters or defaults["iters"]
    flags = (False, True) if args.causal else (False,)
    cases = [(dtype, seq_len, causal) for dtype in dtypes for seq_len in seq_lens for causal in flags]
    if not args.causal:
        short = [s for s in seq_lens if s <= 2048] or [min(seq_lens)]
        cases += [(d, max(short), True) for d in dtypes]
    rows = []
    with serving(device.type, kernel):
        for number, (dtype, seq_len, causal) in enumerate(cases, 1):
            _progress(number, len(cases), f"{dtype_name(dtype)} seq {seq_len}{' causal' if causal else ''}")
            rows.append(bench_case(device, dtype, seq_len, causal, shape, iters))
    metal_flash_sdpa.reset_dispatch_count()
    info = dict(
        device=device.type,
        kernel=kernel.name,
        smoke_run_not_a_speed_claim=smoke,
        torch=torch.__version__,
        batch=shape[0],
        heads=shape[1],
        head_dim=shape[2],
        iters=iters,
    )
    if args.json:
        print(json.dumps(dict(info, results=rows), indent=1))
        return 0
    if smoke:
        print(SMOKE_NOTE)
    print(
        f"bench on {device.type}: kernel {kernel.name} vs PyTorch's SDPA, torch {torch.__version__}, "
        f"batch {shape[0]}, heads {shape[1]}, head dim {shape[2]}, median of {iters}"
    )
    print(format_table(rows))
    return 0
