// The executing runtime of the Metal shim (tools/engine/metal.py): runs one dispatch of a
// kernel compiled against include/metal_stdlib on the calling CPU thread.
//
// One Metal thread is one fiber with its own stack, switched by a few lines of x86-64
// assembly (glibc's swapcontext makes a system call per switch). A threadgroup is its
// fibers sharing the threadgroup memory; threadgroups run one after another. Blocking
// points are cooperative:
//   threadgroup_barrier          every thread of the threadgroup arrives, then all go on;
//   SIMD-group collectives       (shuffles, reductions, the 8x8 multiply-accumulate, async
//                                copies and their wait, simdgroup_barrier) every lane of the
//                                SIMD group deposits its operand, the last to arrive
//                                completes the operation, all read their result.
// A thread that returns while others wait at a barrier or collective, a thread that
// reaches one after another returned, lanes at different collectives, and a deadlock are
// errors, as are faults (the caller's guard pages), stack overflow and integer division
// by zero, and in the copies threads make themselves (ccv patch 0014's hooks) an access
// not aligned to its size, a copy not every thread made or whose threads did not write
// each element of its tile once: the launch stops and returns the message.
//
// Schedules (the order in which ready fibers run, which decides what a race shows):
//   round_robin  fibers take turns; each yields at every barrier and collective. SIMD
//                groups move in step, which hides most write-after-read races.
//   run_ahead    one SIMD group runs until all its lanes wait at a threadgroup barrier or
//                returned, then the next; SIMD group 0 first, and first again after every
//                threadgroup barrier. A SIMD group that overwrites threadgroup memory before
//                the others have read it (a missing barrier) shows.
//   run_behind   as run_ahead, from the last SIMD group to the first: the readers run before
//                the SIMD group that writes what they read (ccv's async copies are SIMD
//                group 0's).
// Lanes of one SIMD group run one after another between two collectives (the GPU runs
// them in lockstep, which Metal does not promise): code relying on that fails here.
// Threadgroup memory is filled with 0x7FC07FC0 (a quiet NaN as float, half and bfloat)
// before each threadgroup.
#include <cfenv>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "include/mfa_abi.h"

#define MFA_EXPORT extern "C" __attribute__((visibility("default")))

// ---------------------------------------------------------------------------------------
// Context switch: saves the callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *from and continues on the stack `to`. MXCSR's
// exception flags raised so far travel on (ORed into the incoming context's), so the
// scheduler sees every float exception any thread raised (Stats::float_exceptions).
extern "C" void mfa_switch(void** from, void* to);
extern "C" void mfa_fiber_entry();
asm(R"(
  .text
  .globl mfa_switch
  .hidden mfa_switch
  .type mfa_switch, @function
mfa_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movl (%rsp), %eax
  andl $0x3f, %eax
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  orl %eax, (%rsp)
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mfa_switch, .-mfa_switch

  .globl mfa_fiber_entry
  .hidden mfa_fiber_entry
  .type mfa_fiber_entry, @function
mfa_fiber_entry:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size mfa_fiber_entry, .-mfa_fiber_entry
)");

