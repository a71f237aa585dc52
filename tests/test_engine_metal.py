"""The executing Metal shim itself (tools/engine/metal.py, tools/engine/metal/): the syntax
check (rung 3) and the machine that runs Metal kernels on the CPU (rung 4), on small
hand-written kernels whose right answer is known, and on one source ccv emits.

Mutation checks of the machine: a planted syntax error is rejected; a removed barrier shows
a race under the run_ahead or run_behind schedule (and the intact kernel never does); a
wrong lane layout for the 8x8 multiply-accumulate gives wrong numbers. Skips with one line
where clang (or, for the emitted source, ccv's sources) is missing, unless
MFA_ENGINE_REQUIRED=1.
"""

import ctypes
import mmap
import struct

import pytest
import torch

from engine_setup import engine_required  # puts tools/ on sys.path

from engine import build  # noqa: E402  (after engine_setup)


@pytest.fixture(scope="module")
def metal():
    with engine_required():
        build.clang()
    from engine import metal

    return metal


@pytest.fixture(scope="module")
def emitted(metal):
    """The sources of an fp16 forward and backward as ccv emits them (macOS 15 mode)."""
    from engine import encode

    with engine_required():
        record = encode.encode(
            encode.Call(dtype="fp16", heads=2, q_len=33, kv_len=47, head_dim=24, grad=True, macos=15),
            check_refusal=False,
        )
    return {kernel.name: kernel.source for kernel in record.kernels()}


def u32(value):
    return int(value).to_bytes(4, "little")


# --- rung 3 -------------------------------------------------------------------------------


def test_syntax_check_accepts_emitted_sources(metal, emitted):
    assert set(emitted) >= {"attention_forward", "attention_backward_query", "attention_backward_key_value"}
    for source in emitted.values():
        metal.syntax_check(source)
        assert metal.unsupported_constructs(source) == []


def test_syntax_check_rejects_a_planted_error(metal, emitted):
    source = emitted["attention_forward"]
    assert "simd_shuffle_xor(m_new, 1)" in source
    with pytest.raises(metal.MetalSyntaxError, match="m_new_planted"):
        metal.syntax_check(source.replace("simd_shuffle_xor(m_new, 1)", "simd_shuffle_xor(m_new_planted, 1)", 1))


def test_unsupported_constructs_are_named(metal):
    source = """
    #include <metal_stdlib>
    using namespace metal;
    void mystery(int) __asm("air.mystery_intrinsic");
    kernel void k(device float* out [[buffer(0)]], ushort lane [[thread_index_in_simdgroup]]) {
      out[lane] = simd_mystery_reduce(float(lane));
    }
    """
    found = metal.unsupported_constructs(source)
    assert '__asm("air.mystery_intrinsic")' in found
    assert "simd_mystery_reduce" in found
    attribute = "kernel void k(device float* out [[buffer(0)]], uint q [[pixel_position]]) {}"
    assert any("pixel_position" in item for item in metal.unsupported_constructs(attribute))


def test_emitted_cast_kernel(metal, emitted):
    """ccv's cast kernel: float4 -> half4 by thread_position_in_grid, `count` a function
    constant, the threads past it returning at once."""
    kernel = metal.load_kernel(emitted["cast_float_to_half"], "cast")
    assert set(kernel.buffers) == {0, 1} and kernel.attributes == {"tpig": "thread_position_in_grid"}
    (index, (name, _)), = kernel.constants.items()
    assert name == "count"
    source, destination = torch.randn(37, 4), torch.zeros(40, 4, dtype=torch.float16)
    kernel.run((2, 1, 1), (32, 1, 1), {0: source.data_ptr(), 1: destination.data_ptr()}, {index: u32(37)}, {})
    assert torch.equal(destination[:37], source.half()) and not destination[37:].any()


# --- the machine --------------------------------------------------------------------------

ADD = """
#include <metal_stdlib>
using namespace metal;
constant uint n [[function_constant(0)]];
kernel void add(device const float* a [[buffer(0)]], device half* b [[buffer(1)]],
                uint3 position [[thread_position_in_grid]]) {
  if (position.x < n) b[position.x] = half(a[position.x] + 1.0);
}
"""


def test_declared_bindings_are_required(metal):
    kernel = metal.load_kernel(ADD, "add")
    assert kernel.buffers == {0: "device const float*", 1: "device half*"}
    assert kernel.constants == {0: ("n", "uint")}
    assert kernel.threadgroup == []
    a, b = torch.arange(100, dtype=torch.float32), torch.zeros(100, dtype=torch.float16)
    with pytest.raises(metal.MetalBindingError, match="buffer"):
        kernel.run((4, 1, 1), (32, 1, 1), {0: a.data_ptr()}, {0: u32(100)}, {})
    with pytest.raises(metal.MetalBindingError, match="function constant"):
        kernel.run((4, 1, 1), (32, 1, 1), {0: a.data_ptr(), 1: b.data_ptr()}, {}, {})
    # One compile serves every value of the function constant.
    for n in (50, 100):
        b.zero_()
        kernel.run((4, 1, 1), (32, 1, 1), {0: a.data_ptr(), 1: b.data_ptr()}, {0: u32(n)}, {})
        assert torch.equal(b[:n], (a[:n] + 1).half()) and not b[n:].any()


