// metal_flash_sdpa._mfa_native: encodes ccv's Metal FlashAttention v2 kernels on PyTorch's
// MPS stream, reading and writing the tensors' own MTLBuffers (no copies).
//
// Deliberately thin: the Python side (metal_flash_sdpa/kernels/mfa.py) decides what is
// eligible, lays tensors out and allocates every output; mfa_params.hpp maps a call to
// ccv's params, buffer order and limits (shared with the Linux engine, which replays it).
// This file checks what it is handed, re-checks those limits (a wrong answer from ccv would
// be silent), and encodes. Every ccv failure becomes RuntimeError, never a dead process:
// ccv throws (patch 0002) where it used to trap, and we catch it (DESIGN section 10).
//
// metal-cpp's symbols are hidden: METALCPP_SYMBOL_VISIBILITY_HIDDEN comes with the ccv
// dependency (subprojects/packagefiles/ccv/meson.build), for ccv's sources and for this one.

#include <torch/extension.h>

#include <ATen/mps/MPSDevice.h>
#include <ATen/mps/MPSStream.h>

#import <Foundation/Foundation.h>
#import <Metal/Metal.h>

#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <tuple>

#include <sys/sysctl.h>

#include "mfa_params.hpp"
#include "mfa_platform.hpp"
#include "mfa_scratch.hpp"