namespace {

enum State : uint8_t { READY, WAIT_SIMD, WAIT_GROUP, DONE };
enum Schedule { ROUND_ROBIN = 0, RUN_AHEAD = 1, RUN_BEHIND = 2 };

const char* kind_name(int kind) {
  switch (kind) {
    case MFA_SIMD_BARRIER: return "simdgroup_barrier";
    case MFA_SIMD_SHUFFLE: return "a SIMD shuffle";
    case MFA_SIMD_REDUCE: return "a SIMD reduction";
    case MFA_SIMD_MMA: return "the 8x8 multiply-accumulate";
    case MFA_SIMD_ASYNC_COPY: return "a simdgroup async copy";
    case MFA_SIMD_WAIT: return "a simdgroup event wait";
  }
  return "a SIMD-group function";
}

struct Fiber {
  void* sp = nullptr;
  State state = DONE;
  uint32_t index = 0, simd = 0, lane = 0;
  uint32_t copies = 0;  // MFA_COPY_DONE calls so far
  mfa_ids ids{};
};

// One copy of the threadgroup in progress: the most elements one thread wrote, all the
// threads wrote, the tile's, and their size.
struct CopyTally {
  uint64_t most = 0, written = 0, tile = 0, size = 1;
};

struct Simd {
  uint32_t width = 0, arrived = 0, exited = 0, parity = 0;
  int kind = 0;
  alignas(64) unsigned char slot[2][32][MFA_SLOT];
  float out[2][32][2];
};

struct Stats {
  uint64_t mma, threadgroups, threads, barriers, simd_collectives, async_copies, async_copy_bytes, switches;
  uint64_t float_exceptions;  // FE_INVALID | FE_DIVBYZERO | FE_OVERFLOW raised by any thread
  // Copies made by the threads (MFA_COPY_ACCESS, MFA_COPY_DONE): the tiles' elements; the sum
  // over copies of the most one thread copied, times the threadgroup's threads, and of the
  // least that most can be when every access moves 8 bytes; device bytes moved, and those
  // moved by accesses of 8 bytes or more.
  uint64_t copy_elements, copy_critical, copy_floor, copy_device_bytes, copy_wide_bytes;
};

struct Launch {
  uint32_t grid[3];
  uint32_t group[3];
  void* buffers[32];
  uint64_t threadgroup_length[32];
  int schedule;
  uint64_t stack_size;
};

constexpr size_t kPage = 4096;
static_assert(sizeof(mfa_copy) <= MFA_SLOT, "an async copy descriptor must fit a lane's slot");

struct Runtime {
  // The launch in progress.
  const Launch* launch = nullptr;
  Stats* stats = nullptr;
  std::vector<Fiber> fibers;
  std::vector<Simd> simds;
  uint32_t threads = 0, group_arrived = 0, group_exited = 0;
  bool barrier_completed = false;
  Fiber* current = nullptr;
  void* scheduler_sp = nullptr;
  std::string error;
  uint32_t tg[3] = {0, 0, 0};
  std::vector<CopyTally> copies;  // the threadgroup's n-th copy: every thread's n-th

  // Memory of the launch in progress (release_memory gives it back at its end).
  std::vector<unsigned char*> stacks;  // each: guard page, then stack_size bytes
  size_t stack_size = 0;
  unsigned char* tg_memory = nullptr;  // threadgroup memory, a guard page after it
  size_t tg_mapped = 0;
  void* tg_pointers[32] = {};
};

Runtime rt;
sigjmp_buf fault_jump;
volatile sig_atomic_t fault_signal = 0;
void* volatile fault_address = nullptr;

std::string where(const Fiber* f) {
  char text[160];
  if (!f) return "";
  std::snprintf(text, sizeof text, " (thread %u = SIMD group %u lane %u of threadgroup [%u, %u, %u])",
                f->index, f->simd, f->lane, rt.tg[0], rt.tg[1], rt.tg[2]);
  return text;
}

// An error inside a fiber: record it and return to the scheduler for good.
[[noreturn]] void fail(const std::string& message) {
  if (rt.error.empty()) rt.error = message + where(rt.current);
  void* discard;
  mfa_switch(&discard, rt.scheduler_sp);
  __builtin_unreachable();
}

void yield() {
  ++rt.stats->switches;
  mfa_switch(&rt.current->sp, rt.scheduler_sp);
}

void fiber_main(Fiber* f) {
  __mfa_thread_main(&f->ids);
  Simd& s = rt.simds[f->simd];
  f->state = DONE;
  ++s.exited;
  ++rt.group_exited;
  if (s.arrived)
    fail("divergence: a thread returned while " + std::to_string(s.arrived) + " lanes of its SIMD group wait at " +
         kind_name(s.kind));
  if (rt.group_arrived)
    fail("divergence: a thread returned while " + std::to_string(rt.group_arrived) +
         " threads of its threadgroup wait at threadgroup_barrier");
  void* discard;
  mfa_switch(&discard, rt.scheduler_sp);
  __builtin_unreachable();
}

// A fresh stack for fiber f: mfa_switch pops the control words, six registers (r12 = f,
// r13 = fiber_main) and returns into mfa_fiber_entry with a 16-byte aligned stack.
void prepare(Fiber& f, unsigned char* stack) {
  uint64_t* top = (uint64_t*)(stack + kPage + rt.stack_size);
  uint32_t control[2];
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(control[0]), "=m"(control[1]));
  *--top = (uint64_t)&mfa_fiber_entry;  // popped by ret: mfa_fiber_entry starts with rsp % 16 == 0
  *--top = 0;                          // rbp
  *--top = 0;                          // rbx
  *--top = (uint64_t)&f;               // r12
  *--top = (uint64_t)&fiber_main;      // r13
  *--top = 0;                          // r14
  *--top = 0;                          // r15
  *--top = (uint64_t)control[0] | ((uint64_t)(control[1] & 0xffff) << 32);
  f.sp = top;
}

