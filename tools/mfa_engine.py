#!/usr/bin/env python3
"""The MFA engine on Linux (DESIGN section 10): what one SDPA call runs on a Mac.

  python tools/mfa_engine.py source --dtype {fp32,fp16,bf16} --batch B --heads H
      --kv-heads HK --q-len R --kv-len C --head-dim D [--causal] [--mask {none,bool,additive}]
      [--mask-shape {LS,B1LS,BHLS,B11S,1HLS}] [--mask-pattern P] [--grad [--mask-grad]] [--gpu {apple7,apple9}]
      [--macos N] [--os-reports V] [--scale S] [--dropout P [--dropout-seed S]] [--value-dim DV]

prints the Metal source of every kernel the call launches (forward; with --grad the backward
too), each after a line `// kernel: NAME` and a line `// options: language=X.Y fast_math=on|off`
(the compile options of its library). --macos N models that Mac's compiler (from 26 on
it rejects `__asm` in runtime-compiled source); --os-reports V is what its NSProcessInfo
reports (default N; a process linked against an SDK older than macOS 26 is told 16.x
there). The copy mode is the bridge's: a probe source with one async-copy declaration is
compiled first, and ccv's kernels use async copies only if it compiles. Exit 0; 2 when MFAKernel.supports() refuses the
call (the reason on stderr); 3 when the engine fails (ccv raised, or it encoded something
Metal would reject). ccv comes from MFA_CCV_SOURCE or ../shared/ccv/ (tools/engine/build.py).

  python tools/mfa_engine.py run CALL-FLAGS [--seed N] [--offset BYTES]
      [--schedule {round_robin,run_ahead,run_behind}]

executes everything the call encodes on the CPU (tools/engine/execute.py) on random inputs
and compares out, LSE (and with --grad dQ, dK, dV) with PyTorch's math SDPA in float64;
prints one JSON line {"ok", "max_abs", "max_rel", "used" (share of the tolerance; with
--mask-grad "dmask" too, the mask's gradient against float64 autograd), "tolerance",
"mma" (8x8 multiply-accumulates per kernel), "mask_tile_reads" (mask elements the tile
summaries read: each summary reads the mask once), "copies" (per kernel, "balance",
"balance_floor" and "vector_share" of the tile copies its threads make themselves, patch
0014; null where they make none: async copies are the copy engine's), "float_exceptions" (per kernel, the float
exceptions its threads raised: invalid, divide_by_zero, overflow), "seconds"}. Exit 0 within tolerance; 1 not: a
value no kernel wrote (NaN, max_abs null) or a kernel fault (a guard page hit, divergence,
a missing binding: "error" instead of the figures); 2 refused; 3 engine failure.

  python tools/mfa_engine.py plan CALL-FLAGS

records the call without executing it and prints one JSON line: "kernels" (the kernels'
names in the order first launched), "dispatches", "threadgroup_bytes" (the most one
dispatch uses), "slices" (ccv calls per pass: forward, backward) and "extra_bytes": the
peak bytes of device buffers the call allocates beyond the user's tensors (q, k, v, out,
LSE, and with --grad dO, dQ, dK, dV), which is ccv's scratch (the bridge allocates nothing
else): a long call runs as slices of batches or heads whose scratch stays under the
budget (native/mfa_params.hpp, plan_slices; --scratch-budget lowers it); and
"mask_tile_bytes": a masked call's tile summaries (patch 0013), which MFAKernel allocates
and keeps per mask. Exit codes as `source`.

--mask runs with an attn_mask (tools/engine/masks.py: padding, rows without keys, per-head
holes; additive: ALiBi-like biases, rows masked with -inf and with finfo.min) shaped
--mask-shape: [R, C], [B, 1, R, C] (default), [B, H, R, C], [B, 1, 1, C] broadcast over
the rows, or [1, H, R, C] (T5's bias), read in place through its strides as the bridge hands it over; --mask-pattern P
runs the mask models pass instead (masks.pattern: causal, causal-padding, window:W,
docs:N, keypad:F, random), in that pattern's shape. --dropout P drops (patch 0015) with
metal_flash_sdpa.dropout's keep decisions for the seed --dropout-seed; `run`'s reference
drops the same elements. A masked call's kernels read the
mask's tile summaries, which the summary kernels write first (patch 0013), as on a Mac.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
if "metal_flash_sdpa" not in sys.modules:
    try:  # the installed package if there is one, else the checkout's (pure Python)
        import metal_flash_sdpa  # noqa: F401
    except ImportError:
        sys.path.append(str(REPO))

from engine import build, encode, metal  # noqa: E402


def call_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--q-len", type=int, required=True)
    parser.add_argument("--kv-len", type=int, required=True)
    parser.add_argument("--head-dim", type=int, required=True)
    parser.add_argument("--value-dim", type=int, default=None, help="V's head dim (default: --head-dim); the narrower is padded")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--mask", choices=("none", "bool", "additive"), default="none")
    parser.add_argument("--mask-shape", choices=encode.MASK_SHAPES, default="B1LS")
    parser.add_argument("--mask-pattern", default=None, help="with --mask: the mask models pass (tools/engine/masks.py, pattern)")
    parser.add_argument("--grad", action="store_true")
    parser.add_argument("--mask-grad", action="store_true", help="with --mask additive and --grad: the mask's gradient too (patch 0017)")
    parser.add_argument("--gpu", choices=("apple7", "apple9"), default="apple9")
    parser.add_argument("--macos", type=int, default=26, help="the modelled macOS (its compiler)")
    parser.add_argument("--os-reports", default=None, help="what NSProcessInfo reports, MAJOR[.MINOR[.PATCH]] (default: --macos)")
    parser.add_argument("--scale", type=float, default=None, help="SDPA's scale (default 1/sqrt(head dim); 0 is refused, not defaulted)")
    parser.add_argument(
        "--scratch-budget", type=int, default=None, help="bytes of scratch one slice of the call may use (default: the bridge's, 64 MiB)"
    )
    parser.add_argument("--dropout", type=float, default=0.0, help="attention dropout's p (patch 0015; default 0: none)")
    parser.add_argument("--dropout-seed", type=int, default=0, help="with --dropout: the call's 64-bit seed")


def to_call(args) -> encode.Call:
    return encode.Call(**{field.name: getattr(args, field.name) for field in dataclasses.fields(encode.Call)})


def cmd_source(args) -> int:
    record = encode.encode(to_call(args))
    for kernel in record.kernels():
        sys.stdout.write(f"// kernel: {kernel.name}\n{kernel.options_line()}\n{kernel.source}\n")
    return 0


def cmd_plan(args) -> int:
    print(json.dumps(plan(encode.encode(to_call(args)))))
    return 0


def plan(record: encode.Record) -> dict:
    """What a call launches and allocates, from its record (no execution)."""
    dispatches = record.dispatches
    attention = [d for d in dispatches if record.raw["pipelines"][d["pipeline"]]["function"] == "attention"]
    backward = sum(1 for d in attention if record.kernel_of(d).startswith("attention_backward_key_value"))
    return {
        "kernels": [kernel.name for kernel in record.kernels()],
        "dispatches": len(dispatches),
        "threadgroup_bytes": max((sum(d["threadgroup_memory"].values()) for d in dispatches), default=0),
        "slices": {"forward": len(attention) - 2 * backward, "backward": backward},
        "extra_bytes": record.raw["scratch_peak"],
        "mask_tile_bytes": sum(b["length"] for b in record.raw["buffers"] if b["name"].startswith("mask_tiles")),
    }


def cmd_run(args) -> int:
    from engine import execute

    faulthandler.enable()  # a fault the shim does not catch still names where it happened
    try:
        result = execute.run(to_call(args), seed=args.seed, offset=args.offset, schedule=args.schedule)
    except (execute.ReplayError, metal.MetalBindingError, metal.MetalExecutionError) as fault:
        result = {"ok": False, "error": f"{type(fault).__name__}: {fault}"}
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mfa_engine.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    source = commands.add_parser("source", help="print the Metal source of every kernel the call launches")
    call_arguments(source)
    source.set_defaults(run=cmd_source)
    run = commands.add_parser("run", help="execute the call on the CPU and compare with float64 PyTorch (JSON line)")
    call_arguments(run)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--offset", type=int, default=0, help="every tensor starts this many bytes into its buffer")
    run.add_argument("--schedule", choices=metal.SCHEDULES, default="round_robin", help="the order ready Metal threads run in")
    run.set_defaults(run=cmd_run)
    plan_parser = commands.add_parser("plan", help="what the call launches and allocates, without executing it (JSON line)")
    call_arguments(plan_parser)
    plan_parser.set_defaults(run=cmd_plan)
    args = parser.parse_args(argv)
    if args.mask_pattern is not None and args.mask == "none":
        parser.error("--mask-pattern needs --mask bool or --mask additive")
    if args.mask_grad and (args.mask != "additive" or not args.grad):
        parser.error("--mask-grad needs --mask additive and --grad")
    try:
        return args.run(args)
    except encode.Refused as refused:
        print(f"mfa_engine: refused: {refused}", file=sys.stderr)
        return 2
    except build.Unavailable as missing:
        print(f"mfa_engine: the engine cannot be built here: {missing}", file=sys.stderr)
        return 3
    except (encode.EngineError, metal.MetalSyntaxError) as error:  # ccv, or a source the shim cannot compile
        print(f"mfa_engine: {error}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