namespace {

// ccv's context (libraries, pipelines, scratch buffer) is not thread-safe
// (v2/ShaderCache.hpp: "WARNING: Not thread safe"), and autograd runs backward on its own
// thread: every use of it happens under this lock.
std::mutex g_mutex;
ccv_nnc_mfa_context_t* g_context = nullptr;
bool g_async_copies = false;  // the probe's decision for g_context

// The message of whatever `call` throws, or "" if it returns. Objects ccv autoreleases are
// freed in the pool here: a Python thread has no pool of its own.
template <typename F>
std::string failure_of(F&& call) {
  @autoreleasepool {
    try {
      call();
    } catch (const std::exception& error) {
      return error.what();
    } catch (...) {
      return "an exception that is not a std::exception";
    }
  }
  return "";
}

// Calls into ccv, its failures raised as RuntimeError so that the op layer falls back.
template <typename F>
void ccv_call(const char* what, F&& call) {
  const std::string failure = failure_of(call);
  TORCH_CHECK(failure.empty(), "metal_flash_sdpa: ", what, " failed: ", failure);
}

// Runs `body` in the stream's serial queue, as PyTorch's own kernels encode. An exception
// must not unwind through dispatch_sync: it is caught inside and raised here, after.
template <typename F>
void on_stream(at::mps::MPSStream* stream, const char* what, F&& body) {
  auto* run = &body;
  __block std::string failure;
  dispatch_sync(stream->queue(), ^() {
    failure = failure_of(*run);
  });
  TORCH_CHECK(failure.empty(), "metal_flash_sdpa: ", what, " failed: ", failure);
}

ccv_nnc_mfa_context_t* context_locked() {
  if (g_context == nullptr) {
    id<MTLDevice> device = at::mps::MPSDevice::getInstance()->device();
    TORCH_CHECK(device != nil, "metal_flash_sdpa: no Metal device");
    ccv_nnc_mfa_context_t* context = nullptr;
    ccv_call("creating the MFA context", [&] {
      context = ccv_nnc_init_mfa_context((__bridge MTL::Device*)device);
      // Once, before any kernel is generated: async copies only if this Mac's compiler
      // takes them (macOS 26 rejects their `__asm` declarations in runtime-compiled source).
      g_async_copies = mfa_sdpa::configure_copies(context, (__bridge MTL::Device*)device);
    });
    g_context = context;
  }
  return g_context;
}

// The context, for a call: on a GPU MFA serves (the Apple7 family or newer).
ccv_nnc_mfa_context_t* supported_context_locked() {
  ccv_nnc_mfa_context_t* context = context_locked();
  TORCH_CHECK(ccv_nnc_mfa_context_supported(context),
              "metal_flash_sdpa: this GPU is not supported by MFA (needs Apple7 or newer)");
  return context;
}

// The macOS major version (16.x read as 26: mfa_platform.hpp), read once: it cannot change
// while the process runs.
long macos_major_once() {
  static const long major = [] {
    @autoreleasepool {
      return mfa_sdpa::macos().major;
    }
  }();
  return major;
}

// PyTorch's Metal device's largest buffer (maxBufferLength), read once: the scratch of a
// call's largest slice must fit in one (mfa_params.hpp, check_scratch).
uint64_t max_buffer_length() {
  static const uint64_t length = [] {
    @autoreleasepool {
      id<MTLDevice> device = at::mps::MPSDevice::getInstance()->device();
      TORCH_CHECK(device != nil, "metal_flash_sdpa: no Metal device");
      return uint64_t(device.maxBufferLength);
    }
  }();
  return length;
}

// ccv's v2 shader cache keeps one pipeline per (R, C, batch, strides, ...) for ever: the
// kernels take those as function constants, so every new sequence length makes a pipeline
// (the compiled library, per head dim, heads, dtype and scale, is shared). We bound it
// rather than make kernels shape-independent: that would move R, C and the strides from
// function constants into a buffer in ccv's generator, a patch to every kernel the CPU
// executor verifies; a bound costs re-making pipelines, not libraries, once per
// kMaxPipelineShapes new shapes. Counted per call shape (forward and backward apart; a
// sliced call makes pipelines for at most two slice shapes: mfa_params.hpp, runs).
constexpr size_t kMaxPipelineShapes = 64;
// B R C Hq Hk D dtype backward scale causal, the mask's strides (-1: no mask), kind and
// gradient, dropout
using PipelineShape = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, bool, float, bool, int64_t,
                                 int64_t, int64_t, bool, bool, bool>;
std::set<PipelineShape> g_pipeline_shapes;

// Evicts ccv's pipelines when `shape` would be one too many. Waits for the stream first, so
// no command buffer still in flight holds an evicted pipeline, whether or not Metal retains
// it for them; eviction is rare and the pipelines it forces cost more than the wait.
void admit_pipeline_shape(ccv_nnc_mfa_context_t* context, at::mps::MPSStream* stream, const PipelineShape& shape) {
  if (g_pipeline_shapes.count(shape)) {
    return;
  }
  if (g_pipeline_shapes.size() >= kMaxPipelineShapes) {
    on_stream(stream, "waiting for the MPS stream", [&] { stream->synchronize(at::mps::SyncType::COMMIT_AND_WAIT); });
    ccv_nnc_mfa_clear_pipeline_cache(context);
    g_pipeline_shapes.clear();
  }
  g_pipeline_shapes.insert(shape);
}

// ccv's request_scratch replaces its one scratch buffer (releasing the old one) when a call
// needs more, while a command buffer not yet completed may still bind the old one (a
// forward and its backward in one of PyTorch's command buffers: mfa_scratch.hpp). Whether
// PyTorch's command buffers retain what they bind is not documented, so the replaced
// buffer is held until the current command buffer completes; buffers of one queue
// complete in order, so every earlier user of it is done by then.
void keep_until_completed(at::mps::MPSStream* stream, id<MTLBuffer> replaced) {
  [stream->commandBuffer() addCompletedHandler:^(id<MTLCommandBuffer>) {
    (void)replaced;
  }];
}

id<MTLBuffer> buffer_of(const at::Tensor& t) {
  // The MPS allocator stores the MTLBuffer as the storage's data pointer
  // (ATen/native/mps/OperationUtils.h, getMTLBufferStorage).
  return __builtin_bit_cast(id<MTLBuffer>, t.storage().data());
}

// The tensors of one call in ccv's buffer order (mfa_params.hpp).
struct Bindings {
  MTL::Buffer* buffers[mfa_sdpa::kBackwardBuffers] = {};
  size_t offsets[mfa_sdpa::kBackwardBuffers] = {};