// ---------------------------------------------------------------------------------------
// Blocking points

// Returns the parity (slot set) of the completed collective.
uint32_t simd_collective(int kind, const void* data, unsigned size, void (*complete)(Simd&, uint32_t)) {
  Fiber* f = rt.current;
  Simd& s = rt.simds[f->simd];
  if (s.exited)
    fail(std::string("divergence: ") + kind_name(kind) + " reached after " + std::to_string(s.exited) +
         " lanes of the SIMD group returned");
  if (s.arrived == 0) {
    s.kind = kind;
  } else if (s.kind != kind) {
    fail(std::string("divergence: lanes of one SIMD group reached different collectives (") + kind_name(s.kind) +
         " and " + kind_name(kind) + ")");
  }
  const uint32_t parity = s.parity;
  if (size) std::memcpy(s.slot[parity][f->lane], data, size);
  if (++s.arrived == s.width) {
    if (complete) complete(s, parity);
    s.arrived = 0;
    s.parity ^= 1;
    ++rt.stats->simd_collectives;
    Fiber* lanes = &rt.fibers[f->simd * 32];
    for (uint32_t i = 0; i < s.width; ++i)
      if (lanes[i].state == WAIT_SIMD) lanes[i].state = READY;
    if (rt.launch->schedule == ROUND_ROBIN) yield();
  } else {
    f->state = WAIT_SIMD;
    yield();
  }
  return parity;
}

// The layout of ccv's simdgroup_matrix_storage (morton_order in the emitted source): lane l
// holds row M, columns N and N + 1 of the 8x8 matrix.
struct LaneElement {
  uint8_t row, column;
};
struct MortonTable {
  LaneElement at[32];
  MortonTable() {
    for (unsigned lane = 0; lane < 32; ++lane) {
      unsigned quad = lane / 4;
      unsigned m = (quad / 4) * 4 + (lane / 2) % 4;
      unsigned n = (quad & 2) * 2 + (lane % 2) * 2;
      at[lane] = {(uint8_t)m, (uint8_t)n};
    }
  }
};
const MortonTable morton;

void complete_mma(Simd& s, uint32_t parity) {
  if (s.width != 32) fail("the 8x8 multiply-accumulate needs a full SIMD group of 32 lanes");
  float a[8][8], b[8][8], c[8][8];
  for (unsigned lane = 0; lane < 32; ++lane) {
    const float* in = (const float*)s.slot[parity][lane];
    const LaneElement e = morton.at[lane];
    for (unsigned k = 0; k < 2; ++k) {
      a[e.row][e.column + k] = in[k];
      b[e.row][e.column + k] = in[2 + k];
      c[e.row][e.column + k] = in[4 + k];
    }
  }
  for (unsigned lane = 0; lane < 32; ++lane) {
    const LaneElement e = morton.at[lane];
    for (unsigned k = 0; k < 2; ++k) {
      const unsigned m = e.row, n = e.column + k;
      float acc = c[m][n];
      for (unsigned i = 0; i < 8; ++i) acc = __builtin_fmaf(a[m][i], b[i][n], acc);
      s.out[parity][lane][k] = acc;
    }
  }
  ++rt.stats->mma;
}

