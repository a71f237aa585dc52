"""``python -m metal_flash_sdpa check``: the device's kernel against PyTorch's math SDPA.

Every pattern of ``patterns.PATTERNS`` runs through the patched SDPA and through PyTorch's
math backend (patch scoped off) on the same inputs, forward and backward; the errors are
judged by the tolerances the kernel promises (``kernel.tolerances``). A result outside
them still passes when it is no further from a float64 computation than twice PyTorch's
own error (half types round differently, not worse). Patterns the kernel's ``supports()``
refuses are listed as falling back, not as errors; a checked call that did not reach the
kernel is a miss.
"""

import contextlib
import sys
from typing import List, NamedTuple, Optional

import torch

import metal_flash_sdpa

from . import kernels, patch, rules
from .patterns import CPU_SIZES, MPS_SIZES, PATTERNS, Maker

DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp64": torch.float64,
    "float64": torch.float64,
}
DEFAULT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtypes(values) -> tuple:
    """``["fp16", "bf16,fp32"]`` -> dtypes; raises ValueError naming an unknown one."""
    dtypes = []
    for value in values:
        for name in filter(None, value.split(",")):
            if name.strip().lower() not in DTYPE_NAMES:
                raise ValueError(f"unknown dtype {name!r} (use {', '.join(sorted(DTYPE_NAMES))})")
            dtype = DTYPE_NAMES[name.strip().lower()]
            if dtype not in dtypes:
                dtypes.append(dtype)
    return tuple(dtypes)


class Result(NamedTuple):
    dtype: torch.dtype
    pattern: str
    status: str  # "ok", "miss" or "falls back"
    mode: str = ""  # "forward+backward" or "forward"
    detail: str = ""  # the fallback reason, or what missed
    max_abs: float = 0.0
    max_rel: float = 0.0
    worst: str = ""  # which of out, dq, dk, dv had the largest error


@contextlib.contextmanager
def serving(device_type: str, kernel):
    """The patch on, ``kernel`` serving ``device_type``, every length dispatching, the
    self-check off (this check reports what the kernel computes); all restored afterwards."""
    from . import trust

    was_enabled = patch.is_enabled()
    selfcheck = trust.mode
    previous = kernels.registered_kernels().get(device_type)
    min_seq_len = metal_flash_sdpa.MIN_SEQ_LEN
    if previous is not kernel:
        kernels.register_kernel(device_type, kernel)
    patch.enable()
    metal_flash_sdpa.MIN_SEQ_LEN = 0
    trust.mode = "off"
    try:
        yield
    finally:
        trust.mode = selfcheck
        metal_flash_sdpa.MIN_SEQ_LEN = min_seq_len
        if not was_enabled:
            patch.disable()
        if previous is not kernel:
            kernels.register_kernel(device_type, previous)


