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
#include <vector>

#include "ccv_nnc_mfa.hpp"

namespace mfa_sdpa {

enum class DType : std::uint8_t { Float32, Float16, BFloat16 };

// q [B, R, Hq, D]; k and v [B, C, Hk, D]; the layout ccv's encode reads.
struct Shape {
  std::int64_t B, R, C, Hq, Hk, D;
};

// Buffer order of ccv_nnc_mfa_encode_attention (ccv_nnc_mfa_attention.cpp).
// The attention mask: the forward's own slot; after dV in the backward (our patch 0008);
// its tile summaries after it: the forward's, the backward-query's and -key-value's (0013);
// the mask's gradient last (0017).
enum ForwardBuffer { kFwdQ, kFwdK, kFwdV, kFwdO, kFwdMask, kFwdLSE, kFwdMaskTiles, kForwardBuffers };
enum BackwardBuffer {
  kBwdQ, kBwdK, kBwdV, kBwdO, kBwdLSE, kBwdDO, kBwdDQ, kBwdDK, kBwdDV, kBwdMask, kBwdMaskTilesQ, kBwdMaskTilesKV,
  kBwdMaskGrad, kBackwardBuffers
};

// The most scratch one slice of a call uses when the call is split (plan_slices): ccv's
// scratch grows with B x H x L x D (fp32 copies of half outputs), so a long-context call
// runs as slices of batches or heads, one after another on the same scratch. Small enough
// that a forward's scratch plus its backward's (both alive until PyTorch's command buffer
// completes) stay under 512 MiB at 128k tokens with 32 heads, 8 KV heads, D = 128; large
// enough that a batch of 32 heads x D = 128 runs as one slice up to 4k tokens forward, and
// with grad up to 1.3k (MHA) or 2.7k (GQA 32:8); longer calls' slices each still hold
// a thousand threadgroups or more.
constexpr std::uint64_t kScratchBudget = std::uint64_t(64) << 20;
// request_scratch (patch 0011) allocates whole MiB beyond 1 MiB, powers of two below.
inline std::uint64_t scratch_allocation(std::uint64_t bytes) {
  constexpr std::uint64_t mib = std::uint64_t(1) << 20;
  if (bytes > mib) return (bytes + mib - 1) / mib * mib;
  std::uint64_t rounded = 1;
  while (rounded < bytes) rounded <<= 1;
  return rounded;
}
// Leading dimensions (H * D) are unsigned short in AttentionKernelDescriptor.
constexpr std::int64_t kMaxLeadingDimension = 0xFFFF;
// Offsets are 32-bit element counts: ccv keeps batch strides (S*H*D) in uint32, and the
// kernels offset each operand by uint products, batch x stride, row x H*D, and for L and
// D (batch x H + head) x R. All stay below the operand's element count, so tensors under
// 2^32 elements are safe. Elements, not bytes: the pointer arithmetic scales in 64 bits,
// and the scratch's byte offsets are ccv's size_t (and under kMaxScratchBytes).
constexpr std::int64_t kMaxElements = 0xFFFFFFFFll;
// The end of the parameter tables (v2/AttentionDescriptor.cpp: ccv's end at 384, our patch
// 0016's rows at 512).
constexpr std::int64_t kMaxHeadDim = 512;

// An attention mask (our patch 0008): element (b, h, i, j) at b * batch + h * head +
// i * row + j; a stride is 0 where the mask broadcasts. Additive in q's dtype, or torch's
// bool read as it is, a byte an element (is_bool, our patch 0012). The kernels of a masked
// call read the mask's tile summaries (patch 0013). grad: the backward adds the additive
// mask's gradient into a zeroed tensor of the mask's type laid out with the mask's strides
// (patch 0017).
struct MaskStrides {
  std::int64_t batch, head, row;
  bool is_bool = false;
  bool grad = false;
};

// The tile summary of each kernel of a pass (forward; backward-query, backward-key-value)
// as ccv_nnc_mfa_attention_mask_tiles_layout gives it (patch 0013): blocks along the
// kernel's parallelization dimension and the bytes of a block's entry. A summary holds
// an entry per block of each batch and query head of the mask (1 where it broadcasts).
struct MaskTilesLayout {
  std::uint32_t blocks[2] = {}, entry_bytes[2] = {};