void copy_element(unsigned char* dst, const unsigned char* src, size_t size) {
  if (src)
    std::memcpy(dst, src, size);
  else
    std::memset(dst, 0, size);
}

void complete_copy(Simd& s, uint32_t parity) {
  const mfa_copy& c = *(const mfa_copy*)s.slot[parity][0];
  for (uint32_t lane = 1; lane < s.width; ++lane)
    if (std::memcmp(s.slot[parity][lane], &c, sizeof c) != 0)
      fail("divergence: the lanes of a SIMD group issued an async copy with different arguments");
  const size_t size = c.element_size;
  unsigned char* dst = (unsigned char*)c.dst;
  const unsigned char* src = (const unsigned char*)c.src;
  if (c.dims == 1) {
    std::memcpy(dst, src, c.count * size);
    rt.stats->async_copy_bytes += c.count * size;
  } else {
    if (c.dst_element_stride != 1 || c.src_element_stride != 1 || c.offset_x || c.offset_y)
      fail("async copy: element strides other than 1 or a nonzero offset are not supported");
    if (c.clamp_mode != 0 && c.clamp_mode != 1) fail("async copy: unknown clamp mode");
    // The destination tile is written whole: elements outside the source tile are zero
    // (clamp_to_zero) or the nearest edge element (clamp_to_edge).
    for (uint64_t r = 0; r < c.dst_tile_y; ++r) {
      for (uint64_t x = 0; x < c.dst_tile_x; ++x) {
        const unsigned char* from = nullptr;
        if (r < c.src_tile_y && x < c.src_tile_x) {
          from = src + (r * c.src_elements_per_row + x) * size;
        } else if (c.clamp_mode == 1 && c.src_tile_x && c.src_tile_y) {
          uint64_t rr = r < c.src_tile_y ? r : c.src_tile_y - 1, xx = x < c.src_tile_x ? x : c.src_tile_x - 1;
          from = src + (rr * c.src_elements_per_row + xx) * size;
        }
        copy_element(dst + (r * c.dst_elements_per_row + x) * size, from, size);
      }
    }
    rt.stats->async_copy_bytes += c.dst_tile_x * c.dst_tile_y * size;
  }
  ++rt.stats->async_copies;
}

// ---------------------------------------------------------------------------------------
// Scheduling one threadgroup

bool runnable(const Fiber& f) { return f.state == READY; }

std::string deadlock() {
  uint32_t simd = 0, group = 0, done = 0;
  for (uint32_t i = 0; i < rt.threads; ++i) {
    const Fiber& f = rt.fibers[i];
    simd += f.state == WAIT_SIMD;
    group += f.state == WAIT_GROUP;
    done += f.state == DONE;
  }
  char text[200];
  std::snprintf(text, sizeof text,
                "deadlock in threadgroup [%u, %u, %u]: %u threads wait at threadgroup_barrier, %u at SIMD-group "
                "collectives, %u returned (divergent control flow)",
                rt.tg[0], rt.tg[1], rt.tg[2], group, simd, done);
  return text;
}

// Runs fiber f until it blocks, yields or returns; false when the launch must stop.
bool resume(Fiber& f) {
  rt.current = &f;
  ++rt.stats->switches;
  mfa_switch(&rt.scheduler_sp, f.sp);
  rt.current = nullptr;
  return rt.error.empty();
}

bool run_round_robin() {
  const uint32_t n = rt.threads;
  uint32_t next = 0, idle = 0, done = 0;
  while (done < n) {
    Fiber& f = rt.fibers[next];
    next = next + 1 == n ? 0 : next + 1;
    if (!runnable(f)) {
      if (++idle > n) {
        rt.error = deadlock();
        return false;
      }
      continue;
    }
    idle = 0;
    if (!resume(f)) return false;
    if (f.state == DONE) ++done;
  }
  return true;
}

