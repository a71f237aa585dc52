// The boundary between a kernel compiled against the Metal shim (C++ for OpenCL, see
// metal_stdlib) and the executing runtime (runtime.cpp, plain C++): plain C types only, so
// both languages lay them out alike. Pointers crossing it are generic (no address space).
#ifndef MFA_ABI_H
#define MFA_ABI_H

#ifdef __cplusplus
extern "C" {
#endif

// The thread-position attributes of one Metal thread ([[thread_position_in_grid]], ...).
// Three-component ones are arrays; the rest are scalars.
struct mfa_ids {
  unsigned threadgroup_position_in_grid[3];
  unsigned thread_position_in_threadgroup[3];
  unsigned thread_position_in_grid[3];
  unsigned threads_per_threadgroup[3];
  unsigned threadgroups_per_grid[3];
  unsigned threads_per_grid[3];
  unsigned thread_index_in_threadgroup;
  unsigned simdgroup_index_in_threadgroup;
  unsigned thread_index_in_simdgroup;
  unsigned threads_per_simdgroup;
  unsigned simdgroups_per_threadgroup;
  unsigned quadgroup_index_in_threadgroup;
  unsigned thread_index_in_quadgroup;
  unsigned quadgroups_per_threadgroup;
};

// One simdgroup_event async copy as ccv's metal_simdgroup_event header issues it
// (__metal_simdgroup_async_copy_1d / _2d): element size, then destination and source.
struct mfa_copy {
  unsigned long dims;  // 1 or 2
  unsigned long element_size;
  unsigned long dst_to_device;  // 0: device -> threadgroup, 1: threadgroup -> device
  void* dst;
  unsigned long dst_elements_per_row, dst_element_stride, dst_tile_x, dst_tile_y;
  const void* src;
  unsigned long src_elements_per_row, src_element_stride, src_tile_x, src_tile_y;
  long offset_x, offset_y;
  long clamp_mode;  // 0: clamp_to_zero, 1: clamp_to_edge
  unsigned long count;  // 1D: elements
};

// Kinds of SIMD-group collectives: every lane of a SIMD group must reach the same kind.
enum mfa_collective {
  MFA_SIMD_BARRIER = 1,
  MFA_SIMD_SHUFFLE,
  MFA_SIMD_REDUCE,
  MFA_SIMD_MMA,
  MFA_SIMD_ASYNC_COPY,
  MFA_SIMD_WAIT,
};

#define MFA_SLOT 256  // bytes each lane may deposit at a collective

// String literals live in the constant address space in C++ for OpenCL.
#if defined(__OPENCL_CPP_VERSION__) || defined(__OPENCL_C_VERSION__)
#define MFA_LITERAL const __constant char
#else
#define MFA_LITERAL const char
#endif

// The runtime, called by kernel code through the shim.
void __mfa_rt_threadgroup_barrier(int flags);
const unsigned char* __mfa_rt_simd_exchange(const void* data, unsigned size, int kind);
unsigned __mfa_rt_lane(void);
unsigned __mfa_rt_simd_width(void);
void __mfa_rt_mma(const float* in, float* out);
void* __mfa_rt_async_copy(const struct mfa_copy* copy);
void __mfa_rt_wait_events(int count, void* const* events);
void* __mfa_rt_buffer(int index);
void* __mfa_rt_threadgroup(int index);
void __mfa_rt_fail(MFA_LITERAL* message);
void __mfa_rt_copy_access(const void* pointer, unsigned bytes);
void __mfa_rt_copy_done(unsigned elements, unsigned tile_elements, unsigned element_size);

// Defined by the generated entry code of each kernel.
void __mfa_thread_main(const struct mfa_ids* ids);

#ifdef __cplusplus
}
#endif

#endif
