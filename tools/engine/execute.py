"""Replays a Record (encode.py) on the CPU through the executing Metal shim (metal.py), and
compares what the kernels computed with PyTorch's math SDPA in float64 (DESIGN section 10,
rung 4).

Every buffer of the record gets its own mapping that ends at a PROT_NONE guard page (and
starts after one), so a read or write past a buffer faults (the shim reports it) instead of
going unseen. ccv's scratch is split at every offset a dispatch binds into it, one guarded
mapping per region, because ccv rounds scratch up to a power of two and an overrun from one
region into the next would otherwise look like data. Scratch and outputs start as NaN, so a
value no kernel wrote shows as NaN; the bytes around a tensor inside its buffer (the view
offset, the alignment slack) are checked unchanged afterwards, as are the inputs.

What this cannot show: the Metal compiler's own behaviour, GPU rounding (fast::exp2,
accumulation order, denormals) and real concurrency; the comparison is tolerance-based.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import math
import mmap
import time
from typing import Callable, Optional

import torch

from . import encode, masks

PAGE = mmap.PAGESIZE
# Buffers start 16-byte aligned (Metal's are page aligned; the shim's vector loads need 16).
ALIGN = 16
# 0xFF bytes are NaN as float32, float16 and bfloat16 alike.
POISON = 0xFF

INPUTS = ("q", "k", "v", "do")  # and "mask" with a mask
OUTPUTS = ("out", "lse", "dq", "dk", "dv")  # and "dmask" with the mask's gradient
BUFFER_OF = {"out": "o", "dmask": "mask_grad"}  # the record's names of the output buffers

# The log-sum-exp is not in the kernel contract (MFAKernel.tolerances covers out, dq, dk, dv),
# but the backward reads it, so it is checked on its own: float32 in both dtypes (upcast).
# Over the MFA_ENGINE_FULL=1 matrix the worst |err| / (1 + |ref|) was 2.0e-7 (Apple9,
# D=384); this is 4x that, rounded up. Its rtol applies to the larger of |LSE| and the row's
# largest |scale| * sum |q_d k_d| (in log2 units): a score's float32 rounding grows with
# that sum, so a row whose LSE is near 0 (a causal first row: one score) is not held to less
# than its scores' own rounding (at D = 512, 3.6e-6 where |LSE| was 1.7).
LSE_TOLERANCE = (1e-6, 1e-6)



# MTL::DataType of a function constant value -> the Metal type it must be declared as.
METAL_DATA_TYPES = {3: "float", 16: "half", 33: "uint", 41: "ushort", 53: "bool"}


class ReplayError(Exception):
    """The record cannot be replayed as Metal would run it (a binding a kernel declares is
    missing, a buffer has the wrong size, a kernel wrote where it must not)."""


# -- host memory -------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_NONE = 0  # <sys/mman.h>; Python's mmap module does not export it


class GuardedBuffer:
    """``length`` bytes of host memory between two PROT_NONE pages, ending ALIGN-rounded at
    the second one; every byte starts as POISON."""

    def __init__(self, length: int):
        self.length = length
        padded = -(-max(length, 1) // ALIGN) * ALIGN
        pages = -(-padded // PAGE)
        self._size = (pages + 2) * PAGE
        base = _libc.mmap(None, self._size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if base in (None, _MAP_FAILED):
            raise MemoryError(f"mmap of {self._size} bytes failed (errno {ctypes.get_errno()})")
        self._base = base
        for guard in (base, base + (pages + 1) * PAGE):
            if _libc.mprotect(guard, PAGE, _PROT_NONE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect of a guard page failed")
        self.address = base + (pages + 1) * PAGE - padded
        ctypes.memset(self.address, POISON, padded)
        self._padded = padded

    def view(self, start: int = 0, length: Optional[int] = None) -> torch.Tensor:
        """The bytes [start, start + length) as a uint8 tensor sharing this memory."""
        length = self._padded - start if length is None else length
        if length == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer((ctypes.c_char * length).from_address(self.address + start), dtype=torch.uint8)

    def slack(self) -> torch.Tensor:
        """The alignment padding after the buffer's end: must stay POISON."""
        return self.view(self.length, self._padded - self.length)

    def free(self) -> None:
        if self._base is not None:
            _libc.munmap(self._base, self._size)
            self._base = None