// After every threadgroup barrier the sweep starts again from the schedule's first SIMD
// group, so that group (not the one whose last lane completed the barrier) runs ahead.
bool run_simd_groups(bool reverse) {
  const uint32_t groups = (uint32_t)rt.simds.size();
  uint32_t done = 0;
  for (;;) {
    bool progressed = false;
    rt.barrier_completed = false;
    for (uint32_t k = 0; k < groups && !rt.barrier_completed; ++k) {
      const uint32_t g = reverse ? groups - 1 - k : k;
      Fiber* lanes = &rt.fibers[g * 32];
      const uint32_t width = rt.simds[g].width;
      // This SIMD group runs until none of its lanes can.
      for (bool any = true; any && !rt.barrier_completed;) {
        any = false;
        for (uint32_t l = 0; l < width && !rt.barrier_completed; ++l) {
          if (!runnable(lanes[l])) continue;
          any = progressed = true;
          if (!resume(lanes[l])) return false;
          if (lanes[l].state == DONE) ++done;
        }
      }
    }
    if (done == rt.threads) return true;
    if (!progressed) {
      rt.error = deadlock();
      return false;
    }
  }
}

void threadgroup_begin(const uint32_t tg[3]) {
  const Launch& L = *rt.launch;
  for (int i = 0; i < 3; ++i) rt.tg[i] = tg[i];
  const uint32_t gx = L.group[0], gy = L.group[1];
  for (uint32_t i = 0; i < rt.threads; ++i) {
    Fiber& f = rt.fibers[i];
    f.index = i;
    f.simd = i / 32;
    f.lane = i % 32;
    f.state = READY;
    f.copies = 0;
    mfa_ids& d = f.ids;
    const uint32_t local[3] = {i % gx, (i / gx) % gy, i / (gx * gy)};
    for (int k = 0; k < 3; ++k) {
      d.threadgroup_position_in_grid[k] = tg[k];
      d.thread_position_in_threadgroup[k] = local[k];
      d.thread_position_in_grid[k] = tg[k] * L.group[k] + local[k];
      d.threads_per_threadgroup[k] = L.group[k];
      d.threadgroups_per_grid[k] = L.grid[k];
      d.threads_per_grid[k] = L.grid[k] * L.group[k];
    }
    d.thread_index_in_threadgroup = i;
    d.simdgroup_index_in_threadgroup = i / 32;
    d.thread_index_in_simdgroup = i % 32;
    d.threads_per_simdgroup = 32;
    d.simdgroups_per_threadgroup = (rt.threads + 31) / 32;
    d.quadgroup_index_in_threadgroup = i / 4;
    d.thread_index_in_quadgroup = i % 4;
    d.quadgroups_per_threadgroup = (rt.threads + 3) / 4;
    prepare(f, rt.stacks[i]);
  }
  for (uint32_t g = 0; g < rt.simds.size(); ++g) {
    Simd& s = rt.simds[g];
    s.width = rt.threads - g * 32 < 32 ? rt.threads - g * 32 : 32;
    s.arrived = s.exited = s.parity = 0;
    s.kind = 0;
  }
  rt.group_arrived = rt.group_exited = 0;
  rt.copies.clear();
  // Poison: a quiet NaN as float, as half and as bfloat.
  uint32_t* words = (uint32_t*)rt.tg_memory;
  for (size_t i = 0; i < rt.tg_mapped / 4; ++i) words[i] = 0x7FC07FC0u;
}