SCALE = """
#include <metal_stdlib>
using namespace metal;
constant float factor [[function_constant(0)]];
kernel void scale(device const float* a [[buffer(0)]], device float* b [[buffer(1)]],
                  ushort i [[thread_index_in_threadgroup]]) {
  float x = a[i] * factor;
  threadgroup_barrier(mem_flags::mem_none);
  b[i] = x;
}
"""


def test_float_exceptions_of_any_thread_are_reported(metal):
    """A launch reports the overflow one thread of one threadgroup raised, however many
    switches between threads came after it; a launch without one reports none."""
    kernel = metal.load_kernel(SCALE, "scale")
    a, b = torch.ones(64), torch.zeros(64)
    a[45] = 1e30
    for factor, expected in ((2.0, []), (1e10, ["overflow"])):
        stats = kernel.run((1, 1, 1), (64, 1, 1), {0: a.data_ptr(), 1: b.data_ptr()}, {0: struct.pack("<f", factor)}, {})
        assert metal.float_exceptions(stats["float_exceptions"]) == expected, factor
        assert torch.equal(b, a * factor)


EXCHANGE = """
#include <metal_stdlib>
using namespace metal;
// Each thread stores its value; after the barrier it reads the value of the thread at the
// same lane of the next SIMD group and adds its SIMD neighbour's (lane ^ 1) by shuffle.
kernel void exchange(device const float* in [[buffer(0)]], device float* out [[buffer(1)]],
                     threadgroup float* shared [[threadgroup(0)]],
                     uint3 group [[threadgroup_position_in_grid]],
                     ushort tid [[thread_index_in_threadgroup]],
                     ushort sidx [[simdgroup_index_in_threadgroup]],
                     ushort lane [[thread_index_in_simdgroup]],
                     ushort simds [[simdgroups_per_threadgroup]]) {
  uint base = group.x * simds * 32;
  shared[tid] = in[base + tid];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float other = shared[((sidx + 1) % simds) * 32 + lane];
  out[base + tid] = other + simd_shuffle_xor(other, 1) + simd_sum(1.0f);
}
"""


@pytest.mark.parametrize("schedule", ["round_robin", "run_ahead", "run_behind"])
def test_shuffle_and_barrier(metal, schedule):
    assert schedule in metal.SCHEDULES
    kernel = metal.load_kernel(EXCHANGE, "exchange")
    groups, simds = 3, 4
    x = torch.randn(groups, simds, 32)
    out = torch.zeros_like(x)
    buffers = {0: x.data_ptr(), 1: out.data_ptr()}
    stats = kernel.run((groups, 1, 1), (simds * 32, 1, 1), buffers, {}, {0: simds * 32 * 4}, schedule=schedule)
    other = x.roll(-1, dims=1)
    lane = torch.arange(32)
    expected = other + other[:, :, lane ^ 1] + 32
    assert torch.allclose(out, expected)
    assert stats["threadgroups"] == groups and stats["barriers"] == groups
    assert stats["simd_collectives"] == 2 * groups * simds


# SIMD group 0 writes the shared tile; after a barrier every SIMD group reads it, reduces
# across its lanes (a collective: where round-robin switches threads) and, after barrier B,
# SIMD group 0 overwrites the tile. Without B, a schedule in which SIMD group 0 runs ahead
# overwrites the tile before the others read it (a write-after-read race).
RACE = """
#include <metal_stdlib>
using namespace metal;
kernel void race(device float* out [[buffer(0)]], threadgroup float* tile [[threadgroup(0)]],
                 ushort sidx [[simdgroup_index_in_threadgroup]],
                 ushort lane [[thread_index_in_simdgroup]]) {
  if (sidx == 0) tile[lane] = float(lane);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float v = tile[lane];
  v = simd_sum(v);
  BARRIER_B
  if (sidx == 0) tile[lane] = -1.0f;
  out[sidx * 32 + lane] = v;
}
"""


def _race(metal, source, schedule):
    kernel = metal.load_kernel(source, "race")
    out = torch.zeros(4, 32)
    kernel.run((1, 1, 1), (128, 1, 1), {0: out.data_ptr()}, {}, {0: 128}, schedule=schedule)
    return torch.equal(out, torch.full_like(out, sum(range(32))))


def test_removed_barrier_shows_a_race(metal):
    intact = RACE.replace("BARRIER_B", "threadgroup_barrier(mem_flags::mem_threadgroup);")
    removed = RACE.replace("BARRIER_B", "")
    for schedule in metal.SCHEDULES:
        assert _race(metal, intact, schedule), schedule
    assert not _race(metal, removed, "run_ahead")
    # Round-robin switches at the reduction, so every SIMD group reads before the overwrite:
    # it hides this race (which is why run_ahead exists).
    assert _race(metal, removed, "round_robin")