  std::uint64_t head_bytes(int kernel) const { return std::uint64_t(blocks[kernel]) * entry_bytes[kernel]; }
  std::uint64_t batch_bytes(const Shape& s, const MaskStrides& m, int kernel) const {
    return (m.head ? s.Hq : 1) * head_bytes(kernel);
  }
  std::uint64_t bytes(const Shape& s, const MaskStrides& m, int kernel) const {
    return (m.batch ? s.B : 1) * batch_bytes(s, m, kernel);
  }
  // The bytes of each summary of a pass: [forward] or [backward-query, backward-key-value].
  std::vector<std::uint64_t> pass_bytes(const Shape& s, const MaskStrides& m, bool backward) const {
    std::vector<std::uint64_t> out;
    for (int kernel = 0; kernel < (backward ? 2 : 1); ++kernel) out.push_back(bytes(s, m, kernel));
    return out;
  }
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
  return "";
}

// A part of a call encoded as one ccv call (patch 0011): batches [b0, b0 + nb) with all
// their heads, or, in one batch (nb == 1), query heads [q0, q0 + nq) with key/value heads
// [k0, k0 + nk), whole GQA groups (nq = nk x group) or, in the forward only, part of one
// group (nk == 1).
struct Slice {
  std::int64_t b0, nb, q0, nq, k0, nk;
};

inline Shape slice_shape(const Shape& s, const Slice& p) { return {p.nb, s.R, s.C, p.nq, p.nk, s.D}; }

// `total` units in runs of at most `most` (>= 1), as even as the count allows.
inline std::vector<std::pair<std::int64_t, std::int64_t>> runs(std::int64_t total, std::int64_t most) {
  const std::int64_t count = (total + most - 1) / most, size = (total + count - 1) / count;
  std::vector<std::pair<std::int64_t, std::int64_t>> out;
  for (std::int64_t first = 0; first < total; first += size) out.emplace_back(first, std::min(size, total - first));
  return out;
}

// The slices a call runs as: one when its scratch fits `budget`; else whole batches; else,
// batch by batch, runs of heads, down to one KV group (the backward sums dK and dV over
// the group inside the kernel) or, in the forward, one query head. A smallest slice may
// need more than the budget: the limit then is the device's largest buffer (check_scratch).
// A backward that adds a mask's gradient (patch 0017) runs one slice per batch where the
// mask is shared by the batches, and one per KV group where it is shared by the heads:
// within a dispatch no two threadgroups then add to one element of the gradient.
inline std::vector<Slice> plan_slices(const Shape& s, DType dtype, bool backward, std::uint64_t budget = kScratchBudget,
                                      const MaskStrides* mask = nullptr) {
  std::vector<Slice> out;
  const bool grad = backward && mask && mask->grad;
  const bool shared_by_batches = grad && mask->batch == 0, shared_by_heads = grad && mask->head == 0 && s.Hk > 1;
  auto fit = [&](std::uint64_t unit) { return std::int64_t(unit == 0 ? INT64_MAX : std::max<std::uint64_t>(1, budget / unit)); };
  const std::uint64_t per_batch = scratch_bytes({1, s.R, s.C, s.Hq, s.Hk, s.D}, dtype, backward);
  if (per_batch <= budget && !shared_by_heads) {
    for (auto [b0, nb] : runs(s.B, shared_by_batches ? 1 : std::min(s.B, fit(per_batch)))) out.push_back({b0, nb, 0, s.Hq, 0, s.Hk});
    return out;
  }
  const std::int64_t group = s.Hq / s.Hk;
  const std::int64_t groups = shared_by_heads ? 1 : fit(scratch_bytes({1, s.R, s.C, group, 1, s.D}, dtype, backward));
  const std::int64_t heads = fit(scratch_bytes({1, s.R, s.C, 1, 1, s.D}, dtype, backward));
  for (std::int64_t b = 0; b < s.B; ++b) {
    if (backward || heads >= group) {
      for (auto [k0, nk] : runs(s.Hk, std::min(s.Hk, groups))) out.push_back({b, 1, k0 * group, nk * group, k0, nk});
      continue;
    }
    std::int64_t part = heads;  // query heads within one group: a divisor of it
    while (group % part != 0) --part;
    for (std::int64_t q0 = 0; q0 < s.Hq; q0 += part) out.push_back({b, 1, q0, part, q0 / group, 1});
  }
  return out;
}

// The largest scratch allocation the call's slices make (what check_scratch bounds).
inline std::uint64_t slice_scratch_allocation(const Shape& s, DType dtype, bool backward,
                                              std::uint64_t budget = kScratchBudget) {
  std::uint64_t most = 0;
  for (const Slice& p : plan_slices(s, dtype, backward, budget))
    most = std::max(most, scratch_allocation(scratch_bytes(slice_shape(s, p), dtype, backward)));
  return most;
}

// Empty when every slice's scratch fits in one buffer of the device, else why not.
// MFAKernel.supports() checks the smallest slice (smallest_slice_scratch): the two differ
// only for a device whose largest buffer is below the budget.
inline std::string check_scratch(const Shape& s, DType dtype, bool backward, std::uint64_t max_buffer_bytes,
                                 std::uint64_t budget = kScratchBudget) {
  const std::uint64_t most = slice_scratch_allocation(s, dtype, backward, budget);
  if (most <= max_buffer_bytes) return "";
  return "a slice of the call needs " + std::to_string(most) + " bytes of MFA scratch, beyond this device's largest buffer (" +
         std::to_string(max_buffer_bytes) + " bytes)";
}

// ccv's params for the forward (backward = false) or the backward (dQ, then dK/dV);
// causal: torch's is_causal, top-left (query i attends keys j <= i; our patch 0007);
// mask: the mask's strides and kind, or none (our patches 0008, 0012).
// tensor_heads: the query and key/value heads of the tensors a head slice is part of
// (patch 0011); {0, 0} for a call on whole tensors.
inline ccv_nnc_mfa_attention_params_t make_params(const Shape& s, DType dtype, float scale, bool backward, bool causal,
                                                  const MaskStrides* mask = nullptr,
                                                  std::pair<std::int64_t, std::int64_t> tensor_heads = {0, 0}) {
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
    p.mask_bool = mask->is_bool ? 1 : 0;
    p.mask_tiles = 1;
    p.mask_grad = backward && mask->grad && !mask->is_bool ? 1 : 0;
  }
  // batch_dims_q is zero-terminated; one entry of B is the whole batch.
  p.batched = s.B > 1 ? 1 : 0;
  if (s.B > 1) p.batch_dims_q[0] = std::uint32_t(s.B);
  if (tensor_heads.first != s.Hq || tensor_heads.second != s.Hk) {
    p.Hq_tensor = std::uint32_t(tensor_heads.first);
    p.Hk_tensor = std::uint32_t(tensor_heads.second);
  }
  return p;
}