// A threadgroup's copies into the launch's Stats: every thread must have made each of them
// (the threadgroup shares a copy: a thread that skipped one would leave its part unwritten),
// and together written each element of its tile once.
bool tally_copies() {
  for (const Fiber& f : rt.fibers) {
    if (f.copies != rt.fibers[0].copies) {
      rt.error = "a tile copy not made by every thread: thread " + std::to_string(f.index) + " made " +
                 std::to_string(f.copies) + ", thread 0 " + std::to_string(rt.fibers[0].copies) + where(&f);
      return false;
    }
  }
  for (size_t n = 0; n < rt.copies.size(); ++n) {
    const CopyTally& c = rt.copies[n];
    if (c.written != c.tile) {
      rt.error = "copy " + std::to_string(n) + " of threadgroup [" + std::to_string(rt.tg[0]) + ", " +
                 std::to_string(rt.tg[1]) + ", " + std::to_string(rt.tg[2]) + "]: its threads wrote " +
                 std::to_string(c.written) + " elements of a tile of " + std::to_string(c.tile);
      return false;
    }
    const uint64_t accesses = (c.tile * c.size + 8 * rt.threads - 1) / (8 * rt.threads);
    rt.stats->copy_elements += c.tile;
    rt.stats->copy_critical += c.most * rt.threads;
    rt.stats->copy_floor += accesses * 8 / c.size * rt.threads;
  }
  return true;
}

// ---------------------------------------------------------------------------------------
// Memory

bool map_stacks(size_t count, size_t size, std::string& error) {
  size = (size + kPage - 1) / kPage * kPage;
  if (size != rt.stack_size) {
    for (unsigned char* s : rt.stacks) munmap(s, kPage + rt.stack_size);
    rt.stacks.clear();
    rt.stack_size = size;
  }
  while (rt.stacks.size() < count) {
    void* p = mmap(nullptr, kPage + size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      error = "cannot map fiber stacks";
      return false;
    }
    mprotect(p, kPage, PROT_NONE);
    rt.stacks.push_back((unsigned char*)p);
  }
  return true;
}

// Threadgroup memory: each index rounded up to 16 bytes, the last one ending at a guard
// page (an access past it faults).
bool map_threadgroup(const Launch& L, std::string& error) {
  size_t total = 0;
  for (int i = 0; i < 32; ++i) total += (L.threadgroup_length[i] + 15) / 16 * 16;
  const size_t mapped = (total + kPage - 1) / kPage * kPage;
  if (rt.tg_memory) munmap(rt.tg_memory, rt.tg_mapped + kPage);
  rt.tg_memory = nullptr;
  rt.tg_mapped = 0;
  void* p = mmap(nullptr, mapped + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    error = "cannot map threadgroup memory";
    return false;
  }
  mprotect((unsigned char*)p + mapped, kPage, PROT_NONE);
  rt.tg_memory = (unsigned char*)p;
  rt.tg_mapped = mapped;
  unsigned char* at = rt.tg_memory + mapped - total;
  for (int i = 0; i < 32; ++i) {
    rt.tg_pointers[i] = L.threadgroup_length[i] ? at : nullptr;
    at += (L.threadgroup_length[i] + 15) / 16 * 16;
  }
  return true;
}

// Each loaded kernel has its own runtime: give the memory back after every launch.
void release_memory() {
  for (unsigned char* s : rt.stacks) munmap(s, kPage + rt.stack_size);
  rt.stacks.clear();
  if (rt.tg_memory) munmap(rt.tg_memory, rt.tg_mapped + kPage);
  rt.tg_memory = nullptr;
  rt.tg_mapped = 0;
  std::vector<Fiber>().swap(rt.fibers);
  std::vector<Simd>().swap(rt.simds);
}

// ---------------------------------------------------------------------------------------
// Faults while a kernel runs: recorded, then back to mfa_launch.

void on_fault(int signal, siginfo_t* info, void*) {
  fault_signal = signal;
  fault_address = info->si_addr;
  siglongjmp(fault_jump, 1);
}

struct Handlers {
  struct sigaction old[3];
  stack_t old_stack;
  void* alt = nullptr;
  static constexpr int signals[3] = {SIGSEGV, SIGBUS, SIGFPE};
  void install() {
    const size_t size = 1 << 16;
    alt = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    stack_t ss{};
    ss.ss_sp = alt;
    ss.ss_size = size;
    sigaltstack(&ss, &old_stack);
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < 3; ++i) sigaction(signals[i], &sa, &old[i]);
  }
  void restore() {
    for (int i = 0; i < 3; ++i) sigaction(signals[i], &old[i], nullptr);
    sigaltstack(&old_stack, nullptr);
    munmap(alt, 1 << 16);
  }
};