  void bind(int index, const at::Tensor& t) {
    buffers[index] = (__bridge MTL::Buffer*)buffer_of(t);
    offsets[index] = size_t(t.storage_offset()) * size_t(t.element_size());
  }
};

// The layout of a masked call's tile summaries (patch 0013), whose kernels (and pipelines)
// for the whole call it builds; not prepare: that would size ccv's scratch for the whole
// call, which its slices never need. Under g_mutex.
mfa_sdpa::MaskTilesLayout mask_tiles_layout_locked(ccv_nnc_mfa_context_t* context,
                                                   const ccv_nnc_mfa_attention_params_t& whole) {
  mfa_sdpa::MaskTilesLayout layout;
  ccv_call("building the MFA kernels", [&] {
    ccv_nnc_mfa_attention_mask_tiles_layout(context, whole, layout.blocks, layout.entry_bytes);
  });
  return layout;
}

// Encodes on PyTorch's current MPS stream, in its serial queue, into its shared compute
// encoder, as PyTorch's own custom-kernel example does (test/cpp_extensions/mps_extension.mm).
// A long call is several ccv calls on slices of its batches or heads, one after another
// on ccv's one scratch (mfa_params.hpp, launches; patch 0011). A masked call's kernels
// read the mask's tile summaries (patch 0013), which `summarize` encodes first, from the
// mask, for the whole call; else the caller's summaries of this very mask are read as
// they are. Kernels and pipelines are built before (prepare), so the encode only reads
// ccv's caches. Nothing is committed here: PyTorch commits the command buffer when its
// own ops would.
void encode(const mfa_sdpa::Shape& s, mfa_sdpa::DType dtype, float scale, bool backward, bool causal,
            const std::optional<mfa_sdpa::MaskStrides>& mask, Bindings& bindings, bool summarize,
            const std::vector<int64_t>& summary_bytes, const std::optional<mfa_sdpa::Dropout>& dropout) {
  const std::string bad_scale = mfa_sdpa::check_scale(scale);
  TORCH_CHECK(bad_scale.empty(), "metal_flash_sdpa: MFA refuses this call: ", bad_scale);
  const mfa_sdpa::MaskStrides* mask_strides = mask ? &*mask : nullptr;
  std::lock_guard<std::mutex> lock(g_mutex);
  ccv_nnc_mfa_context_t* context = supported_context_locked();
  at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
  TORCH_CHECK(stream != nullptr, "metal_flash_sdpa: no current MPS stream");
  const mfa_sdpa::MaskStrides no_mask{-1, -1, -1};
  const mfa_sdpa::MaskStrides& m = mask ? *mask : no_mask;
  admit_pipeline_shape(context, stream,
                       {s.B, s.R, s.C, s.Hq, s.Hk, s.D, int(dtype), backward, scale, causal, m.batch, m.head, m.row,
                        m.is_bool, m.grad, dropout.has_value()});
  // Held from before prepare, which grows the scratch (as the engine's driver does).
  const mfa_sdpa::ScratchKeeper scratch(context);
  // The whole call's params: the summaries are of the whole mask, whatever the slices.
  const mfa_sdpa::Dropout* drop = dropout ? &*dropout : nullptr;
  const ccv_nnc_mfa_attention_params_t whole = mfa_sdpa::whole_params(s, dtype, scale, backward, causal, mask_strides, drop);
  mfa_sdpa::MaskTilesLayout layout;
  if (mask) {
    layout = mask_tiles_layout_locked(context, whole);
    const std::vector<std::uint64_t> needed = layout.pass_bytes(s, *mask, backward);
    for (size_t kernel = 0; kernel < needed.size(); ++kernel)
      TORCH_CHECK(summary_bytes.at(kernel) >= int64_t(needed[kernel]), "metal_flash_sdpa: a mask tile summary of ",
                  summary_bytes.at(kernel), " bytes; ", needed[kernel], " needed");
  }
  const std::vector<mfa_sdpa::Launch> launches = mfa_sdpa::launches(s, dtype, scale, backward, causal, mask_strides,
                                                                    mfa_sdpa::kScratchBudget, mask ? &layout : nullptr, drop);
  ccv_call("building the MFA kernels", [&] {
    for (const mfa_sdpa::Launch& launch : launches) ccv_nnc_mfa_prepare_attention(context, launch.params);
  });
  on_stream(stream, "encoding the MFA kernels", [&] {
    id<MTLComputeCommandEncoder> encoder = stream->commandEncoder();
    // The command buffer is PyTorch's: ccv only encodes into the borrowed encoder.
    MTL::CommandBatch batch(nullptr, (__bridge MTL::ComputeCommandEncoder*)encoder);
    if (mask && summarize) {
      ccv_nnc_mfa_encode_attention_mask_tiles(context, whole, &batch, bindings.buffers, bindings.offsets);
    }
    for (const mfa_sdpa::Launch& launch : launches) {
      size_t offsets[mfa_sdpa::kBackwardBuffers];
      for (int i = 0; i < mfa_sdpa::kBackwardBuffers; ++i) offsets[i] = bindings.offsets[i] + launch.offsets[i];
      ccv_nnc_mfa_encode_attention(context, launch.params, &batch, bindings.buffers, offsets);
    }
    if (NS::SharedPtr<MTL::Buffer> replaced = scratch.replaced()) {
      keep_until_completed(stream, (__bridge id<MTLBuffer>)replaced.get());
    }
  });
}

// Dropout as Python hands it over: (threshold, scale, seed).
using DropoutArgument = std::tuple<uint32_t, double, uint64_t>;

std::optional<mfa_sdpa::Dropout> dropout_of(const std::optional<DropoutArgument>& dropout) {
  if (!dropout) return std::nullopt;
  const auto& [threshold, scale, seed] = *dropout;
  TORCH_CHECK(threshold > 0 && scale > 1, "metal_flash_sdpa: dropout threshold ", threshold, " and scale ", scale);
  return mfa_sdpa::Dropout{threshold, float(scale), seed};
}

mfa_sdpa::DType dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return mfa_sdpa::DType::Float32;
    case at::kHalf:
      return mfa_sdpa::DType::Float16;
    case at::kBFloat16:
      return mfa_sdpa::DType::BFloat16;
    default:
      TORCH_CHECK(false, "metal_flash_sdpa: MFA serves float32, float16 and bfloat16, got ", type);
  }
  return mfa_sdpa::DType::Float32;
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

