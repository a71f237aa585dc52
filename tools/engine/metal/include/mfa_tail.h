// -*- C++ -*-
// Included after the Metal source (metal.py's generated translation unit): definitions of
// the AIR intrinsics that ccv's metal_simdgroup_event header declares with __asm labels
// (macOS 15 mode). A definition takes the asm label of the source's declaration when the
// signatures agree; when a source declares them differently, its declarations stay
// undefined and the link fails naming the intrinsic (metal.py reports it as unsupported).
#ifndef MFA_METAL_TAIL
#define MFA_METAL_TAIL

struct _simdgroup_event_t;

inline thread _simdgroup_event_t* __mfa_copy_1d(ulong size, ulong align, void* dst, const void* src, ulong n, ulong to_device) {
  mfa_copy c = {};
  c.dims = 1;
  c.element_size = size;
  c.dst_to_device = to_device;
  c.dst = dst;
  c.src = src;
  c.count = n;
  return (thread _simdgroup_event_t*)__mfa_rt_async_copy(&c);
}

inline thread _simdgroup_event_t* __mfa_copy_2d(ulong size, ulong to_device,
                                                void* dst, ulong dst_epr, ulong dst_stride, ulong2 dst_tile,
                                                const void* src, ulong src_epr, ulong src_stride, ulong2 src_tile,
                                                long2 offset, int clamp_mode) {
  mfa_copy c = {};
  c.dims = 2;
  c.element_size = size;
  c.dst_to_device = to_device;
  c.dst = dst;
  c.dst_elements_per_row = dst_epr;
  c.dst_element_stride = dst_stride;
  c.dst_tile_x = dst_tile.x;
  c.dst_tile_y = dst_tile.y;
  c.src = src;
  c.src_elements_per_row = src_epr;
  c.src_element_stride = src_stride;
  c.src_tile_x = src_tile.x;
  c.src_tile_y = src_tile.y;
  c.offset_x = offset.x;
  c.offset_y = offset.y;
  c.clamp_mode = clamp_mode;
  return (thread _simdgroup_event_t*)__mfa_rt_async_copy(&c);
}

thread _simdgroup_event_t* __metal_simdgroup_async_copy_1d(
    ulong size, ulong align, threadgroup void* dst, const device void* src, ulong n) {
  return __mfa_copy_1d(size, align, (void*)dst, (const void*)src, n, 0);
}

thread _simdgroup_event_t* __metal_simdgroup_async_copy_1d(
    ulong size, ulong align, device void* dst, const threadgroup void* src, ulong n) {
  return __mfa_copy_1d(size, align, (void*)dst, (const void*)src, n, 1);
}

thread _simdgroup_event_t* __metal_simdgroup_async_copy_2d(
    ulong size, ulong align,
    threadgroup void* dst, ulong dst_epr, ulong dst_stride, ulong2 dst_tile,
    const device void* src, ulong src_epr, ulong src_stride, ulong2 src_tile,
    long2 offset, int clamp_mode) {
  return __mfa_copy_2d(size, 0, (void*)dst, dst_epr, dst_stride, dst_tile,
                       (const void*)src, src_epr, src_stride, src_tile, offset, clamp_mode);
}

thread _simdgroup_event_t* __metal_simdgroup_async_copy_2d(
    ulong size, ulong align,
    device void* dst, ulong dst_epr, ulong dst_stride, ulong2 dst_tile,
    const threadgroup void* src, ulong src_epr, ulong src_stride, ulong2 src_tile,
    long2 offset, int clamp_mode) {
  return __mfa_copy_2d(size, 1, (void*)dst, dst_epr, dst_stride, dst_tile,
                       (const void*)src, src_epr, src_stride, src_tile, offset, clamp_mode);
}

void __metal_wait_simdgroup_events(int count, thread _simdgroup_event_t** events) {
  __mfa_rt_wait_events(count, (void* const*)events);
}

// The entry code metal.py generates reads the thread-position attributes through these.
template <class T> struct __mfa_attr_of {
  static T get(const unsigned* v) { return T(v[0]); }
};
template <class U> struct __mfa_attr_of<metal::vec<U, 2>> {
  static metal::vec<U, 2> get(const unsigned* v) { return metal::vec<U, 2>(v[0], v[1]); }
};
template <class U> struct __mfa_attr_of<metal::vec<U, 3>> {
  static metal::vec<U, 3> get(const unsigned* v) { return metal::vec<U, 3>(v[0], v[1], v[2]); }
};
template <class T> inline T __mfa_attr(const unsigned* v) { return __mfa_attr_of<T>::get(v); }

#endif  // MFA_METAL_TAIL
