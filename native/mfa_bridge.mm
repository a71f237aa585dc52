// metal_flash_sdpa._mfa_native: encodes ccv's Metal FlashAttention v2 kernels on PyTorch's
// MPS stream, reading and writing the tensors' own MTLBuffers (no copies).
//
// Deliberately thin: the Python side (metal_flash_sdpa/kernels/mfa.py) decides what is
// eligible, lays tensors out and allocates every output. This file checks what it is
// handed (so a bad call raises RuntimeError instead of reaching ccv, whose failures trap
// the process), fills ccv's params struct and encodes.
//
// Facts about the pinned ccv (subprojects/ccv.wrap) this relies on, all in
// lib/nnc/mfa/ccv_nnc_mfa_attention.cpp unless noted:
//  - the runtime-generated v2 kernels serve only `!masked && Hq == Hk`; everything else
//    goes to the precompiled v1 library, which has no backward and no LSE output;
//  - data types: float and half (bf16 would be read as float: it is not recognised);
//  - forward buffers  tensors[0..5] = Q K V O mask LSE;
//    backward buffers tensors[0..8] = Q K V O LSE dO dQ dK dV;
//  - Q/O/dO/dQ are [B, R, H, D] and K/V/dK/dV [B, C, H, D] (leading dimension H * D,
//    batch stride R*H*D resp. C*H*D); LSE is [B, H, R] float32 (v2/AttentionKernel.cpp,
//    operandLocationWithHeadOffsetValue) holding m + log2(l) of the scaled scores;
//  - half outputs go through ccv's one scratch buffer (context->request_scratch) and a
//    cast kernel; its byte count is kept in an `int` and rounded with `1 << n` (int), so
//    we refuse calls whose scratch exceeds kMaxScratchBytes;
//  - every failure inside ccv (shader compile, precondition) calls __builtin_trap().

#include <torch/extension.h>

#include <ATen/mps/MPSDevice.h>
#include <ATen/mps/MPSStream.h>

#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>

#include "ccv_nnc_mfa.hpp"

namespace {

// ccv's scratch request rounds up with `1 << uint64_t(64 - clz(size - 1))` where the 1 is an
// int (ccv_nnc_mfa.cpp, mfa::context::request_scratch): sizes above 2^30 bytes would shift
// an int by 31 or more. The encode also sums the scratch size in an `auto x = 0` (int).
constexpr uint64_t kMaxScratchBytes = uint64_t(1) << 30;

// ccv's context (metallib, pipeline and shader caches, scratch buffer) is not thread-safe
// (v2/ShaderCache.hpp: "WARNING: Not thread safe"), and autograd runs backward on its own
// thread: every use of it happens under this lock.
std::mutex g_mutex;
ccv_nnc_mfa_context_t* g_context = nullptr;

ccv_nnc_mfa_context_t* context_locked() {
  if (g_context == nullptr) {
    id<MTLDevice> device = at::mps::MPSDevice::getInstance()->device();
    TORCH_CHECK(device != nil, "metal_flash_sdpa: no Metal device");
    g_context = ccv_nnc_init_mfa_context((__bridge MTL::Device*)device);
  }
  return g_context;
}

id<MTLBuffer> buffer_of(const at::Tensor& t) {
  // The MPS allocator stores the MTLBuffer as the storage's data pointer
  // (ATen/native/mps/OperationUtils.h, getMTLBufferStorage).
  return __builtin_bit_cast(id<MTLBuffer>, t.storage().data());
}

size_t offset_of(const at::Tensor& t) {
  return size_t(t.storage_offset()) * size_t(t.element_size());
}

uint64_t mtl_data_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat:
      return MTL::DataTypeFloat;
    case at::kHalf:
      return MTL::DataTypeHalf;
    default:
      TORCH_CHECK(false, "metal_flash_sdpa: MFA supports float32 and float16, got ", dtype);
  }
  return 0;
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& q, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), "metal_flash_sdpa: ", name, " is undefined");
  TORCH_CHECK(t.device().is_mps(), "metal_flash_sdpa: ", name, " must be on the MPS device, got ", t.device());
  TORCH_CHECK(t.device() == q.device(), "metal_flash_sdpa: ", name, " is on ", t.device(), ", query on ", q.device());
  TORCH_CHECK(t.scalar_type() == dtype, "metal_flash_sdpa: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "metal_flash_sdpa: ", name, " must be contiguous");
  TORCH_CHECK(t.storage().data() != nullptr, "metal_flash_sdpa: ", name, " has no storage");
}