// The attention mask as the op layer hands it (kernels/mfa.py, keys_contiguous): additive in
// q's dtype or bool (read as it is, a byte an element: patch 0012), [Bm, Hm, R, C] with Bm
// in (1, B) and Hm in (1, Hq), keys contiguous, other dims at any stride (0 where it
// broadcasts, so expanded views are read in place). Its strides and kind as the kernels
// read them (our patch 0008); none without a mask.
std::optional<mfa_sdpa::MaskStrides> check_mask(const std::optional<at::Tensor>& mask, const at::Tensor& q,
                                                const mfa_sdpa::Shape& s) {
  if (!mask.has_value()) {
    return std::nullopt;
  }
  const at::Tensor& m = *mask;
  TORCH_CHECK(m.defined() && m.dim() == 4, "metal_flash_sdpa: mask must be 4-D [batch, heads, q_len, kv_len]");
  TORCH_CHECK(m.device() == q.device(), "metal_flash_sdpa: mask is on ", m.device(), ", query on ", q.device());
  const bool is_bool = m.scalar_type() == at::kBool;
  TORCH_CHECK(is_bool || m.scalar_type() == q.scalar_type(), "metal_flash_sdpa: mask must be bool or ",
              q.scalar_type(), ", got ", m.scalar_type());
  TORCH_CHECK((m.size(0) == 1 || m.size(0) == s.B) && (m.size(1) == 1 || m.size(1) == s.Hq) && m.size(2) == s.R &&
                  m.size(3) == s.C,
              "metal_flash_sdpa: mask of shape ", m.sizes(), " does not broadcast to [", s.B, ", ", s.Hq, ", ", s.R,
              ", ", s.C, "]");
  TORCH_CHECK(m.stride(3) == 1 || s.C == 1, "metal_flash_sdpa: mask keys must be contiguous");
  TORCH_CHECK(m.storage().data() != nullptr, "metal_flash_sdpa: mask has no storage");
  auto stride = [&](int dim) { return m.size(dim) == 1 ? int64_t(0) : m.stride(dim); };
  return mfa_sdpa::MaskStrides{stride(0), stride(1), stride(2), is_bool};
}

