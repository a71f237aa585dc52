"""Encode one SDPA call as the bridge would on a Mac, and read back what ccv recorded."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
from typing import Optional

from . import build

# AttentionOperand::bufferIndex() in ccv's v2/AttentionOperand.hpp: Q K V O L D dO dV dK dQ.
_BUFFER = re.compile(r"\[\[buffer\((\d+)\)\]\]")


# The attn_mask shapes the engine runs, as the op layer hands them to the kernel: bool (a
# byte an element, patch 0012) or additive in q's dtype, [Bm, Hm, R, C] (Bm in (1, B), Hm
# in (1, Hq)), stored compact and read
# through strides that are 0 where the shape broadcasts (no broadcast materialised).
MASK_SHAPES = ("LS", "B1LS", "BHLS", "B11S", "1HLS")  # [R, C], [B, 1, R, C], [B, Hq, R, C], [B, 1, 1, C], [1, Hq, R, C]

# The stand-in device's maxBufferLength (recorder.hpp, DeviceModel::max_buffer_length).
MAX_BUFFER_LENGTH = 1 << 34


@dataclasses.dataclass(frozen=True)
class Call:
    """One SDPA call, in the terms of `python tools/mfa_engine.py` and MFAKernel.supports()."""

    dtype: str = "fp32"  # fp32, fp16, bf16
    batch: int = 1
    heads: int = 1
    kv_heads: Optional[int] = None  # None: as many as heads
    q_len: int = 1
    kv_len: int = 1
    head_dim: int = 64
    value_dim: Optional[int] = None  # V's head dim; None: head_dim (MFAKernel pads the narrower: value_dim.py)
    causal: bool = False
    mask: str = "none"  # none, bool, additive
    mask_shape: str = "B1LS"  # one of MASK_SHAPES, with a mask
    mask_pattern: Optional[str] = None  # with a mask: one of masks.PATTERNS, in its own shape; None: masks.make's
    mask_grad: bool = False  # with an additive mask and grad: the backward returns the mask's gradient (patch 0017)
    grad: bool = False
    gpu: str = "apple9"  # apple7, apple9
    macos: int = 26  # the modelled Mac's compiler: from 26 on it rejects `__asm` in source
    os_reports: Optional[str] = None  # what its NSProcessInfo reports; None: macos
    scale: Optional[float] = None  # SDPA's scale; None: 1/sqrt(head_dim)
    scratch_budget: Optional[int] = None  # bytes of scratch a slice may use; None: the bridge's
    dropout: float = 0.0  # attention dropout's p; 0: none
    dropout_seed: int = 0  # the call's 64-bit seed, with dropout

    @property
    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.dtype]

    @property
    def hk(self) -> int:
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def dv(self) -> int:
        return self.head_dim if self.value_dim is None else self.value_dim

    @property
    def kernel_head_dim(self) -> int:
        """The head dim the kernels run at: the wider of head_dim and dv (the narrower side is
        padded with zeros, as MFAKernel does: metal_flash_sdpa/kernels/value_dim.py)."""
        return max(self.head_dim, self.dv)

    def driver_args(self) -> list[str]:
        args = ["--dtype", self.dtype, "--batch", str(self.batch), "--heads", str(self.heads)]
        args += ["--kv-heads", str(self.hk), "--q-len", str(self.q_len), "--kv-len", str(self.kv_len)]
        args += ["--head-dim", str(self.kernel_head_dim), "--gpu", self.gpu, "--macos", str(self.macos)]
        if self.os_reports is not None:
            args += ["--os-reports", self.os_reports]
        if self.scale is not None or self.dv != self.head_dim:  # the driver's default is of --head-dim
            args += ["--scale", repr(self.scale if self.scale is not None else 1.0 / math.sqrt(self.head_dim))]
        if self.scratch_budget is not None:
            args += ["--scratch-budget", str(self.scratch_budget)]
        if self.mask != "none":
            args += ["--mask-strides", ",".join(map(str, self.mask_strides()))]
            args += ["--mask-bool"] if self.mask == "bool" else []
            args += ["--mask-grad"] if self.mask_grad else []
        if self.dropout:
            args += ["--dropout", ",".join(map(str, self.dropout_parameters()))]
        # the backward in the forward's command buffer, as PyTorch's stream may encode them:
        # the driver fails a run that releases a buffer a pending dispatch binds
        args += ["--grad", "--same-command-buffer"] if self.grad else []
        return args + (["--causal"] if self.causal else [])

    def dropout_parameters(self) -> tuple:
        """(threshold, scale, seed) as MFAKernel hands them to ccv (mfa.dropout_parameters)."""
        import metal_flash_sdpa  # noqa: F401  (before the submodule: see README)
        from metal_flash_sdpa.kernels.mfa import dropout_parameters

        return dropout_parameters(self.dropout, self.dropout_seed)

    def mask_dims(self) -> tuple:
        """The stored (compact) mask's shape, [Bm, Hm, Rm, C]."""
        b, h, r, c = self.batch, self.heads, self.q_len, self.kv_len
        shape = self.mask_shape if self.mask_pattern is None else pattern_shape(self.mask_pattern)
        return {"LS": (1, 1, r, c), "B1LS": (b, 1, r, c), "BHLS": (b, h, r, c), "B11S": (b, 1, 1, c), "1HLS": (1, h, r, c)}[shape]

    def mask_strides(self) -> tuple:
        """(batch, head, row) strides in elements of the mask as the kernel reads it."""
        bm, hm, rm, c = self.mask_dims()
        return (hm * rm * c if bm > 1 else 0, rm * c if hm > 1 else 0, c if rm > 1 else 0)