// Attention dropout (ccv patch 0015): the threshold and the scale metal_flash_sdpa.dropout
// computes from p (2^32 p; 1 / (1 - p) as a float) and the call's seed.
struct Dropout {
  std::uint32_t threshold;
  float scale;
  std::uint64_t seed;
};

// `p` drops with `dropout` (if any); batch and head: the call's first in the tensors.
inline void set_dropout(ccv_nnc_mfa_attention_params_t& p, const Dropout* dropout, std::int64_t batch = 0,
                        std::int64_t head = 0) {
  if (!dropout) return;
  p.dropout = 1;
  p.dropout_threshold = dropout->threshold;
  p.dropout_scale = dropout->scale;
  p.dropout_seed = dropout->seed;
  p.dropout_batch = std::uint32_t(batch);
  p.dropout_head = std::uint32_t(head);
}

// The params of the whole call, not of a slice: what its mask's tile summaries (and the
// kernels that size them) are built from. They are an unsliced call's only launch's, dropout
// included: ccv builds its kernels once.
inline ccv_nnc_mfa_attention_params_t whole_params(const Shape& s, DType dtype, float scale, bool backward, bool causal,
                                                   const MaskStrides* mask, const Dropout* dropout) {
  ccv_nnc_mfa_attention_params_t p = make_params(s, dtype, scale, backward, causal, mask);
  set_dropout(p, dropout);
  return p;
}