def pytorch_math_sdpa(*args, **kwargs):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with metal_flash_sdpa.disabled(), sdpa_kernel(SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(*args, **kwargs)


def _run(sdpa, inputs, kwargs, grad_out):
    out = sdpa(*inputs, **kwargs)
    if grad_out is None:
        return [out.detach()]
    return [out.detach(), *torch.autograd.grad(out, inputs, grad_out)]


def _fallback(kernel, q, k, v, kwargs):
    """-> (reason the call would not reach ``kernel`` or None, whether that reason is the
    kernel's own ``supports()`` answer rather than the dispatcher refusing what it serves)."""
    reason = metal_flash_sdpa.explain(q, k, v, **kwargs)
    if reason is None:
        return None, True
    needs_grad = torch.is_grad_enabled() and q.requires_grad
    causal = kwargs.get("is_causal", False)
    call = rules.describe(q.shape, k.shape, v.shape, q.dtype, kwargs.get("attn_mask"), causal, needs_grad)
    return reason, kernel.supports(call) == reason


def check_pattern(kernel, device, dtype, pattern, sizes, seed=0) -> Result:
    """One pattern in one dtype on ``device`` (the patch on, ``kernel`` serving it)."""
    maker = Maker(dtype, device, seed)
    q, k, v, kwargs = pattern.build(sizes, maker)
    inputs = [t.requires_grad_() for t in (q, k, v)]
    mode, grad_out = "forward+backward", None
    reason, kernels_own = _fallback(kernel, *inputs, kwargs)
    if reason is not None:
        with torch.no_grad():
            forward_reason, forward_kernels_own = _fallback(kernel, *inputs, kwargs)
        if forward_reason is not None:
            if not forward_kernels_own:
                detail = f"falls back for a reason not the kernel's: {forward_reason}"
                return Result(dtype, pattern.name, "miss", detail=detail)
            return Result(dtype, pattern.name, "falls back", detail=forward_reason)
        if not kernels_own:
            detail = f"with grad, falls back for a reason not the kernel's: {reason}"
            return Result(dtype, pattern.name, "miss", detail=detail)
        mode, inputs = f"forward (with grad falls back: {reason})", [t.detach() for t in inputs]
    else:
        grad_out = maker.randn(*q.shape[:-1], v.shape[-1])

    metal_flash_sdpa.reset_dispatch_count()
    ours = _run(torch.nn.functional.scaled_dot_product_attention, inputs, kwargs, grad_out)
    dispatched = metal_flash_sdpa.get_dispatch_count()
    if dispatched != 1:
        fallbacks = metal_flash_sdpa.fallback_counts()
        detail = f"{dispatched} calls reached the kernel, not 1 (fallbacks: {fallbacks})"
        return Result(dtype, pattern.name, "miss", mode, detail)
    theirs = _run(pytorch_math_sdpa, inputs, kwargs, grad_out)
    gold_inputs = [t.detach().cpu().double().requires_grad_(t.requires_grad) for t in inputs]
    gold_kwargs = {key: _float64(value) for key, value in kwargs.items()}
    gold = _run(pytorch_math_sdpa, gold_inputs, gold_kwargs, None if grad_out is None else grad_out.cpu().double())
    return _judge(kernel.tolerances[dtype], dtype, pattern.name, mode, ours, theirs, gold)


def _float64(value):
    """A float tensor as float64 on the CPU, a bool tensor on the CPU, anything else as is."""
    if not isinstance(value, torch.Tensor):
        return value
    return value.cpu().double() if value.is_floating_point() else value.cpu()


def compare(ours, theirs, gold, atol, rtol) -> Optional[str]:
    """None when ``ours`` passes against ``theirs`` (PyTorch's result, same dtype): within
    (atol, rtol) of it, or no further from ``gold`` (float64) than twice PyTorch's own error
    plus atol (half types round differently); else what is wrong. Tensors in float64."""
    if ours.shape != theirs.shape or (ours.isnan() != theirs.isnan()).any():
        return "shape or NaNs differ from PyTorch"
    if torch.isclose(ours, theirs, atol=atol, rtol=rtol, equal_nan=True).all():
        return None
    ours_error, their_error = (ours - gold).abs().max().item(), (theirs - gold).abs().max().item()
    if ours_error <= 2 * their_error + atol:
        return None
    return f"max |ours - float64| {ours_error:.3g} > 2 * max |pytorch - float64| {their_error:.3g} + atol"


def _judge(tolerance, dtype, name, mode, ours, theirs, gold) -> Result:
    atol, rtol = tolerance
    max_abs, max_rel, worst, misses = 0.0, 0.0, "", []
    for label, a, b, g in zip(("out", "dq", "dk", "dv", "dmask"), ours, theirs, gold):
        a, b = a.cpu().double(), b.cpu().double()
        error = (a - b).abs().max().item() if a.numel() else 0.0
        scale = b.abs().max().item() if b.numel() else 0.0
        if error != error or error >= max_abs:  # NaN counts as the worst
            max_abs, worst = error, label
        max_rel = max(max_rel, error / scale if scale else error)
        miss = compare(a, b, g, atol, rtol)
        if miss is not None:
            misses.append(f"{label}: {miss}")
    status = "miss" if misses else "ok"
    return Result(dtype, name, status, mode, "; ".join(misses), max_abs, max_rel, worst)


def run_check(kernel, device, dtypes=DEFAULT_DTYPES, sizes=None, stream=None, seed=0) -> List[Result]:
    """Check every pattern in every dtype with ``kernel`` serving ``device``'s type; print
    one line per result to ``stream`` (if given); return the results."""
    device = torch.device(device)
    sizes = sizes or (CPU_SIZES if device.type == "cpu" else MPS_SIZES)
    results = []
    with serving(device.type, kernel):
        for dtype in dtypes:
            try:
                torch.zeros(1, dtype=dtype, device=device)
            except (RuntimeError, TypeError) as error:  # e.g. bfloat16 on an older macOS
                if stream is not None:
                    print(f"  {dtype_name(dtype):9} skipped: not usable on {device.type}: {error}", file=stream)
                continue
            for number, pattern in enumerate(PATTERNS):
                if dtype not in kernel.tolerances and dtype in kernel.dtypes:
                    result = Result(dtype, pattern.name, "miss", detail=f"{kernel.name} promises no tolerance for this dtype")
                else:
                    try:
                        result = check_pattern(kernel, device, dtype, pattern, sizes, seed + number)
                    except Exception as error:  # reported as a miss; the other patterns still run
                        result = Result(dtype, pattern.name, "miss", detail=f"raised {type(error).__name__}: {error}")
                results.append(result)
                if stream is not None:
                    print(format_result(result, kernel), file=stream, flush=True)
        metal_flash_sdpa.reset_dispatch_count()
    return results


def format_result(r: Result, kernel) -> str:
    head = f"  {dtype_name(r.dtype):9} {r.pattern:38}"
    if r.status == "falls back":
        return f"{head} falls back: {r.detail}"
    if r.status == "miss" and not r.mode:
        return f"{head} MISS: {r.detail}"
    atol, rtol = kernel.tolerances.get(r.dtype, (float("nan"), float("nan")))
    line = (
        f"{head} {'ok  ' if r.status == 'ok' else 'MISS'} max abs {r.max_abs:8.2e} ({r.worst:3})"
        f"  max rel {r.max_rel:8.2e}  tolerance atol {atol:.0e} rtol {rtol:.0e}"
    )
    if r.mode != "forward+backward":
        line += f"  [{r.mode}]"
    return line + (f"\n      {r.detail}" if r.detail else "")


def report(kernel, device, dtypes=DEFAULT_DTYPES, seed=0, stream=None, sizes=None) -> int:
    """Check ``kernel`` on ``device``, print the results and a summary to ``stream``
    (stdout by default); -> 1 if anything missed, else 0."""
    import time

    stream = stream or sys.stdout
    print(
        f"  against PyTorch's math SDPA (torch {torch.__version__}), forward and backward (out, dq, dk, dv),"
        f" seed {seed}; max rel = max |ours - pytorch| / max |pytorch|",
        file=stream,
    )
    start = time.perf_counter()
    results = run_check(kernel, device, dtypes, sizes=sizes, stream=stream, seed=seed)
    counts = {status: sum(r.status == status for r in results) for status in ("ok", "falls back", "miss")}
    print(
        f"{counts['ok']} within tolerance, {counts['falls back']} fall back to PyTorch, {counts['miss']} missed"
        f" ({time.perf_counter() - start:.1f} s)",
        file=stream,
    )
    return 1 if counts["miss"] else 0


def main(args) -> int:
    """0: every dispatched pattern within tolerance; 1: a miss; 2: no kernel to check."""
    device_type = args.device or ("mps" if "mps" in kernels.registered_kernels() else "cpu")
    if device_type == "cpu":
        kernel = metal_flash_sdpa.ReferenceKernel()
        note = "ReferenceKernel (pure PyTorch), registered for cpu for this run"
        if "mps" not in kernels.registered_kernels():
            note += f"; no MFA kernel on this machine: {kernels.unavailable.get('mps', 'not registered')}"
    else:
        kernel = kernels.registered_kernels().get(device_type)
        if kernel is None:
            reason = kernels.no_kernel_reason(device_type)
            print(f"check: no kernel for {device_type} on this machine: {reason}")
            print("check: nothing was checked (try --device cpu for the reference kernel)")
            return 2
        note = f"{kernel.name} ({type(kernel).__name__})"
    print(f"check on {device_type}: kernel {note}")
    return report(kernel, device_type, args.dtypes or DEFAULT_DTYPES, args.seed)