# -- the replay ----------------------------------------------------------------------------


@dataclasses.dataclass
class Execution:
    """What the kernels wrote, as CPU tensors: out [B, R, H, D] and dq in the call's dtype,
    dk, dv [B, C, H, D], lse [B, H, R] float32 (base 2); mma: 8x8 multiply-accumulates
    executed per kernel name; float_exceptions: kernel name -> the float exceptions its
    threads raised (metal.FLOAT_EXCEPTIONS: an operation that made a NaN or an infinity),
    for the kernels that raised any; copy_stats: kernel name -> the copy counts of its
    threads (metal.COPY_STATS summed over its dispatches), which copies() turns into figures."""

    outputs: dict
    mma: dict
    float_exceptions: dict = dataclasses.field(default_factory=dict)
    copy_stats: dict = dataclasses.field(default_factory=dict)

    def copies(self) -> dict:
        """Kernel name -> {"balance": over all its tile copies, the most elements one thread
        copied over an even split among the threadgroup's threads (summed over copies: a
        ratio of copy times if a copy takes as long as its busiest thread); "balance_floor":
        the same for the most even split of each copy into 8-byte accesses (above 1 where
        a tile has fewer than 8 bytes for each thread); "vector_share": the share of device
        bytes moved by accesses of 8 bytes or more}, or None for a kernel whose threads copy
        nothing (async copies are the copy engine's)."""
        out = {}
        for name, stats in self.copy_stats.items():
            elements, device = stats["copy_elements"], stats["copy_device_bytes"]
            if not elements:
                out[name] = None
                continue
            out[name] = {
                "balance": round(stats["copy_critical"] / elements, 3),
                "balance_floor": round(stats["copy_floor"] / elements, 3),
                "vector_share": round(stats["copy_wide_bytes"] / device, 3) if device else None,
            }
        return out


def random_inputs(call: encode.Call, seed: int) -> dict:
    """q, k, v and (with grad) do, standard normal, in the call's dtype and [B, S, H, D];
    with a mask, "mask" (the user's, ``masks.make``) and "kernel_mask" (as the op layer
    hands it to the kernel: bool, or additive in the call's dtype; compact, [Bm, Hm, Rm, C])."""
    generator = torch.Generator().manual_seed(seed)
    dtype = call.torch_dtype
    shapes = {"q": (call.batch, call.q_len, call.heads, call.head_dim), "do": (call.batch, call.q_len, call.heads, call.dv)}
    shapes["k"], shapes["v"] = (call.batch, call.kv_len, call.hk, call.head_dim), (call.batch, call.kv_len, call.hk, call.dv)
    names = INPUTS if call.grad else INPUTS[:3]
    inputs = {name: torch.randn(shapes[name], generator=generator).to(dtype) for name in names}
    if call.mask != "none":
        inputs["mask"] = masks.make(call, generator)
        inputs["kernel_mask"] = masks.kernel_form(inputs["mask"], dtype)
    return inputs


def kernel_inputs(call: encode.Call, inputs: dict) -> dict:
    """``inputs`` as MFAKernel hands them to the kernels: with a value head dim of its own,
    q, k, v and do padded with zeros to the wider head dim by the package's own function
    (metal_flash_sdpa.kernels.value_dim)."""
    from metal_flash_sdpa.kernels.value_dim import widened

    def kernel_form(name, t):
        if name not in INPUTS:
            return t
        return widened(t.transpose(1, 2), call.kernel_head_dim, "BSHD").transpose(1, 2)

    out = {name: kernel_form(name, t) for name, t in inputs.items()}
    if call.mask_grad:  # the mask's gradient, zeroed as MFAKernel zeroes it
        out[BUFFER_OF["dmask"]] = torch.zeros(call.mask_dims(), dtype=call.torch_dtype)
    return out


def user_outputs(call: encode.Call, outputs: dict) -> dict:
    """The kernels' outputs cut to the call's head dims, as MFAKernel cuts them."""
    from metal_flash_sdpa.kernels.value_dim import narrowed

    dims = {"out": call.dv, "dq": call.head_dim, "dk": call.head_dim, "dv": call.dv}

    def user_form(name, t):
        if name not in dims:
            return t
        return narrowed(t.transpose(1, 2), dims[name], "BSHD").transpose(1, 2)

    return {name: user_form(name, t) for name, t in outputs.items()}