// q [B, R, Hq, D], k and v [B, C, Hk, D], within what the pinned ccv computes correctly.
mfa_sdpa::Shape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool backward,
                          const std::optional<at::Tensor>& mask, std::optional<mfa_sdpa::MaskStrides>& strides) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "metal_flash_sdpa: q, k, v must be 4-D [batch, seq, heads, head_dim]");
  const mfa_sdpa::Shape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  const auto dtype = q.scalar_type();
  check_tensor(q, "q", q, dtype);
  check_tensor(k, "k", q, dtype);
  check_tensor(v, "v", q, dtype);
  check_shape(k, "k", {s.B, s.C, s.Hk, s.D});
  check_shape(v, "v", {s.B, s.C, s.Hk, s.D});
  strides = check_mask(mask, q, s);
  const std::string too_old = mfa_sdpa::check_macos(macos_major_once());
  TORCH_CHECK(too_old.empty(), "metal_flash_sdpa: MFA refuses this call: ", too_old);
  std::string refused = mfa_sdpa::check_limits(s, dtype_of(dtype), backward, strides ? &*strides : nullptr);
  if (refused.empty()) refused = mfa_sdpa::check_scratch(s, dtype_of(dtype), backward, max_buffer_length());
  TORCH_CHECK(refused.empty(), "metal_flash_sdpa: MFA refuses this call: ", refused);
  return s;
}

// A mask's tile summaries (patch 0013) as the caller hands them: one uint8 MPS tensor a
// kernel of the pass (mask_tiles_bytes), none without a mask; their sizes, checked
// against ccv's layout in encode.
std::vector<int64_t> check_mask_tiles(const std::vector<at::Tensor>& tiles, const std::optional<at::Tensor>& mask,
                                      const at::Tensor& q, bool backward) {
  TORCH_CHECK(tiles.size() == (mask ? (backward ? 2u : 1u) : 0u), "metal_flash_sdpa: ", tiles.size(),
              " mask tile summaries for a ", mask ? "masked " : "", backward ? "backward" : "forward");
  std::vector<int64_t> bytes;
  for (const at::Tensor& t : tiles) {
    check_tensor(t, "mask_tiles", q, at::kByte);
    bytes.push_back(t.numel());
  }
  return bytes;
}

}  // namespace

// The bytes of each tile summary of a masked call (patch 0013): the forward's, or the
// backward-query's and backward-key-value's; builds the call's kernels.
std::vector<int64_t> mask_tiles_bytes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                      bool causal, const at::Tensor& mask, bool backward,
                                      const std::optional<DropoutArgument>& dropout, bool mask_grad) {
  std::optional<mfa_sdpa::MaskStrides> strides;
  const mfa_sdpa::Shape s = check_qkv(q, k, v, backward, mask, strides);
  strides->grad = mask_grad;  // the kernels the call runs (a backward's: make_params)
  const mfa_sdpa::DType dtype = dtype_of(q.scalar_type());
  const std::optional<mfa_sdpa::Dropout> drop = dropout_of(dropout);
  std::lock_guard<std::mutex> lock(g_mutex);
  const mfa_sdpa::MaskTilesLayout layout = mask_tiles_layout_locked(
      supported_context_locked(),
      mfa_sdpa::whole_params(s, dtype, float(scale), backward, causal, &*strides, drop ? &*drop : nullptr));
  const std::vector<std::uint64_t> bytes = layout.pass_bytes(s, *strides, backward);
  return std::vector<int64_t>(bytes.begin(), bytes.end());
}

