// Launch parameters of one SDPA call for ccv's MFA: the one place that maps a call to ccv's
// params struct, its buffer order, and the limits beyond which the pinned ccv computes
// wrong results without an error.
//
// Plain C++ (no Objective-C, no torch): included by the bridge (mfa_bridge.mm) and by the
// Linux engine harness (tools/engine/driver.cpp), so the CPU executor replays exactly what
// the bridge encodes on a Mac. metal_flash_sdpa/kernels/mfa.py states the same limits for
// supports(); tests/test_engine_*.py check the two agree.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

#include "ccv_nnc_mfa.hpp"

namespace mfa_sdpa {

enum class DType : std::uint8_t { Float32, Float16, BFloat16 };

// q [B, R, Hq, D]; k and v [B, C, Hk, D]; the layout ccv's encode reads.
struct Shape {
  std::int64_t B, R, C, Hq, Hk, D;
};

// Buffer order of ccv_nnc_mfa_encode_attention (ccv_nnc_mfa_attention.cpp).
enum ForwardBuffer { kFwdQ, kFwdK, kFwdV, kFwdO, kFwdMask, kFwdLSE, kForwardBuffers };
// The attention mask: the forward's own slot; after dV in the backward (our patch 0008).
enum BackwardBuffer { kBwdQ, kBwdK, kBwdV, kBwdO, kBwdLSE, kBwdDO, kBwdDQ, kBwdDK, kBwdDV, kBwdMask, kBackwardBuffers };

// ccv's scratch request rounds the size up with `1 << n` on an int
// (ccv_nnc_mfa.cpp, mfa::context::request_scratch), and the encode sums it in an int:
// more than 2^30 bytes wraps.
constexpr std::uint64_t kMaxScratchBytes = std::uint64_t(1) << 30;
// Leading dimensions (H * D) are unsigned short in AttentionKernelDescriptor.
constexpr std::int64_t kMaxLeadingDimension = 0xFFFF;
// Offsets are 32-bit element counts: ccv keeps batch strides (S*H*D) in uint32, and the
// kernels offset each operand by uint products, batch x stride, row x H*D, and for L and
// D (batch x H + head) x R. All stay below the operand's element count, so tensors under
// 2^32 elements are safe. Elements, not bytes: the pointer arithmetic scales in 64 bits,
// and the scratch's byte offsets are ccv's size_t (and under kMaxScratchBytes).
constexpr std::int64_t kMaxElements = 0xFFFFFFFFll;
// The end of ccv's parameter tables (v2/AttentionDescriptor.cpp).
constexpr std::int64_t kMaxHeadDim = 384;

// An additive attention mask in q's dtype (our patch 0008): element (b, h, i, j) at
// b * batch + h * head + i * row + j; a stride is 0 where the mask broadcasts.
struct MaskStrides {
  std::int64_t batch, head, row;
};

// Elements from the mask's first to its last, the span its strides reach.
inline std::int64_t mask_span(const Shape& s, const MaskStrides& m) {
  return (s.B - 1) * m.batch + (s.Hq - 1) * m.head + (s.R - 1) * m.row + s.C;
}

// 2-byte elements (fp16, bf16): outputs go through fp32 scratch and a cast (patch 0005 for bf16).
inline bool is_half(DType dtype) { return dtype == DType::Float16 || dtype == DType::BFloat16; }

inline std::uint64_t mtl_data_type(DType dtype) {
  switch (dtype) {
    case DType::Float16: return std::uint64_t(MTL::DataTypeHalf);
    case DType::BFloat16: return std::uint64_t(MTL::DataTypeBFloat);
    default: return std::uint64_t(MTL::DataTypeFloat);
  }
}

// Bytes of ccv's one scratch buffer the encode requests: fp32 copies of half outputs
// before their cast, and the backward's fp32 D term (the forward's LSE is ours).
inline std::uint64_t scratch_bytes(const Shape& s, DType dtype, bool backward) {
  const std::uint64_t B = s.B, R = s.R, C = s.C, H = s.Hq, Hk = s.Hk, D = s.D;
  if (!backward) return is_half(dtype) ? 4 * R * D * H * B : 0;
  // dQ with Hq heads, dK and dV with Hk (our patch 0006)
  return (is_half(dtype) ? 4 * (R * H + 2 * C * Hk) * D * B : 0) + 4 * R * H * B;
}

// The scales the kernels serve (our patch 0010): an unmasked kernel's excluded keys score
// -0.875 * FLT_MAX * min(scale, 1) after scaling, finite for every positive scale and far
// below real scores within this range; a scale <= 0 breaks the online softmax's running
// maximum (taken before scaling). Mirrors MFAKernel.supports().
constexpr double kMinScale = 0x1p-32, kMaxScale = 0x1p32;

// Empty when the kernels serve `scale` (as ccv receives it: a float), else why not.
inline std::string check_scale(float scale) {
  if (scale >= kMinScale && scale <= kMaxScale) return "";  // false for NaN
  char text[160];
  std::snprintf(text, sizeof text, "scale %.9g is outside the scales MFA serves (2^-32 to 2^32; <= 0 and non-finite never)",
                double(scale));
  return text;
}

// Empty when the pinned ccv computes this call correctly, else why not. Mirrors
// MFAKernel.supports(); re-checked here because a wrong answer would be silent.
inline std::string check_limits(const Shape& s, DType dtype, bool backward, const MaskStrides* mask = nullptr) {
  if (s.B < 1 || s.R < 1 || s.C < 1 || s.Hq < 1 || s.Hk < 1 || s.D < 1) return "empty attention";
  // Grouped-query attention (our patch 0006): query head h reads key/value head h / (Hq / Hk).
  if (s.Hq % s.Hk != 0) return "query heads are not a multiple of key/value heads";
  if (s.D > kMaxHeadDim || s.D % 8 != 0) return "head dim " + std::to_string(s.D) + " is outside MFA's tables";
  if (s.Hq * s.D > kMaxLeadingDimension || s.Hk * s.D > kMaxLeadingDimension)
    return "heads x head dim " + std::to_string(s.Hq * s.D) + " exceeds MFA's 16-bit leading dimension";
  if (s.B * s.R * s.Hq * s.D > kMaxElements || s.B * s.C * s.Hk * s.D > kMaxElements)
    return "a tensor of 2^32 or more elements exceeds MFA's 32-bit offsets";
  if (mask && (mask->batch < 0 || mask->head < 0 || mask->row < 0)) return "negative mask strides";
  // The kernels offset the mask by uint products of strides and indices (patch 0008).
  if (mask && mask_span(s, *mask) > kMaxElements)
    return "a mask spanning 2^32 or more elements exceeds MFA's 32-bit offsets";
  if (scratch_bytes(s, dtype, backward) > kMaxScratchBytes)
    return "call needs " + std::to_string(scratch_bytes(s, dtype, backward)) + " bytes of MFA scratch (limit 2^30)";
  return "";
}

// ccv's params for the forward (backward = false) or the backward (dQ, then dK/dV);
// causal: torch's is_causal, top-left (query i attends keys j <= i; our patch 0007);
// mask: an additive mask's strides, or none (our patch 0008).
inline ccv_nnc_mfa_attention_params_t make_params(const Shape& s, DType dtype, float scale, bool backward, bool causal,
                                                  const MaskStrides* mask = nullptr) {
  ccv_nnc_mfa_attention_params_t p;
  std::memset(&p, 0, sizeof(p));  // also: no transposes, no mask, batch_dims_mask empty
  p.data_type = mtl_data_type(dtype);
  p.R = std::uint32_t(s.R);
  p.C = std::uint32_t(s.C);
  p.Hq = std::uint32_t(s.Hq);
  p.Hk = std::uint32_t(s.Hk);
  p.D = std::uint32_t(s.D);
  p.alpha = scale;
  // fp32 intermediates and LSE for half inputs too (lowPrecisionIntermediates = half && !upcast;
  // bf16 has fp32 intermediates either way)
  p.upcast = 1;
  p.type = backward ? 1 : 0;
  p.causal = causal ? 1 : 0;
  if (mask) {
    p.masked = 1;
    p.mask_strides[0] = std::uint32_t(mask->batch);
    p.mask_strides[1] = std::uint32_t(mask->head);
    p.mask_strides[2] = std::uint32_t(mask->row);
  }
  // batch_dims_q is zero-terminated; one entry of B is the whole batch.
  p.batched = s.B > 1 ? 1 : 0;
  if (s.B > 1) p.batch_dims_q[0] = std::uint32_t(s.B);
  return p;
}

}  // namespace mfa_sdpa