def _tensor_layouts(call: encode.Call) -> dict:
    """Buffer name -> (dtype, shape) of the tensor it holds (at the head dim the kernels run)."""
    dtype = call.torch_dtype
    qo = (call.batch, call.q_len, call.heads, call.kernel_head_dim)
    kv = (call.batch, call.kv_len, call.hk, call.kernel_head_dim)
    layouts = {"q": (dtype, qo), "k": (dtype, kv), "v": (dtype, kv), "o": (dtype, qo)}
    layouts["lse"] = (torch.float32, (call.batch, call.heads, call.q_len))
    layouts.update({"do": (dtype, qo), "dq": (dtype, qo), "dk": (dtype, kv), "dv": (dtype, kv)})
    if call.mask != "none":  # stored compact: its span is its element count
        layouts["mask"] = (torch.bool if call.mask == "bool" else dtype, call.mask_dims())
    if call.mask_grad:  # laid out as the mask
        layouts["mask_grad"] = (dtype, call.mask_dims())
    return layouts


def launches(record: encode.Record) -> list[int]:
    """The ccv call (a slice: native/mfa_params.hpp launches) each dispatch belongs to:
    each starts with its forward or backward-query kernel."""
    out, launch = [], -1
    for dispatch in record.dispatches:
        launch += record.kernel_of(dispatch) in ("attention_forward", "attention_backward_query")
        out.append(launch)
    return out


def _declared_bindings(record: encode.Record) -> list:
    """For each dispatch, the bindings its kernel declares (the encoder keeps earlier ones)."""
    declared = {}  # (library, function) -> its buffer indices, read once
    out = []
    for dispatch in record.dispatches:
        library = record.library_of(dispatch)
        function = record.raw["pipelines"][dispatch["pipeline"]]["function"]
        if (library, function) not in declared:
            source = record.raw["libraries"][library]["source"]
            declared[library, function] = set(encode.buffer_indices(source, function))
        out.append([binding for slot, binding in dispatch["buffers"].items() if int(slot) in declared[library, function]])
    return out