std::string describe_fault() {
  char text[256];
  const uintptr_t a = (uintptr_t)fault_address;
  for (size_t i = 0; i < rt.stacks.size(); ++i) {
    const uintptr_t s = (uintptr_t)rt.stacks[i];
    if (a >= s && a < s + kPage) {
      std::snprintf(text, sizeof text, "fiber stack overflow (more than %zu bytes; MFA_ENGINE_STACK sets the size)",
                    rt.stack_size);
      return std::string(text) + where(rt.current);
    }
  }
  const uintptr_t t = (uintptr_t)rt.tg_memory;
  if (t && a >= t + rt.tg_mapped && a < t + rt.tg_mapped + kPage)
    return "access past the end of threadgroup memory" + where(rt.current);
  if (fault_signal == SIGFPE) return "arithmetic fault (integer division by zero?)" + where(rt.current);
  std::snprintf(text, sizeof text, "invalid memory access at %p (%s)", fault_address,
                fault_signal == SIGBUS ? "SIGBUS" : "SIGSEGV");
  return std::string(text) + where(rt.current);
}

}  // namespace

// ---------------------------------------------------------------------------------------
// The runtime as kernel code sees it (mfa_abi.h)

extern "C" {

void __mfa_rt_threadgroup_barrier(int) {
  Fiber* f = rt.current;
  if (rt.group_exited)
    fail("divergence: threadgroup_barrier reached after " + std::to_string(rt.group_exited) +
         " threads of the threadgroup returned");
  if (rt.simds[f->simd].arrived)
    fail(std::string("divergence: threadgroup_barrier reached while other lanes of the SIMD group wait at ") +
         kind_name(rt.simds[f->simd].kind));
  if (++rt.group_arrived == rt.threads) {
    rt.group_arrived = 0;
    ++rt.stats->barriers;
    for (uint32_t i = 0; i < rt.threads; ++i)
      if (rt.fibers[i].state == WAIT_GROUP) rt.fibers[i].state = READY;
    rt.barrier_completed = true;
    yield();
  } else {
    f->state = WAIT_GROUP;
    yield();
  }
}

const unsigned char* __mfa_rt_simd_exchange(const void* data, unsigned size, int kind) {
  if (size > MFA_SLOT) fail("SIMD-group function: value too large");
  const uint32_t parity = simd_collective(kind, data, size, nullptr);
  return rt.simds[rt.current->simd].slot[parity][0];
}

unsigned __mfa_rt_lane(void) { return rt.current->lane; }

unsigned __mfa_rt_simd_width(void) { return rt.simds[rt.current->simd].width; }

void __mfa_rt_mma(const float* in, float* out) {
  Fiber* f = rt.current;
  const uint32_t parity = simd_collective(MFA_SIMD_MMA, in, 6 * sizeof(float), complete_mma);
  const float* result = rt.simds[f->simd].out[parity][f->lane];
  out[0] = result[0];
  out[1] = result[1];
}

void* __mfa_rt_async_copy(const mfa_copy* copy) {
  simd_collective(MFA_SIMD_ASYNC_COPY, copy, sizeof *copy, complete_copy);
  static int event;
  return &event;
}

void __mfa_rt_wait_events(int, void* const*) { simd_collective(MFA_SIMD_WAIT, nullptr, 0, nullptr); }

void* __mfa_rt_buffer(int index) { return rt.launch->buffers[index]; }

void* __mfa_rt_threadgroup(int index) { return rt.tg_pointers[index]; }

void __mfa_rt_fail(const char* message) { fail(message); }

void __mfa_rt_copy_access(const void* pointer, unsigned bytes) {
  const uintptr_t address = (uintptr_t)pointer;
  if (bytes == 0 || (bytes & (bytes - 1)) || address % bytes)
    fail("a copy's " + std::to_string(bytes) + "-byte access at " + std::to_string(address % 16) +
         " bytes past a multiple of 16 (Metal needs its vectors aligned to their size)");
  const uintptr_t tg = (uintptr_t)rt.tg_memory;
  if (address >= tg && address < tg + rt.tg_mapped) return;  // threadgroup memory
  rt.stats->copy_device_bytes += bytes;
  if (bytes >= 8) rt.stats->copy_wide_bytes += bytes;
}

void __mfa_rt_copy_done(unsigned elements, unsigned tile_elements, unsigned element_size) {
  const uint32_t n = rt.current->copies++;
  if (n >= rt.copies.size()) rt.copies.resize(n + 1);
  CopyTally& c = rt.copies[n];
  if (c.written && (c.tile != tile_elements || c.size != element_size))
    fail("the threads of a copy disagree on its tile: " + std::to_string(c.tile) + " and " +
         std::to_string(tile_elements) + " elements");
  if (elements > c.most) c.most = elements;
  c.written += elements;
  c.tile = tile_elements;
  c.size = element_size;
}

// bfloat conversions clang emits and Debian's libgcc lacks (round to nearest even).
__attribute__((visibility("hidden"))) __bf16 __truncsfbf2(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  uint16_t h;
  if ((u & 0x7fffffffu) > 0x7f800000u)
    h = (uint16_t)((u >> 16) | 0x40);
  else
    h = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
  __bf16 r;
  std::memcpy(&r, &h, 2);
  return r;
}

}  // extern "C"