def pattern_shape(pattern: str) -> str:
    """The mask shape of a --mask-pattern (tools/engine/masks.py, pattern): key padding is
    [B, 1, 1, S], transformers' causal AND padding [B, 1, L, S], the others [L, S]."""
    name = pattern.split(":")[0]
    return {"keypad": "B11S", "causal-padding": "B1LS"}.get(name, "LS")


class Refused(Exception):
    """MFAKernel.supports() (or the bridge's own limits) refuse the call."""


class EngineError(Exception):
    """ccv raised, or encoded something Metal would reject."""


def refusal(call: Call) -> Optional[str]:
    """MFAKernel.supports()'s reason for refusing ``call``, or None."""
    import torch

    import metal_flash_sdpa  # noqa: F401  (before the submodule: see README)
    from metal_flash_sdpa.kernels.base import Call as KernelCall
    from metal_flash_sdpa.kernels.mfa import MFAKernel

    kernel_call = KernelCall(
        dtype=call.torch_dtype,
        batch=call.batch,
        q_heads=call.heads,
        kv_heads=call.hk,
        q_len=call.q_len,
        kv_len=call.kv_len,
        head_dim=call.head_dim,
        value_dim=call.dv,
        causal=call.causal,
        mask=None if call.mask == "none" else call.mask,
        mask_per_head=call.mask != "none" and call.mask_dims()[1] > 1,
        needs_grad=call.grad,
        scale=call.scale,
        dropout_p=call.dropout,
        mask_grad=call.mask_grad,
        mask_lines=call.mask != "none" and call.mask_dims()[2] != call.q_len,
    )
    kernel = MFAKernel()
    kernel.max_buffer_length = MAX_BUFFER_LENGTH  # as the bridge reads it on a Mac
    return kernel.supports(kernel_call)


@dataclasses.dataclass
class Kernel:
    """One library ccv compiled and the call launches."""

    name: str
    source: str
    options: Optional[dict] = None  # the compile options: {"language": "3.1", "fast_math": True}; None: none given

    def options_line(self) -> str:
        """``// options: language=X.Y fast_math=on|off`` (``// options: none`` without options)."""
        if self.options is None:
            return "// options: none"
        return f"// options: language={self.options['language']} fast_math={'on' if self.options['fast_math'] else 'off'}"


@dataclasses.dataclass
class Record:
    call: Call
    raw: dict

    @property
    def dispatches(self) -> list:
        return self.raw["dispatches"]

    def library_of(self, dispatch: dict) -> int:
        return self.raw["pipelines"][dispatch["pipeline"]]["library"]

    def kernel_of(self, dispatch: dict) -> str:
        """The name of the kernel ``dispatch`` launches."""
        library = self.library_of(dispatch)
        source = self.raw["libraries"][library]["source"]
        return kernel_name(self.raw["pipelines"][dispatch["pipeline"]]["function"], source)

    def kernels(self) -> list[Kernel]:
        """Every library a dispatch uses, in the order first launched, named."""
        seen, out = set(), []
        for dispatch in self.dispatches:
            library = self.library_of(dispatch)
            if library not in seen:
                seen.add(library)
                source = self.raw["libraries"][library]["source"]
                out.append(Kernel(self.kernel_of(dispatch), source, self.raw["libraries"][library].get("options")))
        return out


def buffer_indices(source: str, function: Optional[str] = None) -> list[int]:
    """The buffer indices a Metal source declares (``[[buffer(n)]]``); with ``function``,
    those of that kernel function's parameters only."""
    if function is not None:
        start = source.index(f"kernel void {function}(")
        source = source[start : source.index(") {", start)]
    return [int(n) for n in _BUFFER.findall(source)]


def kernel_name(function: str, source: str) -> str:
    """attention_forward / attention_backward_query / attention_backward_key_value, or cast_...
    (attention kernels differ by the operands they bind: dQ is buffer 9, dV and dK 7 and 8),
    or the function's own name (the mask tile summary's: mask_tiles_forward, ...)."""
    if function == "attention":
        buffers = set(buffer_indices(source))
        if {7, 8} <= buffers:
            return "attention_backward_key_value"
        if 9 in buffers:
            return "attention_backward_query"
        return "attention_forward"
    types = re.findall(r"typedef (\w+?)4? (?:original_real|real)4?;", source)
    return f"{function}_{'_to_'.join(types)}" if len(types) == 2 else function


def encode(call: Call, *extra: str, check_refusal: bool = True) -> Record:
    """Run ccv's encode for ``call`` on the recording stand-in."""
    if check_refusal:
        reason = refusal(call)
        if reason is not None:
            raise Refused(reason)
    driver = build.build()
    result = subprocess.run([str(driver), *call.driver_args(), *extra], capture_output=True, text=True)
    if result.returncode < 0:
        raise EngineError(f"the engine died (signal {-result.returncode}): {result.stderr.strip()[-2000:]}")
    try:
        raw = json.loads(result.stdout)
    except json.JSONDecodeError:
        raise EngineError(f"the engine exited {result.returncode}: {result.stderr.strip()[-2000:]}") from None
    if "refused" in raw:
        raise Refused(raw["refused"])
    if "error" in raw:
        raise EngineError(raw["error"])
    if raw["errors"]:
        raise EngineError("; ".join(raw["errors"]))
    return Record(call, raw)