void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "metal_flash_sdpa: ", name, " must have shape ", expected, ", got ", t.sizes());
}

struct Shape {
  int64_t B, R, C, H, D;
};

// Q [B, R, H, D], K and V [B, C, H, D]: the layout ccv's encode assumes.
Shape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "metal_flash_sdpa: q, k, v must be 4-D [batch, seq, heads, head_dim]");
  Shape s{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3)};
  const auto dtype = q.scalar_type();
  mtl_data_type(dtype);  // raises for unsupported types
  check_tensor(q, "q", q, dtype);
  check_tensor(k, "k", q, dtype);
  check_tensor(v, "v", q, dtype);
  check_shape(k, "k", {s.B, s.C, s.H, s.D});
  check_shape(v, "v", {s.B, s.C, s.H, s.D});
  TORCH_CHECK(s.B >= 1 && s.R >= 1 && s.C >= 1 && s.H >= 1 && s.D >= 1,
              "metal_flash_sdpa: empty attention is not sent to MFA");
  // AttentionDescriptor keeps Hq and the head dimension in unsigned short, R, C and the
  // batch in uint32; the parameter tables (v2/AttentionDescriptor.cpp) end at D = 384.
  TORCH_CHECK(s.D <= 384 && s.H <= std::numeric_limits<uint16_t>::max(),
              "metal_flash_sdpa: head_dim ", s.D, " / heads ", s.H, " out of MFA's range");
  const int64_t u32 = std::numeric_limits<uint32_t>::max();
  TORCH_CHECK(s.R <= u32 && s.C <= u32 && s.B <= u32, "metal_flash_sdpa: sizes exceed 32 bits");
  return s;
}

ccv_nnc_mfa_attention_params_t make_params(const Shape& s, at::ScalarType dtype, double scale, uint8_t type) {
  ccv_nnc_mfa_attention_params_t p;
  std::memset(&p, 0, sizeof(p));  // also zeroes batch_dims_mask: "no mask batch"
  p.data_type = mtl_data_type(dtype);
  p.R = uint32_t(s.R);
  p.C = uint32_t(s.C);
  p.Hq = uint32_t(s.H);
  p.Hk = uint32_t(s.H);
  p.D = uint32_t(s.D);
  p.Q_trans = p.K_trans = p.V_trans = p.O_trans = 0;
  p.alpha = float(scale);
  p.masked = 0;
  // upcast: intermediates (and so L) in float32 for half inputs too
  // (lowPrecisionIntermediates = half && !upcast).
  p.upcast = 1;
  p.type = type;  // 0 forward, anything else backward (dQ then dK/dV)
  // batch_dims_q is a zero-terminated list; one entry of B is the whole batch.
  p.batched = s.B > 1 ? 1 : 0;
  if (s.B > 1) {
    p.batch_dims_q[0] = uint32_t(s.B);
  }
  return p;
}

uint64_t scratch_bytes(const Shape& s, bool half, bool backward) {
  const uint64_t B = s.B, R = s.R, C = s.C, H = s.H, D = s.D;
  if (!backward) {
    // fp32 copy of O for the cast; LSE is ours, so no LSE scratch
    return half ? 4 * R * D * H * B : 0;
  }
  // fp32 dQ, dK, dV for the casts, plus the D term (always)
  return (half ? 4 * (R + 2 * C) * D * H * B : 0) + 4 * R * H * B;
}

void check_scratch(const Shape& s, bool half, bool backward) {
  const uint64_t bytes = scratch_bytes(s, half, backward);
  TORCH_CHECK(bytes <= kMaxScratchBytes, "metal_flash_sdpa: call needs ", bytes,
              " bytes of MFA scratch, more than the pinned ccv handles (", kMaxScratchBytes, ")");
}

