"""The executing Metal shim ("the machine"): Metal Shading Language kernels, as ccv emits them,
compiled for and run on the CPU (DESIGN section 10, rungs 3 and 4).

A source is compiled by clang as C++ for OpenCL (`-x clcpp`) against our Metal standard
library shim (metal/include/metal_stdlib, force-included): address spaces stay real
qualifiers, so ccv's overloads on device / threadgroup pointers stay distinct;
`vec<T, N>` and floatN, halfN, ushort2... are class templates; function constants are
runtime values, so one compile per source serves every length and batch stride. The
source is not rewritten. This module parses the kernel's signature and generates the
entry that binds [[buffer(n)]], [[threadgroup(n)]] and the thread-position attributes,
and the setter of the [[function_constant(n)]] values. Compiled kernels are shared
objects cached under $MFA_ENGINE_CACHE/kernels (default
~/.cache/metal-flash-sdpa/engine/kernels), keyed by the source, the shim, the runtime,
this file and the compiler.

Execution (metal/runtime.cpp): one Metal thread is a fiber; a threadgroup its fibers
sharing threadgroup memory (poisoned with NaN before each threadgroup); threadgroup_barrier
a cooperative barrier; SIMD-group collectives (shuffles, reductions, the 8x8
multiply-accumulate with the lane layout of ccv's morton_order, simdgroup_event async
copies and their wait, simdgroup_barrier) a rendezvous of the lanes of the SIMD group.
Threadgroups of a grid run one after another. Divergence (a thread returning while others
wait at a barrier, lanes at different collectives), deadlock, faults on the caller's guard
pages, stack overflow and integer division by zero stop the launch with
MetalExecutionError; the process lives on. SCHEDULES name the orders in which ready
threads run: round_robin (threads take turns at every blocking point), run_ahead (SIMD
group 0 runs until it waits at a threadgroup barrier, then the next), run_behind (the
last SIMD group first). A missing barrier before a write to threadgroup memory shows under
run_ahead, one after a write under round_robin and run_behind; a race can also need a
shape whose tiles overlap (runtime.cpp says more).

What it cannot show: the real Metal compiler's behaviour (its parser, its optimizations,
its register and threadgroup-memory limits beyond the 32 KiB checked here), GPU rounding
(this is not bit-exact: fast::exp2 and the other fast functions are the C library's, the
multiply-accumulate and SIMD reductions add in their own order, denormals are kept, float
literals are single precision as in Metal but contractions into FMA follow clang), real
concurrency (between threadgroups, and inside a SIMD group: its lanes run one after
another between two collectives, so code that relies on lockstep execution fails here),
and timing. An async copy completes when the SIMD group issues it.

Not supported (unsupported_constructs names them): threadgroup variables declared in a
function body, is_function_constant_defined, textures, atomics, the simdgroup_matrix API,
SIMD-group functions other than shuffles and reductions, __asm intrinsics other than
ccv's async copies.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

from . import build

HERE = pathlib.Path(__file__).resolve().parent
SHIM = HERE / "metal"
INCLUDE = SHIM / "include"
RUNTIME = SHIM / "runtime.cpp"

SCHEDULES = ("round_robin", "run_ahead", "run_behind")

# Metal's limit on threadgroup memory (Apple7 and later) and on buffer indices.
MAX_THREADGROUP_MEMORY = 32768
MAX_BUFFERS = 31
DEFAULT_STACK = 256 * 1024  # ccv's kernels use under 24 KiB (fp32, head dim 384)

# The intrinsics mfa_tail.h defines (ccv's metal_simdgroup_event header, macOS 15 mode).
KNOWN_ASM = frozenset(
    {
        "air.simdgroup_async_copy_1d.p3i8.p1i8",
        "air.simdgroup_async_copy_1d.p1i8.p3i8",
        "air.simdgroup_async_copy_2d.p3i8.p1i8",
        "air.simdgroup_async_copy_2d.p1i8.p3i8",
        "air.wait_simdgroup_events",
    }
)

# Thread-position attributes: the field of struct mfa_ids (mfa_abi.h), and whether it has
# three components.
POSITION_ATTRIBUTES = {
    "threadgroup_position_in_grid": True,
    "thread_position_in_threadgroup": True,
    "thread_position_in_grid": True,
    "threads_per_threadgroup": True,
    "threadgroups_per_grid": True,
    "threads_per_grid": True,
    "thread_index_in_threadgroup": False,
    "simdgroup_index_in_threadgroup": False,
    "thread_index_in_simdgroup": False,
    "threads_per_simdgroup": False,
    "thread_execution_width": False,
    "simdgroups_per_threadgroup": False,
    "quadgroup_index_in_threadgroup": False,
    "thread_index_in_quadgroup": False,
    "quadgroups_per_threadgroup": False,
}
_FIELD = {"thread_execution_width": "threads_per_simdgroup"}


class MetalSyntaxError(Exception):
    """The source does not compile against the shim; the message holds clang's diagnostics."""


