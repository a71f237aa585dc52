// Apple's <simd/simd.h>, as far as ccv's MFA host code uses it: clang extended vectors.
#pragma once
#include <cstdint>

#define MFA_SIMD_VECTORS(T, NAME)                                  \
  typedef T NAME##2 __attribute__((ext_vector_type(2)));           \
  typedef T NAME##3 __attribute__((ext_vector_type(3)));           \
  typedef T NAME##4 __attribute__((ext_vector_type(4)));           \
  typedef T NAME##8 __attribute__((ext_vector_type(8)));

namespace simd {
MFA_SIMD_VECTORS(unsigned char, uchar)
MFA_SIMD_VECTORS(unsigned short, ushort)
MFA_SIMD_VECTORS(unsigned int, uint)
MFA_SIMD_VECTORS(unsigned long, ulong)
MFA_SIMD_VECTORS(float, float)
}  // namespace simd
typedef simd::ushort4 simd_ushort4;

// True when every lane of a comparison result is set. (Not sizeof: a 3-lane vector has the
// size of 4 lanes, and the 4th is garbage.)
template <typename V>
inline bool simd_all(V v) {
  for (unsigned i = 0; i < __builtin_vectorelements(V); ++i)
    if (!v[i]) return false;
  return true;
}

inline simd::ushort4 simd_make_ushort4(unsigned short x, unsigned short y, unsigned short z, unsigned short w) {
  return simd::ushort4{x, y, z, w};
}
inline simd::ushort4 simd_make_ushort4(simd::ushort3 xyz, unsigned short w) {
  return simd::ushort4{xyz.x, xyz.y, xyz.z, w};
}