// Encodes on PyTorch's current MPS stream, inside its serial queue, into its shared compute
// encoder, the way PyTorch's own custom-kernel example does
// (test/cpp_extensions/mps_extension.mm). Nothing is committed here: PyTorch commits the
// command buffer when its own ops would.
void encode(ccv_nnc_mfa_attention_params_t params, MTL::Buffer** buffers, size_t* offsets) {
  std::lock_guard<std::mutex> lock(g_mutex);
  ccv_nnc_mfa_context_t* context = context_locked();
  TORCH_CHECK(ccv_nnc_mfa_context_supported(context), "metal_flash_sdpa: this GPU is not supported by MFA (needs Apple7 or newer)");
  ccv_nnc_mfa_prepare_attention(context, params);
  at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
  TORCH_CHECK(stream != nullptr, "metal_flash_sdpa: no current MPS stream");
  // Nothing inside the block may throw: an exception cannot cross dispatch_sync.
  dispatch_sync(stream->queue(), ^() {
    @autoreleasepool {
      id<MTLComputeCommandEncoder> encoder = stream->commandEncoder();
      // The command buffer is owned by PyTorch; ccv's encode only uses the encoder
      // (the buffer is touched only by the destructor of a batch that owns it).
      MTL::CommandBatch batch(nullptr, (__bridge MTL::ComputeCommandEncoder*)encoder);
      ccv_nnc_mfa_encode_attention(context, params, &batch, buffers, offsets);
    }
  });
}

MTL::Buffer* mtl(const at::Tensor& t) {
  return (__bridge MTL::Buffer*)buffer_of(t);
}

}  // namespace

// out [B, R, H, D] (q's dtype), lse [B, H, R] float32: preallocated by the caller.
void attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& out, const at::Tensor& lse, double scale) {
  const Shape s = check_qkv(q, k, v);
  check_tensor(out, "out", q, q.scalar_type());
  check_shape(out, "out", {s.B, s.R, s.H, s.D});
  check_tensor(lse, "lse", q, at::kFloat);
  check_shape(lse, "lse", {s.B, s.H, s.R});
  const bool half = q.scalar_type() == at::kHalf;
  check_scratch(s, half, false);

  const auto params = make_params(s, q.scalar_type(), scale, 0);
  MTL::Buffer* buffers[6] = {mtl(q), mtl(k), mtl(v), mtl(out), nullptr, mtl(lse)};
  size_t offsets[6] = {offset_of(q), offset_of(k), offset_of(v), offset_of(out), 0, offset_of(lse)};
  encode(params, buffers, offsets);
}

// grad_out, dq [B, R, H, D]; dk, dv [B, C, H, D]; lse as written by attention_forward.
void attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out,
                        const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, double scale) {
  const Shape s = check_qkv(q, k, v);
  const auto dtype = q.scalar_type();
  check_tensor(out, "out", q, dtype);
  check_shape(out, "out", {s.B, s.R, s.H, s.D});
  check_tensor(lse, "lse", q, at::kFloat);
  check_shape(lse, "lse", {s.B, s.H, s.R});
  check_tensor(grad_out, "grad_out", q, dtype);
  check_shape(grad_out, "grad_out", {s.B, s.R, s.H, s.D});
  check_tensor(dq, "dq", q, dtype);
  check_shape(dq, "dq", {s.B, s.R, s.H, s.D});
  check_tensor(dk, "dk", q, dtype);
  check_shape(dk, "dk", {s.B, s.C, s.H, s.D});
  check_tensor(dv, "dv", q, dtype);
  check_shape(dv, "dv", {s.B, s.C, s.H, s.D});
  const bool half = dtype == at::kHalf;
  check_scratch(s, half, true);

  const auto params = make_params(s, dtype, scale, 1);
  MTL::Buffer* buffers[9] = {mtl(q), mtl(k), mtl(v), mtl(out), mtl(lse), mtl(grad_out), mtl(dq), mtl(dk), mtl(dv)};
  size_t offsets[9] = {offset_of(q), offset_of(k), offset_of(v), offset_of(out), offset_of(lse),
                       offset_of(grad_out), offset_of(dq), offset_of(dk), offset_of(dv)};
  encode(params, buffers, offsets);
}

// Whether ccv's MFA runs on this GPU (Apple7 family or newer); creates the context.
bool device_supported() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return ccv_nnc_mfa_context_supported(context_locked()) != 0;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Metal FlashAttention (ccv MFA v2) encoded on PyTorch's MPS stream";
  m.def("attention_forward", &attention_forward,
        "Writes out and lse (log2-sum-exp, float32 [B, H, R]) for q [B, R, H, D], k and v [B, C, H, D].",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>());
  m.def("attention_backward", &attention_backward,
        "Writes dq, dk, dv from the forward's out and lse.",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("grad_out"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("scale"),
        py::call_guard<py::gil_scoped_release>());
  m.def("device_supported", &device_supported, py::call_guard<py::gil_scoped_release>());
  m.attr("CCV_COMMIT") = "85efcf823fdb459559f21726703b863da2b378f2";
}