class MetalBindingError(ValueError):
    """A launch lacks something the kernel declares (a buffer, a function constant, a
    threadgroup memory length), or asks for more than Metal allows."""


class MetalExecutionError(RuntimeError):
    """The kernel failed while running: divergence, deadlock, a fault, stack overflow."""


# ---------------------------------------------------------------------------------------
# Parsing what the entry code needs


@dataclasses.dataclass(frozen=True)
class Parameter:
    type: str  # declared type text, normalized: "device half*", "uint3"
    name: str
    attribute: str  # buffer, threadgroup, or a thread-position attribute
    index: Optional[int]


def _strip_comments(text: str) -> str:
    """Comments replaced by spaces (newlines kept, so positions stay meaningful)."""

    def blank(match):
        return re.sub(r"[^\n]", " ", match.group(0))

    return re.sub(r"//[^\n]*|/\*.*?\*/", blank, text, flags=re.S)


def _normalize_type(text: str) -> str:
    text = " ".join(text.split())
    return re.sub(r"\s*([*&])", r"\1", text)


_KERNEL = re.compile(r"\bkernel\s+void\s+([A-Za-z_]\w*)\s*\(")
_PARAMETER = re.compile(
    r"^(?P<decl>.*?)\s*\[\[\s*(?P<attr>[A-Za-z_]\w*)\s*(?:\(\s*(?P<arg>[^)]*?)\s*\))?\s*\]\]\s*$", re.S
)
_CONSTANT = re.compile(
    r"\bconstant\s+(?P<type>[A-Za-z_]\w*)\s+(?P<name>[A-Za-z_]\w*)"
    r"\s*\[\[\s*function_constant\(\s*(?P<index>\d+)\s*\)\s*\]\]"
)
_ASM = re.compile(r"__asm\s*\(\s*\"([^\"]*)\"\s*\)")


def kernel_functions(source: str) -> list[str]:
    """The names of the `kernel void` functions the source defines."""
    return _KERNEL.findall(_strip_comments(source))