// out [B, R, H, D] (q's dtype), lse [B, H, R] float32: preallocated by the caller.
// causal: torch's is_causal, top-left (query i attends keys j <= i; patch 0007).
// mask: an attention mask, additive or bool (check_mask; patches 0008, 0012), or None;
// mask_tiles: its tile summary (patch 0013), which `summarize` writes first, else one
// the caller had written from this mask unchanged.
// dropout: (threshold, scale, seed) as metal_flash_sdpa.kernels.mfa.dropout_parameters
// computes them (patch 0015), or None.
void attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& out, const at::Tensor& lse, double scale, bool causal,
                       const std::optional<at::Tensor>& mask, const std::vector<at::Tensor>& mask_tiles,
                       bool summarize, const std::optional<DropoutArgument>& dropout) {
  std::optional<mfa_sdpa::MaskStrides> strides;
  const mfa_sdpa::Shape s = check_qkv(q, k, v, false, mask, strides);
  const std::vector<int64_t> summary_bytes = check_mask_tiles(mask_tiles, mask, q, false);
  check_tensor(out, "out", q, q.scalar_type());
  check_shape(out, "out", {s.B, s.R, s.Hq, s.D});
  check_tensor(lse, "lse", q, at::kFloat);
  check_shape(lse, "lse", {s.B, s.Hq, s.R});

  Bindings bindings;
  bindings.bind(mfa_sdpa::kFwdQ, q);
  bindings.bind(mfa_sdpa::kFwdK, k);
  bindings.bind(mfa_sdpa::kFwdV, v);
  bindings.bind(mfa_sdpa::kFwdO, out);
  bindings.bind(mfa_sdpa::kFwdLSE, lse);  // ours, so ccv allocates no LSE scratch
  if (mask) bindings.bind(mfa_sdpa::kFwdMask, *mask);
  if (mask) bindings.bind(mfa_sdpa::kFwdMaskTiles, mask_tiles[0]);
  encode(s, dtype_of(q.scalar_type()), float(scale), false, causal, strides, bindings, summarize, summary_bytes,
         dropout_of(dropout));
}

// grad_out, dq [B, R, H, D]; dk, dv [B, C, H, D]; out and lse as attention_forward wrote
// them. Nothing here depends on the forward call beyond those tensors and `scale`: the
// params come from the same make_params (fp32 LSE, log2 domain, for both), the context's
// settings are process-wide, and a pipeline eviction between the two drops no data.
// mask_grad (with an additive mask): the mask's gradient, which the kernels add into (patch
// 0017): zeroed by the caller, of the mask's dtype, shape and strides (a broadcast view).
void attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& out, const at::Tensor& lse, const at::Tensor& grad_out,
                        const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, double scale,
                        bool causal, const std::optional<at::Tensor>& mask, const std::vector<at::Tensor>& mask_tiles,
                        bool summarize, const std::optional<DropoutArgument>& dropout,
                        const std::optional<at::Tensor>& mask_grad) {
  std::optional<mfa_sdpa::MaskStrides> strides;
  const mfa_sdpa::Shape s = check_qkv(q, k, v, true, mask, strides);
  if (mask_grad) {
    TORCH_CHECK(mask && !strides->is_bool, "metal_flash_sdpa: a mask gradient needs an additive mask");
    check_tensor(*mask_grad, "mask_grad", q, q.scalar_type());
    TORCH_CHECK(mask_grad->sizes() == mask->sizes() && mask_grad->strides() == mask->strides() &&
                    (strides->row != 0 || s.R == 1),
                "metal_flash_sdpa: mask_grad must have the mask's shape and strides, a row per query");
    strides->grad = true;
  }
  const std::vector<int64_t> summary_bytes = check_mask_tiles(mask_tiles, mask, q, true);
  const auto dtype = q.scalar_type();
  check_tensor(out, "out", q, dtype);
  check_shape(out, "out", {s.B, s.R, s.Hq, s.D});
  check_tensor(lse, "lse", q, at::kFloat);
  check_shape(lse, "lse", {s.B, s.Hq, s.R});
  check_tensor(grad_out, "grad_out", q, dtype);
  check_shape(grad_out, "grad_out", {s.B, s.R, s.Hq, s.D});
  check_tensor(dq, "dq", q, dtype);
  check_shape(dq, "dq", {s.B, s.R, s.Hq, s.D});
  check_tensor(dk, "dk", q, dtype);
  check_shape(dk, "dk", {s.B, s.C, s.Hk, s.D});
  check_tensor(dv, "dv", q, dtype);
  check_shape(dv, "dv", {s.B, s.C, s.Hk, s.D});

  Bindings bindings;
  bindings.bind(mfa_sdpa::kBwdQ, q);
  bindings.bind(mfa_sdpa::kBwdK, k);
  bindings.bind(mfa_sdpa::kBwdV, v);
  bindings.bind(mfa_sdpa::kBwdO, out);
  bindings.bind(mfa_sdpa::kBwdLSE, lse);
  bindings.bind(mfa_sdpa::kBwdDO, grad_out);
  bindings.bind(mfa_sdpa::kBwdDQ, dq);
  bindings.bind(mfa_sdpa::kBwdDK, dk);
  bindings.bind(mfa_sdpa::kBwdDV, dv);
  if (mask) {
    bindings.bind(mfa_sdpa::kBwdMask, *mask);
    bindings.bind(mfa_sdpa::kBwdMaskTilesQ, mask_tiles[0]);
    bindings.bind(mfa_sdpa::kBwdMaskTilesKV, mask_tiles[1]);
  }
  if (mask_grad) bindings.bind(mfa_sdpa::kBwdMaskGrad, *mask_grad);
  encode(s, dtype_of(dtype), float(scale), true, causal, strides, bindings, summarize, summary_bytes, dropout_of(dropout));
}

