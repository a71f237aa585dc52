"""``python -m metal_flash_sdpa [status|check|bench]``: argument parsing and the status report.

The status report says what this machine has (versions, platform, MPS, the MFA bridge or
why it did not load), how the package is configured and whether the patch is active, then
runs a few SDPA calls of the common patterns and shows which reached a kernel and why the
others fell back, and lists the self-check's verdicts on this machine.
"""

import argparse
import platform
import sys

import metal_flash_sdpa


def _dtypes(value):
    from .check import parse_dtypes

    try:
        return parse_dtypes([value])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


def _seq_lens(value):
    try:
        lengths = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}")
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive lengths, got {value!r}")
    return lengths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m metal_flash_sdpa",
        description="Status of metal-flash-sdpa on this machine (no subcommand), or check / bench a kernel.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{status,check,bench}")
    commands.add_parser("status", help="the status report (the default)")

    check = commands.add_parser(
        "check",
        help="the device's kernel against PyTorch's math SDPA, forward and backward",
        description="Run the common attention patterns through the device's kernel and through PyTorch's math "
        "SDPA; print the errors against the tolerances the kernel promises. Exit 0 when every dispatched "
        "pattern is within them, 1 on a miss, 2 when the device has no kernel.",
    )
    check.add_argument(
        "--device",
        choices=("mps", "cpu"),
        help="mps: the MFA kernel; cpu: the pure-PyTorch ReferenceKernel, registered for the run "
        "(default: mps if its kernel is registered, else cpu)",
    )
    check.add_argument("--dtypes", type=_dtypes, help="comma-separated, e.g. fp16,bf16,fp32 (default: all three)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")

    bench = commands.add_parser(
        "bench",
        help="time the kernel against PyTorch's own SDPA on the same device",
        description="Forward and forward+backward time of the kernel (patch on) and of PyTorch's own SDPA "
        "(patch off) on the same device, and their peak memory on mps. --device cpu is a smoke run of the "
        "reference kernel, not a speed claim.",
    )
    bench.add_argument("--device", choices=("mps", "cpu"), default="mps", help="default mps")
    bench.add_argument("--dtypes", type=_dtypes, help="comma-separated (default: fp16,bf16,fp32; cpu: fp32)")
    bench.add_argument(
        "--seq-lens", type=_seq_lens, help="comma-separated (default: 256,...,8192; cpu: 128,256)"
    )
    bench.add_argument(
        "--causal",
        action="store_true",
        help="a causal row for every sequence length (default: one causal row, at the largest length <= 2048)",
    )
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--heads", type=int, default=None, help="default 8 (cpu: 4)")
    bench.add_argument("--head-dim", type=int, default=64)
    bench.add_argument("--iters", type=int, default=None, help="timed repetitions (default 10; cpu: 3)")
    bench.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    return parser


def main(argv=None) -> int:
    # torch before our other modules (parsing --dtypes imports check): its first import
    # activates the package, which it refuses to do while one of our modules is half-imported.
    import torch  # noqa: F401

    args = build_parser().parse_args(argv)
    if args.command == "check":
        from . import check

        return check.main(args)
    if args.command == "bench":
        from . import bench

        return bench.main(args)
    return status()


# ----------------------------------------------------------------------------- status


def _version(module_name):
    try:
        module = __import__(module_name)
    except ImportError as error:
        return f"not importable ({error})"
    return getattr(module, "__version__", "unknown version")


def _mps_line(torch):
    mps = torch.backends.mps
    return f"built into torch: {'yes' if mps.is_built() else 'no'}; available: {'yes' if mps.is_available() else 'no'}"


def _setting_lines():
    from . import config

    lines = []
    for name, (raw, effective) in config.settings().items():
        shown = "unset" if raw is None else repr(raw)
        lines.append(f"  {name:16} {shown:10} -> {effective}")
    return lines