// One ccv call of a sliced call: its params, and how far (in bytes) each buffer of ccv's
// order (ForwardBuffer or BackwardBuffer) moves to the slice's first element.
struct Launch {
  ccv_nnc_mfa_attention_params_t params;
  std::uint64_t offsets[kBackwardBuffers];
};

// Every ccv call the bridge (and the engine's driver) encodes for one SDPA call, in order.
// tiles: the layout of the mask's tile summaries, with a mask.
inline std::vector<Launch> launches(const Shape& s, DType dtype, float scale, bool backward, bool causal,
                                    const MaskStrides* mask = nullptr, std::uint64_t budget = kScratchBudget,
                                    const MaskTilesLayout* tiles = nullptr, const Dropout* dropout = nullptr) {
  const std::uint64_t es = is_half(dtype) ? 2 : 4;  // q's dtype, and an additive mask's
  const std::uint64_t mask_es = mask && mask->is_bool ? 1 : es;
  std::vector<Launch> out;
  for (const Slice& p : plan_slices(s, dtype, backward, budget, mask)) {
    Launch launch{make_params(slice_shape(s, p), dtype, scale, backward, causal, mask, {s.Hq, s.Hk}), {}};
    set_dropout(launch.params, dropout, p.b0, p.q0);
    // [B, R, Hq, D] and [B, C, Hk, D] tensors, LSE [B, Hq, R] in fp32
    const std::uint64_t q = es * std::uint64_t((p.b0 * s.R * s.Hq + p.q0) * s.D);
    const std::uint64_t kv = es * std::uint64_t((p.b0 * s.C * s.Hk + p.k0) * s.D);
    const std::uint64_t lse = 4 * std::uint64_t((p.b0 * s.Hq + p.q0) * s.R);
    const std::uint64_t m = mask ? mask_es * std::uint64_t(p.b0 * mask->batch + p.q0 * mask->head) : 0;
    // a summary's entries: of the slice's first batch and query head (backward-key-value's
    // too: its entries are per query head)
    auto summary = [&](int kernel) -> std::uint64_t {
      if (!mask) return 0;
      return std::uint64_t(mask->batch ? p.b0 : 0) * tiles->batch_bytes(s, *mask, kernel) +
             std::uint64_t(mask->head ? p.q0 : 0) * tiles->head_bytes(kernel);
    };
    std::uint64_t* o = launch.offsets;
    if (backward) {
      o[kBwdQ] = o[kBwdO] = o[kBwdDO] = o[kBwdDQ] = q;
      o[kBwdK] = o[kBwdV] = o[kBwdDK] = o[kBwdDV] = kv;
      o[kBwdLSE] = lse;
      o[kBwdMask] = o[kBwdMaskGrad] = m;  // the gradient has the mask's strides and type
      o[kBwdMaskTilesQ] = summary(0);
      o[kBwdMaskTilesKV] = summary(1);
    } else {
      o[kFwdQ] = o[kFwdO] = q;
      o[kFwdK] = o[kFwdV] = kv;
      o[kFwdLSE] = lse;
      o[kFwdMask] = m;
      o[kFwdMaskTiles] = summary(0);
    }
    out.push_back(launch);
  }
  return out;
}

}  // namespace mfa_sdpa