def _split_top_level(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([<{":
            depth += 1
        elif ch in ")]>}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def signature(source: str, function: str) -> list[Parameter]:
    """The parameters of `kernel void function(...)` with their attributes."""
    text = _strip_comments(source)
    for match in _KERNEL.finditer(text):
        if match.group(1) == function:
            break
    else:
        found = kernel_functions(source)
        raise MetalSyntaxError(f"the source defines no kernel function {function!r} (it has {found})")
    depth, i = 1, match.end()
    while depth and i < len(text):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    out = []
    for part in _split_top_level(text[match.end() : i - 1]):
        m = _PARAMETER.match(part)
        if not m:
            raise MetalSyntaxError(f"kernel {function}: parameter {' '.join(part.split())!r} has no attribute")
        decl = m.group("decl").strip()
        name = re.search(r"([A-Za-z_]\w*)\s*$", decl)
        if not name:
            raise MetalSyntaxError(f"kernel {function}: cannot read parameter {' '.join(part.split())!r}")
        attr, arg = m.group("attr"), m.group("arg")
        if attr in ("buffer", "threadgroup"):
            if arg is None or not arg.isdigit():
                raise MetalSyntaxError(f"kernel {function}: [[{attr}]] of {name.group(1)} needs an index")
            index = int(arg)
        elif attr in POSITION_ATTRIBUTES:
            index = None
        else:
            raise MetalSyntaxError(f"kernel {function}: parameter attribute [[{attr}]] is not supported by the shim")
        out.append(Parameter(_normalize_type(decl[: name.start()]), name.group(1), attr, index))
    return out


def function_constants(source: str) -> dict[int, tuple[str, str]]:
    """[[function_constant(n)]] declarations: index -> (name, type)."""
    return {int(m["index"]): (m["name"], m["type"]) for m in _CONSTANT.finditer(_strip_comments(source))}


def _entry(function: str, params: list[Parameter], entry_name: str) -> str:
    args = []
    for p in params:
        if p.attribute == "buffer":
            if p.type.endswith("&"):
                args.append(f"*({p.type[:-1]}*)__mfa_rt_buffer({p.index})")
            else:
                args.append(f"({p.type})__mfa_rt_buffer({p.index})")
        elif p.attribute == "threadgroup":
            args.append(f"({p.type})__mfa_rt_threadgroup({p.index})")
        else:
            field = _FIELD.get(p.attribute, p.attribute)
            ref = f"ids->{field}" if POSITION_ATTRIBUTES[p.attribute] else f"&ids->{field}"
            bare = re.sub(r"\bconst\b", "", p.type).strip()
            args.append(f"__mfa_attr<{bare}>({ref})")
    joined = ",\n    ".join(args)
    return f'extern "C" void {entry_name}(const struct mfa_ids* ids) {{\n  {function}(\n    {joined});\n}}\n'


def _constant_setter(constants: dict[int, tuple[str, str]]) -> str:
    cases = "".join(
        f"  case {index}: {{\n"
        f"    if (size != sizeof({name})) return -1;\n"
        f"    unsigned char* d = (unsigned char*)&{name};\n"
        f"    for (unsigned long i = 0; i < size; ++i) d[i] = ((const unsigned char*)data)[i];\n"
        f"    return 0;\n  }}\n"
        for index, (name, _) in sorted(constants.items())
    )
    return (
        'extern "C" __attribute__((visibility("default")))\n'
        "int mfa_set_constant(int index, const void* data, unsigned long size) {\n"
        f"  switch (index) {{\n{cases}  }}\n  return -2;\n}}\n"
    )


def _unit(source_path: pathlib.Path, source: str, functions: list[str], entry: bool) -> str:
    """The translation unit: the source as it is, the tail, the generated entry code."""
    out = [f'#include "{source_path}"', '#include "mfa_tail.h"']
    for function in functions:
        params = signature(source, function)
        name = "__mfa_thread_main" if entry else f"__mfa_check_{function}"
        out.append(_entry(function, params, name))
    out.append(_constant_setter(function_constants(source)))
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------
# Compiling


def _cache() -> pathlib.Path:
    root = os.environ.get("MFA_ENGINE_CACHE")
    base = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "metal-flash-sdpa" / "engine"
    path = base / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _kernel_flags() -> list[str]:
    return [
        "-x", "clcpp", "-cl-std=clc++2021", "-cl-no-stdinc", "-cl-single-precision-constant",
        "-fdeclspec", "--target=x86_64-linux-gnu", "-O1", "-fPIC", "-fvisibility=hidden",
        "-w", f"-I{INCLUDE}", "-include", "metal_stdlib",
    ]  # fmt: skip


_RUNTIME_FLAGS = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-w", f"-I{SHIM}"]


def _shim_digest() -> str:
    h = hashlib.sha256()
    for path in sorted(INCLUDE.iterdir()) + [RUNTIME, pathlib.Path(__file__)]:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    compiler = build.clang()
    h.update(compiler.encode())
    h.update(pathlib.Path(compiler).resolve().name.encode())
    return h.hexdigest()


_lock = threading.RLock()
_loaded: dict[str, "Kernel"] = {}
_runtime_objects: dict[str, pathlib.Path] = {}


def _run(cmd: list[str], cwd: Optional[pathlib.Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def _diagnostics(stderr: str, source_path: pathlib.Path) -> str:
    text = stderr.replace(str(source_path), "<metal source>")
    return re.sub(r"\S*/unit\.cl", "<entry code>", text).strip()


def _runtime_object(shim: str) -> pathlib.Path:
    with _lock:
        if shim in _runtime_objects:
            return _runtime_objects[shim]
    path = _cache() / f"runtime-{shim[:20]}.o"
    if not path.exists():
        with tempfile.TemporaryDirectory(prefix="mfa-metal-") as tmp:
            obj = pathlib.Path(tmp) / "runtime.o"
            result = _run([build.clang(), *_RUNTIME_FLAGS, "-c", str(RUNTIME), "-o", str(obj)])
            if result.returncode != 0:
                raise RuntimeError(f"the shim's runtime does not compile:\n{result.stderr}")
            _publish(obj, path)
    with _lock:
        _runtime_objects[shim] = path
    return path


def syntax_check(source: str) -> None:
    """Rung 3: the source compiles against the shim (clang -fsyntax-only), its kernels'
    signatures can be bound, and it declares no intrinsic the shim lacks. Raises
    MetalSyntaxError with clang's diagnostics."""
    unknown = sorted(set(_ASM.findall(source)) - KNOWN_ASM)
    if unknown:
        raise MetalSyntaxError(f"the source declares intrinsics the shim does not define: {', '.join(unknown)}")
    _clang_check(source)


def _clang_check(source: str) -> None:
    with tempfile.TemporaryDirectory(prefix="mfa-metal-") as tmp:
        tmp = pathlib.Path(tmp)
        src = tmp / "kernel.metal"
        src.write_text(source)
        (tmp / "unit.cl").write_text(_unit(src, source, kernel_functions(source), entry=False))
        result = _run([build.clang(), *_kernel_flags(), "-fsyntax-only", str(tmp / "unit.cl")])
        if result.returncode != 0:
            raise MetalSyntaxError(_diagnostics(result.stderr, src))


_UNDECLARED = [
    (re.compile(r"use of undeclared identifier '([^']+)'"), "{}"),
    (re.compile(r"unknown type name '([^']+)'"), "{}"),
    (re.compile(r"no member named '([^']+)' in"), ".{}"),
    (re.compile(r"no template named '([^']+)'"), "{}"),
    (re.compile(r"no matching function for call to '([^']+)'"), "{}()"),
    (
        re.compile(r"non-kernel function variable cannot be declared in local address space"),
        "threadgroup variable declared in a function body",
    ),
]


def unsupported_constructs(source: str) -> list[str]:
    """What in the source the shim cannot compile or execute, by name ([] if nothing): an
    intrinsic it does not define, is_function_constant_defined (function constants are
    always defined here), a parameter attribute it cannot bind, and what clang reports as
    undeclared or unmatched against the shim."""
    found = [f'__asm("{label}")' for label in sorted(set(_ASM.findall(source)) - KNOWN_ASM)]
    if "is_function_constant_defined" in _strip_comments(source):
        found.append("is_function_constant_defined")
    try:
        _clang_check(source)
    except MetalSyntaxError as error:
        message = str(error)
        named = []
        for pattern, form in _UNDECLARED:
            for m in pattern.finditer(message):
                named.append(form.format(*m.groups()))
        for line in message.splitlines():
            if line.startswith("kernel ") or line.startswith("the source defines"):
                named.append(line)
        if not named:
            first = next((ln for ln in message.splitlines() if "error:" in ln), message.splitlines()[0])
            named.append(first.split("error:", 1)[-1].strip())
        found += [n for n in dict.fromkeys(named) if n not in found]
    return found


def load_kernel(source: str, function: str) -> "Kernel":
    """The kernel `function` of `source`, compiled (or taken from the cache) and loaded.
    Safe to call from several threads: compiles run in parallel, loads one at a time."""
    shim = _shim_digest()
    key = hashlib.sha256(f"{shim}\0{function}\0".encode() + source.encode()).hexdigest()[:24]
    with _lock:
        if key in _loaded:
            return _loaded[key]
    params = signature(source, function)
    constants = function_constants(source)
    path = _cache() / f"{function}-{key}.so"
    if not path.exists():
        _compile(source, function, path, _runtime_object(shim))
    with _lock:
        if key not in _loaded:
            _loaded[key] = Kernel(function, path, params, constants)
        return _loaded[key]


def _publish(built: pathlib.Path, path: pathlib.Path) -> None:
    """Move a built file into the cache atomically (another process may be doing the same)."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    shutil.move(str(built), tmp)
    os.replace(tmp, path)


def _compile(source: str, function: str, path: pathlib.Path, runtime: pathlib.Path) -> None:
    unknown = sorted(set(_ASM.findall(source)) - KNOWN_ASM)
    if unknown:
        raise MetalSyntaxError(f"the source declares intrinsics the shim does not define: {', '.join(unknown)}")
    with tempfile.TemporaryDirectory(prefix="mfa-metal-") as tmp:
        tmp = pathlib.Path(tmp)
        src = tmp / "kernel.metal"
        src.write_text(source)
        (tmp / "unit.cl").write_text(_unit(src, source, [function], entry=True))
        compiler = build.clang()
        result = _run([compiler, *_kernel_flags(), "-c", str(tmp / "unit.cl"), "-o", str(tmp / "unit.o")])
        if result.returncode != 0:
            raise MetalSyntaxError(_diagnostics(result.stderr, src))
        so = tmp / "kernel.so"
        link = [compiler, "-shared", "-o", str(so), str(tmp / "unit.o"), str(runtime)]
        result = _run(link + ["-Wl,--no-undefined", "-Wl,-Bsymbolic", "-lm"])
        if result.returncode != 0:
            raise MetalSyntaxError(f"linking kernel {function} failed:\n{_diagnostics(result.stderr, src)}")
        _publish(so, path)


# ---------------------------------------------------------------------------------------
# Running


class _Launch(ctypes.Structure):
    _fields_ = [
        ("grid", ctypes.c_uint32 * 3),
        ("group", ctypes.c_uint32 * 3),
        ("buffers", ctypes.c_void_p * 32),
        ("threadgroup_length", ctypes.c_uint64 * 32),
        ("schedule", ctypes.c_int),
        ("stack_size", ctypes.c_uint64),
    ]


# The counts of the copies a kernel's threads make themselves (ccv patch 0014).
COPY_STATS = ("copy_elements", "copy_critical", "copy_floor", "copy_device_bytes", "copy_wide_bytes")
STAT_NAMES = (
    "mma", "threadgroups", "threads", "barriers", "simd_collectives", "async_copies", "async_copy_bytes", "switches",
    "float_exceptions", *COPY_STATS,
)  # fmt: skip
# The float exceptions a launch reports (<fenv.h> on x86-64): an operation that made a NaN, an
# infinity from a division by zero, or an infinity from a finite overflow.
FLOAT_EXCEPTIONS = {"invalid": 0x01, "divide_by_zero": 0x04, "overflow": 0x08}


def float_exceptions(flags: int) -> list[str]:
    """The names of the float exceptions in a launch's ``float_exceptions`` count."""
    return [name for name, bit in FLOAT_EXCEPTIONS.items() if flags & bit]


class _Stats(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in STAT_NAMES]


class Kernel:
    """One kernel function of one source, compiled and loaded."""

    def __init__(
        self, function: str, path: pathlib.Path, params: list[Parameter], constants: dict[int, tuple[str, str]]
    ):
        self.function = function
        self.path = path
        self.parameters = params
        # [[buffer(n)]] -> declared type text, e.g. "device half*"
        self.buffers: dict[int, str] = {p.index: p.type for p in params if p.attribute == "buffer"}
        # [[function_constant(n)]] -> (name, type)
        self.constants: dict[int, tuple[str, str]] = dict(constants)
        # [[threadgroup(n)]] indices
        self.threadgroup: list[int] = sorted(p.index for p in params if p.attribute == "threadgroup")
        # thread-position attributes the kernel takes: parameter name -> attribute
        self.attributes: dict[str, str] = {p.name: p.attribute for p in params if p.index is None}
        self._lib = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
        self._launch = self._lib.mfa_launch
        self._launch.argtypes = [ctypes.POINTER(_Launch), ctypes.POINTER(_Stats), ctypes.c_char_p, ctypes.c_size_t]
        self._launch.restype = ctypes.c_int
        self._set_constant = self._lib.mfa_set_constant
        self._set_constant.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong]
        self._set_constant.restype = ctypes.c_int

    def __repr__(self):
        return f"<metal.Kernel {self.function} {self.path.name}>"

    def run(
        self,
        grid,
        group,
        buffers: dict[int, int],
        constants: dict[int, bytes],
        threadgroup_memory: dict[int, int],
        schedule: str = "round_robin",
    ) -> dict:
        """One dispatchThreadgroups(grid, group). buffers: [[buffer(n)]] -> host address
        (offset applied); constants: [[function_constant(n)]] -> little-endian bytes;
        threadgroup_memory: [[threadgroup(n)]] -> bytes. Extra entries (bindings a kernel
        does not declare) are ignored, as Metal ignores them. Returns counts: mma (8x8
        multiply-accumulates executed), threadgroups, threads, barriers, simd_collectives,
        async_copies, async_copy_bytes, switches, float_exceptions (float_exceptions()
        names them), and the copies the threads make themselves (ccv patch 0014's hooks):
        copy_elements (of the tiles), copy_critical (over copies, the most one thread wrote times the
        threadgroup's threads), copy_floor (the same for the most even split into 8-byte
        accesses), copy_device_bytes and copy_wide_bytes (moved by accesses of 8 bytes or
        more)."""
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule {schedule!r} is not one of {SCHEDULES}")
        grid, group = _size(grid, "grid"), _size(group, "group")
        missing = sorted(set(self.buffers) - set(buffers))
        if missing:
            types = [self.buffers[i] for i in missing]
            raise MetalBindingError(f"{self.function}: no buffer bound at index {missing} ({types})")
        missing = sorted(set(self.constants) - set(constants))
        if missing:
            names = [self.constants[i][0] for i in missing]
            raise MetalBindingError(f"{self.function}: function constants {missing} ({names}) are not set")
        missing = sorted(set(self.threadgroup) - set(threadgroup_memory))
        if missing:
            raise MetalBindingError(f"{self.function}: no threadgroup memory length at index {missing}")
        launch = _Launch()
        launch.grid[:] = grid
        launch.group[:] = group
        for index in self.buffers:
            if not 0 <= index <= MAX_BUFFERS or not buffers[index]:
                raise MetalBindingError(f"{self.function}: buffer {index} has address {buffers[index]}")
            launch.buffers[index] = buffers[index]
        total = 0
        for index in self.threadgroup:
            length = int(threadgroup_memory[index])
            if length <= 0 or length % 16:
                raise MetalBindingError(
                    f"{self.function}: threadgroup memory {index} is {length} bytes (Metal needs a positive multiple of 16)"
                )
            launch.threadgroup_length[index] = length
            total += length
        if total > MAX_THREADGROUP_MEMORY:
            raise MetalBindingError(
                f"{self.function}: {total} bytes of threadgroup memory (Metal allows {MAX_THREADGROUP_MEMORY})"
            )
        launch.schedule = SCHEDULES.index(schedule)
        launch.stack_size = int(os.environ.get("MFA_ENGINE_STACK", DEFAULT_STACK))
        stats = _Stats()
        error = ctypes.create_string_buffer(1024)
        with _lock:
            for index, (name, _) in self.constants.items():
                data = bytes(constants[index])
                code = self._set_constant(index, data, len(data))
                if code == -1:
                    raise MetalBindingError(
                        f"{self.function}: function constant {index} ({name}) given {len(data)} bytes, not its size"
                    )
                if code != 0:
                    raise MetalBindingError(f"{self.function}: cannot set function constant {index} ({name})")
            code = self._launch(ctypes.byref(launch), ctypes.byref(stats), error, len(error))
        if code != 0:
            raise MetalExecutionError(f"{self.function}: {error.value.decode(errors='replace')}")
        return {name: getattr(stats, name) for name in STAT_NAMES}


def _size(value, what: str) -> tuple[int, int, int]:
    value = tuple(int(v) for v in value)
    if len(value) != 3 or min(value) < 1:
        raise ValueError(f"{what} must be three positive integers, not {value}")
    return value