def test_read_before_write_shows_under_run_behind(metal):
    """A read-after-write race: the reader SIMD groups run before SIMD group 0's write and
    read the NaN poison of threadgroup memory."""
    source = """
    #include <metal_stdlib>
    using namespace metal;
    kernel void raw(device float* out [[buffer(0)]], threadgroup float* tile [[threadgroup(0)]],
                    ushort sidx [[simdgroup_index_in_threadgroup]], ushort lane [[thread_index_in_simdgroup]]) {
      float v = simd_sum(float(lane));
      if (sidx == 0) tile[lane] = v;
      BARRIER
      out[sidx * 32 + lane] = tile[lane];
    }
    """
    for barrier, right in (("threadgroup_barrier(mem_flags::mem_threadgroup);", True), ("", False)):
        kernel = metal.load_kernel(source.replace("BARRIER", barrier), "raw")
        out = torch.zeros(2, 32)
        kernel.run((1, 1, 1), (64, 1, 1), {0: out.data_ptr()}, {}, {0: 128}, schedule="run_behind")
        assert torch.equal(out, torch.full_like(out, sum(range(32)))) is right
        if not right:
            assert out[1].isnan().all()


MMA = """
#include <metal_stdlib>
using namespace metal;
METAL_FUNC ushort2 morton_order(ushort lane_id) {  // as ccv's simdgroup_matrix_storage
  ushort quad_id = lane_id / 4;
  ushort M = (quad_id / 4) * 4 + (lane_id / 2) % 4;
  ushort N = (quad_id & 2) * 2 + (lane_id % 2) * 2;
  return ushort2(N, M);
}
kernel void mma(device const float* A [[buffer(0)]], device const half* B [[buffer(1)]],
                device float* C [[buffer(2)]], ushort sidx [[simdgroup_index_in_threadgroup]],
                ushort lane [[thread_index_in_simdgroup]]) {
  ushort2 at = LAYOUT;
  uint e = sidx * 64 + at.y * 8 + at.x;
  vec<float, 64> a, c;
  vec<half, 64> b;
  a[0] = A[e]; a[1] = A[e + 1];
  b[0] = B[e]; b[1] = B[e + 1];
  c[0] = C[e]; c[1] = C[e + 1];
  c = __metal_simdgroup_matrix_8x8_multiply_accumulate(a, b, c, vec<float, 64>());
  C[e] = c[0]; C[e + 1] = c[1];
}
"""


def test_multiply_accumulate_uses_the_lane_layout(metal):
    a = torch.randn(2, 8, 8)
    b = torch.randn(2, 8, 8).half()
    c = torch.randn(2, 8, 8)
    expected = a.double() @ b.double() + c.double()
    for layout, right in (("morton_order(lane)", True), ("morton_order(lane).yx", False)):
        kernel = metal.load_kernel(MMA.replace("LAYOUT", layout), "mma")
        out = c.clone()
        stats = kernel.run((1, 1, 1), (64, 1, 1), {0: a.data_ptr(), 1: b.data_ptr(), 2: out.data_ptr()}, {}, {})
        assert stats["mma"] == 2
        error = (out.double() - expected).abs().max().item()
        assert (error < 1e-5) is right, (layout, error)


def test_divergence_and_faults_are_errors(metal):
    source = """
    #include <metal_stdlib>
    using namespace metal;
    kernel void k(device float* out [[buffer(0)]], ushort lane [[thread_index_in_simdgroup]],
                  ushort tid [[thread_index_in_threadgroup]]) {
      if (MODE == 0 && lane == 5) return;
      if (MODE == 1 && tid < 32) threadgroup_barrier(mem_flags::mem_none);
      if (MODE == 2 && lane < 16) threadgroup_barrier(mem_flags::mem_none);
      out[tid] = simd_sum(float(lane));
    }
    """
    out = torch.zeros(64)
    # A lane returns before a collective; a SIMD group returns while the other waits at a
    # barrier; half of each SIMD group waits at a barrier, half at a collective.
    expected = ((0, "divergence: .* returned"), (1, "divergence: .* wait at threadgroup_barrier"), (2, "deadlock"))
    for mode, message in expected:
        kernel = metal.load_kernel(source.replace("MODE", str(mode)), "k")
        with pytest.raises(metal.MetalExecutionError, match=message):
            kernel.run((1, 1, 1), (64, 1, 1), {0: out.data_ptr()}, {}, {})
    # A store into a guard page stops the launch; the process lives on.
    libc = ctypes.CDLL(None)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    prot_none = 0
    guard = libc.mmap(None, mmap.PAGESIZE, prot_none, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    kernel = metal.load_kernel(source.replace("MODE", "3"), "k")
    try:
        with pytest.raises(metal.MetalExecutionError, match="invalid memory access"):
            kernel.run((1, 1, 1), (64, 1, 1), {0: guard}, {}, {})
    finally:
        libc.munmap(guard, mmap.PAGESIZE)
    kernel.run((1, 1, 1), (64, 1, 1), {0: out.data_ptr()}, {}, {})
    assert torch.equal(out, torch.full_like(out, sum(range(32))))