def _sample_workload(torch, kernels):
    """Run the sample calls with the patch on; -> (lines, healthy)."""
    from . import patch
    from .patterns import CPU_SIZES, DECODE, MPS_SIZES, PATTERNS, Maker

    on_mps = "mps" in kernels.registered_kernels()
    device, dtype, sizes = ("mps", torch.float16, MPS_SIZES) if on_mps else ("cpu", torch.float32, CPU_SIZES)
    # long enough for the default MIN_SEQ_LEN; the decode step shows the short-query fallback
    sizes = sizes._replace(length=max(sizes.length, 256), long_length=max(sizes.long_length, 512))
    was_enabled = patch.is_enabled()
    title = f"{device}, {str(dtype).replace('torch.', '')}, forward only, MIN_SEQ_LEN={metal_flash_sdpa.MIN_SEQ_LEN}"
    lines = [f"Sample workload ({title}{'' if was_enabled else ', patch enabled for the sample'}):"]
    healthy = True
    patch.enable()
    metal_flash_sdpa.reset_dispatch_count()
    try:
        for pattern in (*PATTERNS, DECODE):
            q, k, v, kwargs = pattern.build(sizes, Maker(dtype, device))
            reason = metal_flash_sdpa.explain(q, k, v, **kwargs)
            before = metal_flash_sdpa.get_dispatch_count()
            try:
                torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
                if device == "mps":
                    torch.mps.synchronize()  # a failure in the kernel surfaces here, on its call
            except Exception as error:  # a health report reports, it does not crash
                lines.append(f"  {pattern.name:38} ERROR {type(error).__name__}: {error}")
                healthy = False
                continue
            went = metal_flash_sdpa.get_dispatch_count() - before
            if (went == 1) != (reason is None):
                healthy = False
                lines.append(f"  {pattern.name:38} INCONSISTENT: explain() said {reason!r}, dispatch count rose by {went}")
            else:
                lines.append(f"  {pattern.name:38} " + ("kernel" if reason is None else f"PyTorch: {reason}"))
        lines.append(f"get_dispatch_count() = {metal_flash_sdpa.get_dispatch_count()}")
        counts = metal_flash_sdpa.fallback_counts()
        lines.append("fallback_counts():" + (" {}" if not counts else ""))
        lines += [f"  {count:3} x {reason}" for reason, count in sorted(counts.items(), key=lambda item: -item[1])]
    finally:
        metal_flash_sdpa.reset_dispatch_count()
        if not was_enabled:
            patch.disable()
    return lines, healthy


def status() -> int:
    """Print the status report; 0 when healthy (1: an Apple silicon Mac with MPS but no MFA
    kernel, or a sample call failed or disagreed with explain())."""
    import torch

    from . import config, kernels

    mps_kernel = kernels.registered_kernels().get("mps")
    lines = [
        f"metal-flash-sdpa {metal_flash_sdpa.__version__} ({metal_flash_sdpa.__file__})",
        f"torch {torch.__version__}, wrapt {_version('wrapt')}, Python {platform.python_version()}",
        f"platform: {platform.platform()} ({platform.machine()})",
        f"MPS: {_mps_line(torch)}",
    ]
    if mps_kernel is not None:
        from .kernels import mfa

        native = getattr(mfa, "_native", None)
        lines.append(f"MFA kernel: available; native bridge loaded from {getattr(native, '__file__', '?')}")
    else:
        reason = kernels.unavailable.get("mps", "not registered")
        lines.append(f"MFA kernel: NOT AVAILABLE on this machine: {reason}")
        lines.append("  SDPA calls on this machine run PyTorch's own SDPA unless you register a kernel yourself.")
    lines.append("Environment:")
    lines += _setting_lines()
    mode = config.enable_mode(warn=False)
    active = metal_flash_sdpa.is_enabled()
    why = {"off": "MFA_ENABLE is off", "auto": "MFA_ENABLE=auto and no kernel on this machine"}.get(mode, "")
    lines.append(f"Patch active: {'yes' if active else 'no'}" + ("" if active or not why else f" ({why})"))
    lines.append(f"MIN_SEQ_LEN: {metal_flash_sdpa.MIN_SEQ_LEN}")
    registered = metal_flash_sdpa.registered_kernels()
    lines.append("Registered kernels: " + (", ".join(f"{d} -> {k!r}" for d, k in registered.items()) or "none"))
    for line in lines:
        print(line)
    sample, healthy = _sample_workload(torch, kernels)
    for line in sample:
        print(line)
    from . import trust

    for line in trust.status_lines():  # after the sample, which may have checked variants
        print(line)
    apple_silicon = sys.platform == "darwin" and platform.machine() == "arm64"
    if apple_silicon and torch.backends.mps.is_available() and mps_kernel is None:
        print("UNHEALTHY: this Mac has MPS but the MFA kernel is not available (see above)")
        healthy = False
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