class _Memory:
    """Host memory for every buffer a record binds: tensors whole, scratch by region, the
    regions of each ccv call apart (the slices of a call lay the one scratch out anew: what
    one writes there only it reads)."""

    def __init__(self, record: encode.Record, offset: int):
        self.record = record
        self.offset = offset
        self.buffers: list[GuardedBuffer] = []
        self.tensors: dict[str, tuple[GuardedBuffer, torch.dtype, tuple]] = {}
        self.regions: dict[tuple[int, int, int], GuardedBuffer] = {}  # (ccv call, scratch buffer, offset)
        self.launches = launches(record)  # each dispatch's ccv call
        layouts = _tensor_layouts(record.call)
        bound = collections.defaultdict(set)
        for launch, bindings in zip(self.launches, _declared_bindings(record)):
            for binding in bindings:
                bound[binding["buffer"]].add((launch, binding["offset"]))
        for index, info in enumerate(record.raw["buffers"]):
            name, length = info["name"], info["length"]
            if name == "scratch":
                for launch in sorted({launch for launch, _ in bound[index]}):
                    starts = sorted(start for l, start in bound[index] if l == launch)
                    for start, end in zip(starts, starts[1:] + [length]):
                        self.regions[(launch, index, start)] = self._allocate(end - start)
            elif name.startswith("mask_tiles"):  # a tile summary (patch 0013): written and read by kernels
                self.tensors[name] = (self._allocate(length), torch.uint8, (length - offset,))
            elif index in bound or name in layouts:
                dtype, shape = layouts[name]
                expected = offset + math.prod(shape) * dtype.itemsize
                if length != expected:
                    raise ReplayError(f"buffer {name} is {length} bytes; a {list(shape)} {dtype} view at {offset} needs {expected}")
                self.tensors[name] = (self._allocate(length), dtype, shape)

    def _allocate(self, length: int) -> GuardedBuffer:
        buffer = GuardedBuffer(length)
        self.buffers.append(buffer)
        return buffer

    def address(self, binding: dict, launch: int) -> int:
        index, offset = binding["buffer"], binding["offset"]
        if (launch, index, offset) in self.regions:
            return self.regions[(launch, index, offset)].address
        name = self.record.raw["buffers"][index]["name"]
        if name not in self.tensors:
            raise ReplayError(f"binding into buffer {index} ({name}) at {offset} is not a region of it")
        return self.tensors[name][0].address + offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        buffer, dtype, shape = self.tensors[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ReplayError(f"{name} must be {list(shape)} {dtype}, not {list(tensor.shape)} {tensor.dtype}")
        data = tensor.contiguous().view(torch.uint8).reshape(-1)
        buffer.view(self.offset, data.numel()).copy_(data)

    def read(self, name: str) -> torch.Tensor:
        buffer, dtype, shape = self.tensors[name]
        data = buffer.view(self.offset, buffer.length - self.offset).clone()
        return data.view(dtype).reshape(shape)

    def check_surroundings(self) -> None:
        """The bytes of every tensor's buffer outside the tensor, and the alignment slack of
        every scratch region, are still POISON: nothing wrote past or before a view."""
        for name, (buffer, _, _) in self.tensors.items():
            for where, bytes_ in (("before", buffer.view(0, self.offset)), ("after", buffer.slack())):
                if (bytes_ != POISON).any():
                    raise ReplayError(f"a kernel wrote {where} the {name} tensor in its buffer")
        for (_, index, start), buffer in self.regions.items():
            if (buffer.slack() != POISON).any():
                raise ReplayError(f"a kernel wrote past the scratch region at {start} of buffer {index}")

    def free(self) -> None:
        for buffer in self.buffers:
            buffer.free()


def _bindings(kernel, dispatch: dict, launch: int, pipeline: dict, memory: _Memory, name: str, scratch: list) -> tuple:
    """The buffers, function constants and threadgroup memory ``kernel`` declares, from the
    encoder state at ``dispatch``; a declared one the encoder did not set is an error, as
    it would be on a Mac (a pipeline without its constants, a kernel reading garbage)."""
    buffers = {}
    for index in kernel.buffers:
        key = str(index)
        if key in dispatch["buffers"]:
            buffers[index] = memory.address(dispatch["buffers"][key], launch)
        elif key in dispatch.get("bytes", {}):
            payload = bytes.fromhex(dispatch["bytes"][key])
            region = GuardedBuffer(len(payload))
            ctypes.memmove(region.address, payload, len(payload))
            scratch.append(region)
            buffers[index] = region.address
        else:
            raise ReplayError(f"{name}: buffer {index} ({kernel.buffers[index]}) is declared but not bound")
    constants = {}
    for index, (constant, declared) in kernel.constants.items():
        value = pipeline["constants"].get(str(index))
        if value is None:
            raise ReplayError(f"{name}: function constant {index} ({declared} {constant}) is declared but not set")
        if METAL_DATA_TYPES.get(value["type"]) != declared:
            raise ReplayError(f"{name}: function constant {index} ({declared} {constant}) is set as MTLDataType {value['type']}")
        constants[index] = bytes.fromhex(value["hex"])
    memory_lengths = {}
    for index in kernel.threadgroup:
        if str(index) not in dispatch["threadgroup_memory"]:
            raise ReplayError(f"{name}: threadgroup memory {index} is declared but its length is not set")
        memory_lengths[index] = dispatch["threadgroup_memory"][str(index)]
    return buffers, constants, memory_lengths


def _buffer_contents(inputs: dict) -> dict:
    """Buffer name -> what it holds: the inputs, the mask in the kernel's form."""
    contents = {name: tensor for name, tensor in inputs.items() if name not in ("mask", "kernel_mask")}
    if "kernel_mask" in inputs:
        contents["mask"] = inputs["kernel_mask"]
    return contents


def execute(
    record: encode.Record,
    inputs: dict,
    offset: int = 0,
    schedule: str = "round_robin",
    edit: Optional[Callable[[str, str], str]] = None,
) -> Execution:
    """Run every dispatch of ``record`` in order on ``inputs`` (random_inputs' form, placed
    ``offset`` bytes into their buffers, as the record was encoded with ``--offset``).
    ``edit(kernel_name, source)`` may rewrite a kernel's source first (mutation tests)."""
    from . import metal

    memory = _Memory(record, offset)
    transient: list[GuardedBuffer] = []
    try:
        contents = _buffer_contents(inputs)
        for name, tensor in contents.items():
            memory.write(name, tensor)
        mma = collections.Counter()
        flags = collections.Counter()
        copies = collections.defaultdict(collections.Counter)
        frozen = {}  # the forward's results, which the backward must only read
        for launch, dispatch in zip(memory.launches, record.dispatches):
            pipeline = record.raw["pipelines"][dispatch["pipeline"]]
            source = record.raw["libraries"][pipeline["library"]]["source"]
            name = encode.kernel_name(pipeline["function"], source)
            if name.startswith("attention_backward") and not frozen:
                frozen = {n: memory.read(n) for n in ("o", "lse")}
            if edit is not None:
                source = edit(name, source)
            kernel = metal.load_kernel(source, pipeline["function"])
            buffers, constants, lengths = _bindings(kernel, dispatch, launch, pipeline, memory, name, transient)
            stats = kernel.run(dispatch["grid"], dispatch["group"], buffers, constants, lengths, schedule=schedule)
            mma[name] += stats.get("mma", 0)
            flags[name] |= stats.get("float_exceptions", 0)
            copies[name].update({key: stats[key] for key in metal.COPY_STATS})
        memory.check_surroundings()
        for name, tensor in contents.items():
            if name == BUFFER_OF["dmask"]:  # zeroed by the caller, then added to
                continue
            if not torch.equal(memory.read(name).view(torch.uint8), tensor.contiguous().view(torch.uint8)):
                raise ReplayError(f"a kernel wrote to the input {name}")
        for name, before in frozen.items():
            if not torch.equal(memory.read(name).view(torch.uint8), before.view(torch.uint8)):
                raise ReplayError(f"the backward wrote to the forward's {name}")
        outputs = {name: memory.read(BUFFER_OF.get(name, name)) for name in output_names(record.call)}
        raised = {name: metal.float_exceptions(bits) for name, bits in flags.items() if bits}
        return Execution(outputs, dict(mma), raised, {name: dict(counts) for name, counts in copies.items()})
    finally:
        memory.free()
        for buffer in transient:
            buffer.free()


# -- the reference ---------------------------------------------------------------------------


def default_scale(call: encode.Call) -> float:
    """The call's scale (1/sqrt(D) when it has none) as the driver passes it: rounded to
    float32 (ccv's alpha is a float)."""
    scale = 1.0 / math.sqrt(call.head_dim) if call.scale is None else call.scale
    return torch.tensor(scale, dtype=torch.float32).item()


def reference(call: encode.Call, inputs: dict, scale: Optional[float] = None) -> dict:
    """PyTorch's math SDPA in float64 on exactly the (dtype-rounded) inputs: out, lse as the
    kernel defines it (log2 of the softmax denominator of scores * scale, i.e.
    logsumexp / ln 2, without dropout), and with grad dq, dk, dv by autograd with the same
    do; with dropout, the keep decisions of metal_flash_sdpa.dropout. [B, S, H, D] like the
    kernel's tensors; lse [B, H, R]."""
    scale = default_scale(call) if scale is None else scale
    q, k, v = (inputs[n].double().transpose(1, 2).requires_grad_(call.grad) for n in ("q", "k", "v"))
    gqa = call.hk != call.heads  # query head h uses key/value head h // (heads / hk); dk, dv sum a group
    mask = None
    if call.mask != "none":
        # The user's mask in float64. A bool mask as F.scaled_dot_product_attention takes it
        # (False = -inf: a row without keys gives 0); aten's math op, called directly, would
        # attend such a row uniformly.
        mask = masks.additive(inputs["mask"], torch.float64)
        if call.mask_grad:  # each batch's and head's own scores' gradient, summed below
            mask = mask.expand(call.batch, call.heads, call.q_len, call.kv_len).clone().requires_grad_()
    dropout = {}
    if call.dropout:  # the kernels' keep decisions (metal_flash_sdpa.dropout), as the op's mask
        from metal_flash_sdpa.dropout import keep_mask

        keep = keep_mask(call.dropout_seed, call.dropout, call.batch, call.heads, call.q_len, call.kv_len)
        dropout = {"dropout_p": call.dropout, "dropout_mask": keep}
    out, _ = torch.ops.aten._scaled_dot_product_attention_math(
        q, k, v, attn_mask=mask, scale=scale, is_causal=call.causal, enable_gqa=gqa, **dropout
    )
    with torch.no_grad():
        keys = k.repeat_interleave(call.heads // call.hk, dim=1)
        scores = (q @ keys.transpose(-1, -2)) * scale
        if call.causal:  # top-left, as is_causal: query i attends keys j <= i
            allowed = torch.ones(call.q_len, call.kv_len, dtype=torch.bool).tril()
            scores = scores.masked_fill(~allowed, float("-inf"))
        if mask is not None:
            lse = masks.kernel_lse(scores, inputs["kernel_mask"])
        else:
            lse = torch.logsumexp(scores, dim=-1) / math.log(2)
        dots = (q.abs() @ keys.abs().transpose(-1, -2)) * abs(scale) / math.log(2)
    result = {"out": out.detach().transpose(1, 2), "lse": lse, "lse_magnitude": dots.amax(dim=-1)}
    if call.grad:
        result.update(_gradients(call, out, q, k, v, mask, inputs["do"].double()))
        if call.mask_grad:  # the mask's own shape: summed over what it broadcasts
            per_head, shape = result["dmask"], call.mask_dims()
            result["dmask"] = per_head.sum_to_size(shape)
            # the kernels add the terms one by one in the mask's dtype: a sum of n rounds n
            # times, each within the dtype's precision of its partial sum, which the sum of
            # the terms' magnitudes bounds (compare: a `_magnitude` scales rtol)
            result["dmask_magnitude"] = per_head.abs().sum_to_size(shape)
    return result


def _gradients(call: encode.Call, out, q, k, v, mask, grad_out) -> dict:
    """dq, dk, dv [B, S, H, D] of ``out`` for ``grad_out`` ([B, S, H, Dv]) by autograd, and
    with the call's mask gradient "dmask", the gradient of ``mask`` as it is given."""
    primals = (q, k, v, mask) if call.mask_grad else (q, k, v)
    grads = torch.autograd.grad(out, primals, grad_out.transpose(1, 2))
    result = {name: grad.transpose(1, 2) for name, grad in zip(("dq", "dk", "dv"), grads)}
    if call.mask_grad:
        result["dmask"] = grads[3]
    return result


def pytorch_result(call: encode.Call, inputs: dict, scale: Optional[float] = None) -> dict:
    """F.scaled_dot_product_attention in the call's dtype on the CPU, with autograd: what
    `check`'s acceptance rule measures PyTorch's own error by. out (and dq, dk, dv) as
    reference() gives them."""
    import torch.nn.functional as F

    scale = default_scale(call) if scale is None else scale
    q, k, v = (inputs[n].transpose(1, 2).requires_grad_(call.grad) for n in ("q", "k", "v"))
    mask = inputs.get("mask")
    if call.mask_grad:
        mask = mask.clone().requires_grad_()
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=call.causal, scale=scale, enable_gqa=call.hk != call.heads
    )
    result = {"out": out.detach().transpose(1, 2)}
    if call.grad:
        result.update(_gradients(call, out, q, k, v, mask, inputs["do"]))
    return result


# -- the comparison --------------------------------------------------------------------------


def tolerances(call: encode.Call) -> dict:
    """(atol, rtol) per output: MFAKernel's promise for out, dq, dk, dv; LSE_TOLERANCE."""
    import metal_flash_sdpa  # noqa: F401  (before the submodule: see README)
    from metal_flash_sdpa.kernels.mfa import MFAKernel

    dtype = call.torch_dtype
    promised = MFAKernel.tolerances[dtype]
    return {name: LSE_TOLERANCE if name == "lse" else promised for name in output_names(call)}


def output_names(call: encode.Call) -> tuple:
    """The outputs a call's kernels write: out and lse; with grad dq, dk, dv; dmask."""
    return (OUTPUTS if call.grad else OUTPUTS[:2]) + (("dmask",) if call.mask_grad else ())


@dataclasses.dataclass
class Comparison:
    """Per output: max |ours - ref|; that over max |ref|; and the share of the tolerance
    used, max |ours - ref| / (atol + rtol |ref|) (NaN where ours is NaN): ok when every
    share is at most 1."""

    max_abs: dict
    max_rel: dict
    used: dict
    tolerance: dict

    @property
    def ok(self) -> bool:
        return all(share <= 1 for share in self.used.values())  # False for NaN


def compare(execution: Execution, expected: dict, tolerance: dict) -> Comparison:
    max_abs, max_rel, used = {}, {}, {}
    for name, (atol, rtol) in tolerance.items():
        ours, ref = execution.outputs[name].double(), expected[name]
        error = (ours - ref).abs()
        worst = error.max().item() if error.numel() else 0.0
        if error.isnan().any():
            worst = math.nan
        scale = ref.abs().max().item() if ref.numel() else 0.0
        max_abs[name] = worst
        max_rel[name] = worst / scale if scale else worst
        magnitude = ref.abs()
        if f"{name}_magnitude" in expected:  # the LSE's: see LSE_TOLERANCE
            magnitude = torch.maximum(magnitude, expected[f"{name}_magnitude"])
        share = (error / (atol + rtol * magnitude)).max().item() if error.numel() else 0.0
        used[name] = math.nan if math.isnan(worst) else share
    return Comparison(max_abs, max_rel, used, dict(tolerance))


def run(
    call: encode.Call, seed: int = 0, offset: int = 0, schedule: str = "round_robin", edit=None, check_refusal: bool = True
) -> dict:
    """Encode ``call``, execute it on seeded random inputs, compare with float64 PyTorch; the
    result as `python tools/mfa_engine.py run` prints it. Raises encode.Refused.
    ``check_refusal=False`` skips MFAKernel.supports() (kernels verified before declared)."""
    started = time.perf_counter()
    inputs = random_inputs(call, seed)
    execution, record = execute_call(call, inputs, offset, schedule, edit, check_refusal)
    comparison = compare(execution, reference(call, inputs), tolerances(call))
    return {
        "ok": comparison.ok,
        "max_abs": _finite(comparison.max_abs),
        "max_rel": _finite(comparison.max_rel),
        "used": _finite(comparison.used),
        "tolerance": {name: {"atol": a, "rtol": r} for name, (a, r) in comparison.tolerance.items()},
        "mma": execution.mma,
        "mask_tile_reads": mask_tile_reads(record),
        "copies": execution.copies(),
        "float_exceptions": execution.float_exceptions,
        "seconds": round(time.perf_counter() - started, 3),
    }


def execute_call(
    call: encode.Call, inputs: dict, offset: int = 0, schedule: str = "round_robin", edit=None, check_refusal: bool = True
) -> tuple:
    """-> (Execution, Record): ``call`` encoded and executed on ``inputs`` (random_inputs'
    form) handed over as MFAKernel hands them (kernel_inputs), its outputs as MFAKernel
    returns them (user_outputs)."""
    record = encode.encode(call, "--offset", str(offset), check_refusal=check_refusal)
    execution = execute(record, kernel_inputs(call, inputs), offset=offset, schedule=schedule, edit=edit)
    execution.outputs = user_outputs(call, execution.outputs)
    return execution, record


def mask_tile_reads(record: encode.Record) -> int:
    """Mask elements the tile summaries read (patch 0013): each mask_tiles_* dispatch reads
    every element of the mask's [Bm, Hm, R, C] once (counted from the record, not measured)."""
    call = record.call
    if call.mask == "none":
        return 0
    bm, hm, _, _ = call.mask_dims()
    summaries = sum(1 for d in record.dispatches if record.kernel_of(d).startswith("mask_tiles_"))
    return summaries * bm * hm * call.q_len * call.kv_len


def _finite(values: dict) -> dict:
    """NaN (an output holds a value no kernel wrote, or garbage) as JSON null."""
    return {name: None if math.isnan(value) else float(f"{value:.3g}") for name, value in values.items()}