// One dispatch: grid threadgroups of group threads. Returns 0, or -1 with the message in
// error (the launch stops at the first error).
MFA_EXPORT int mfa_launch(const Launch* launch, Stats* stats, char* error, size_t error_size) {
  std::string message;
  auto finish = [&](int code) {
    std::snprintf(error, error_size, "%s", message.c_str());
    return code;
  };
  const Launch& L = *launch;
  const uint64_t threads = (uint64_t)L.group[0] * L.group[1] * L.group[2];
  if (threads == 0 || threads > 1024) {
    message = "threads per threadgroup must be 1..1024, not " + std::to_string(threads);
    return finish(-1);
  }
  std::memset(stats, 0, sizeof *stats);
  std::feclearexcept(FE_ALL_EXCEPT);
  rt.launch = &L;
  rt.stats = stats;
  rt.threads = (uint32_t)threads;
  rt.fibers.assign(threads, Fiber{});
  rt.simds.resize((threads + 31) / 32);
  rt.error.clear();
  if (!map_stacks(threads, L.stack_size, message) || !map_threadgroup(L, message)) {
    release_memory();
    return finish(-1);
  }

  Handlers handlers;
  handlers.install();
  bool ok = true;
  if (sigsetjmp(fault_jump, 1) == 0) {
    uint32_t tg[3];
    for (tg[2] = 0; ok && tg[2] < L.grid[2]; ++tg[2])
      for (tg[1] = 0; ok && tg[1] < L.grid[1]; ++tg[1])
        for (tg[0] = 0; ok && tg[0] < L.grid[0]; ++tg[0]) {
          threadgroup_begin(tg);
          ok = L.schedule == ROUND_ROBIN ? run_round_robin() : run_simd_groups(L.schedule == RUN_BEHIND);
          ok = ok && tally_copies();
          ++stats->threadgroups;
          stats->threads += threads;
        }
  } else {
    ok = false;
    rt.error = describe_fault();
  }
  stats->float_exceptions = std::fetestexcept(FE_INVALID | FE_DIVBYZERO | FE_OVERFLOW);
  handlers.restore();
  release_memory();
  message = rt.error;
  rt.current = nullptr;
  return finish(ok ? 0 : -1);
}

MFA_EXPORT unsigned mfa_slot_size() { return MFA_SLOT; }