// Whether ccv's MFA runs on this GPU (Apple7 family or newer); creates the context.
bool device_supported() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return ccv_nnc_mfa_context_supported(context_locked()) != 0;
}

// The OS build, as `sw_vers -buildVersion` prints it ("24F74"); "" if unreadable.
std::string macos_build() {
  char build[64] = {};
  size_t size = sizeof build - 1;
  return sysctlbyname("kern.osversion", build, &size, nullptr, 0) == 0 ? std::string(build) : std::string();
}

// What results on this machine depend on, for the first-use self-check's verdicts and for
// bug reports: the GPU, the OS as NSProcessInfo reports it and its build, the probe's
// copy mode and the Metal language the kernels compile as. Creates ccv's context.
py::dict device_info() {
  std::string gpu, version;
  bool async_copies = false;
  {
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lock(g_mutex);
    ccv_nnc_mfa_context_t* context = context_locked();
    ccv_call("reading the platform", [&] {
      gpu = context->device->name()->utf8String();
      version = mfa_sdpa::macos().reported;
    });
    async_copies = g_async_copies;
  }
  py::dict info;
  info["gpu"] = gpu;
  info["macos_version"] = version;
  info["macos_build"] = macos_build();
  info["async_copies"] = async_copies;
  info["metal_language"] = mfa_sdpa::metal_language();
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Metal FlashAttention (ccv MFA v2) encoded on PyTorch's MPS stream";
  m.def("attention_forward", &attention_forward,
        "Writes out and lse (float32 [B, H, R]: log2-sum-exp of the scaled scores; with a mask, in natural "
        "units) for q [B, R, H, D], k and v [B, C, H, D], and an optional mask [B or 1, H or 1, R, C], additive in q's dtype or bool.",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("scale"), py::arg("causal"),
        py::arg("mask") = py::none(), py::arg("mask_tiles") = std::vector<at::Tensor>(), py::arg("summarize") = true,
        py::arg("dropout") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("attention_backward", &attention_backward,
        "Writes dq, dk, dv from the forward's out and lse; adds the mask's gradient into mask_grad if given.",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("grad_out"),
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("scale"), py::arg("causal"),
        py::arg("mask") = py::none(), py::arg("mask_tiles") = std::vector<at::Tensor>(), py::arg("summarize") = true,
        py::arg("dropout") = py::none(), py::arg("mask_grad") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("mask_tiles_bytes", &mask_tiles_bytes,
        "The bytes of a masked call's tile summaries: [forward] or [backward-query, backward-key-value].",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("scale"), py::arg("causal"), py::arg("mask"),
        py::arg("backward"), py::arg("dropout") = py::none(), py::arg("mask_grad") = false,
        py::call_guard<py::gil_scoped_release>());
  m.def("device_supported", &device_supported, py::call_guard<py::gil_scoped_release>());
  m.def("device_info", &device_info,
        "{gpu, macos_version (NSProcessInfo's), macos_build, async_copies (the probe's decision), metal_language}");
  m.def("max_buffer_length", &max_buffer_length, "the Metal device's maxBufferLength in bytes",
        py::call_guard<py::gil_scoped_release>());
  m.def("macos_major", &macos_major_once, "macOS major version; NSProcessInfo's compatibility reading 16 as 26",
        py::call_guard<py::gil_scoped_release>());
  m.attr("CCV_COMMIT") = "85efcf823fdb459559f21726703b863da2b378f2";
}
