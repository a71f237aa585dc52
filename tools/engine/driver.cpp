// Encodes one SDPA call through ccv's own MFA encode path, with the params the bridge fills
// (native/mfa_params.hpp), against the recording metal-cpp stand-in, and prints the record
// as JSON: the Metal source of every kernel, the pipelines with their function constants,
// and every dispatch with its bindings. tools/engine/ turns that into source listings and
// CPU executions.
//
//   driver --dtype fp16 --batch B --heads H --kv-heads HK --q-len R --kv-len C --head-dim D
//          [--grad] [--causal] [--mask-strides B,H,ROW [--mask-bool] [--mask-grad]] [--dropout THRESHOLD,SCALE,SEED]
//          [--gpu apple7|apple9] [--macos N] [--scale S]
//          [--os-reports V] [--offset BYTES]
//          [--async-copies auto|on|off] [--fault empty-library|nil-pipeline|no-memory]
//          [--no-prepare] [--same-command-buffer] [--no-keep-scratch] [--scratch-budget BYTES]
//   driver --compile-source FILE [--language X.Y|none] [--macos N]
//
// --compile-source: only compile FILE's Metal source on the modelled compiler, with the
// language version given (none: no compile options), and print {"compiled": true} or
// (exit 3) {"error": ...}: the stand-in compiler's own rules, tested apart.
// --macos N: the modelled Mac's compiler (from 26 on it rejects `__asm` in source);
// --os-reports V: what its NSProcessInfo reports (MAJOR[.MINOR[.PATCH]], default N), as a
// process linked against an older SDK is told 16.x on macOS 26.
// --async-copies: whether ccv's kernels use the async-copy intrinsics; auto decides by the
// bridge's probe (native/mfa_platform.hpp). --fault no-memory: buffers beyond ccv's initial 64 KiB
// scratch cannot be allocated. --no-prepare: encode without preparing first, as ccv's own
// callers may: the encode then builds and allocates for itself, so its own failure paths
// (inside a command) run.
//
// --same-command-buffer: the forward and the backward go into one command buffer, which
// completes only after both (as PyTorch's stream may commit them together); by default
// each completes after its encode. The stand-in device records every release of a buffer
// that a dispatch of a command buffer not yet completed binds, and the run fails (exit 3).
// The bridge keeps the scratch ccv replaces during a call until the command buffer
// completes (native/mfa_scratch.hpp); --no-keep-scratch does not, as the bridge did before.
//
// --scratch-budget: the most scratch a slice of the call may use (mfa_params.hpp,
// plan_slices; the bridge's is kScratchBudget), lowered by tests so that calls the CPU
// can execute run as slices.
//
// --mask-strides: an additive attention mask in the call's dtype, with these strides in
// elements (batch, query head, query row; 0 where it broadcasts), in a buffer "mask" of
// the span they reach (mfa_params.hpp, mask_span); with --mask-bool a bool mask instead, a
// byte an element (patch 0012). A masked call's kernels read the mask's tile summaries
// (patch 0013), in buffers "mask_tiles_forward", "mask_tiles_backward_query" and
// "mask_tiles_backward_key_value", which the summary kernels write from the mask in the
// same command buffer before each pass, as the bridge encodes them. --mask-grad (with an
// additive mask and --grad): the backward adds the mask's gradient into a buffer
// "mask_grad" laid out as the mask (patch 0017), which the caller zeroes.
//
// Exit 0 with the record; 2 (JSON {"refused": ...}) when the bridge would refuse the call;
// 3 (JSON {"error": ...}) when ccv raised.
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "../../native/mfa_params.hpp"
#include "../../native/mfa_platform.hpp"
#include "../../native/mfa_scratch.hpp"
#include "recorder.hpp"

namespace {

struct Options {
  mfa_sdpa::Shape shape{1, 1, 1, 1, 1, 64};
  mfa_sdpa::DType dtype = mfa_sdpa::DType::Float32;
  bool grad = false;
  bool causal = false;  // torch's is_causal (top-left)
  bool masked = false;
  mfa_sdpa::MaskStrides mask{0, 0, 0};
  double scale = NAN;  // unset: 1/sqrt(D), as SDPA's default (0 is 0: refused)
  std::uint64_t offset = 0;
  std::string async_copies = "auto";  // auto, on, off
  bool prepare = true;
  bool same_command_buffer = false;
  bool keep_scratch = true;
  std::uint64_t scratch_budget = mfa_sdpa::kScratchBudget;
  std::string compile_source;      // --compile-source FILE
  std::string language = "none";  // with it: X.Y or none
  bool dropout = false;            // --dropout THRESHOLD,SCALE,SEED (metal_flash_sdpa.dropout's)
  mfa_sdpa::Dropout drop{0, 0, 0};
};

// The scratch buffer ccv's context allocates when it is created.
constexpr std::uint64_t kInitialScratchBytes = 65536;

[[noreturn]] void usage(const std::string& message) {
  std::fprintf(stderr, "driver: %s\n", message.c_str());
  std::exit(64);
}

Options parse(int argc, char** argv) {
  Options o;
  bool kv_heads_given = false;
  bool os_reports_given = false;
  bool scale_given = false;
  auto& device = mfa_engine::record().device;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage("missing value for " + a);
      return argv[++i];
    };
    if (a == "--causal") {
      o.causal = true;
    } else if (a == "--mask-strides") {
      o.masked = true;
      if (std::sscanf(value().c_str(), "%" SCNd64 ",%" SCNd64 ",%" SCNd64, &o.mask.batch, &o.mask.head, &o.mask.row) != 3)
        usage("--mask-strides takes B,H,ROW");
    } else if (a == "--dropout") {
      o.dropout = true;
      if (std::sscanf(value().c_str(), "%" SCNu32 ",%f,%" SCNu64, &o.drop.threshold, &o.drop.scale, &o.drop.seed) != 3)
        usage("--dropout takes THRESHOLD,SCALE,SEED");
    } else if (a == "--mask-bool") {
      o.mask.is_bool = true;
    } else if (a == "--mask-grad") {
      o.mask.grad = true;
    } else if (a == "--grad") {
      o.grad = true;
    } else if (a == "--compile-source") {
      o.compile_source = value();
    } else if (a == "--language") {
      o.language = value();
    } else if (a == "--same-command-buffer") {
      o.same_command_buffer = true;
    } else if (a == "--no-keep-scratch") {
      o.keep_scratch = false;
    } else if (a == "--scratch-budget") {
      o.scratch_budget = std::strtoull(value().c_str(), nullptr, 10);
      if (o.scratch_budget == 0) usage("--scratch-budget takes a positive byte count");
    } else if (a == "--no-prepare") {
      o.prepare = false;
    } else if (a == "--dtype") {
      const std::string v = value();
      if (v == "fp32") o.dtype = mfa_sdpa::DType::Float32;
      else if (v == "fp16") o.dtype = mfa_sdpa::DType::Float16;
      else if (v == "bf16") o.dtype = mfa_sdpa::DType::BFloat16;  // our patch 0005
      else usage("dtype " + v + " is not served at this ccv pin");
    } else if (a == "--batch") {
      o.shape.B = std::atoll(value().c_str());
    } else if (a == "--heads") {
      o.shape.Hq = std::atoll(value().c_str());
    } else if (a == "--kv-heads") {
      o.shape.Hk = std::atoll(value().c_str());
      kv_heads_given = true;
    } else if (a == "--q-len") {
      o.shape.R = std::atoll(value().c_str());
    } else if (a == "--kv-len") {
      o.shape.C = std::atoll(value().c_str());
    } else if (a == "--head-dim") {
      o.shape.D = std::atoll(value().c_str());
    } else if (a == "--scale") {
      o.scale = std::strtod(value().c_str(), nullptr);
      scale_given = true;
    } else if (a == "--offset") {
      o.offset = std::strtoull(value().c_str(), nullptr, 10);
    } else if (a == "--gpu") {
      const std::string v = value();
      if (v == "apple7") device.gpu_family = 1007;
      else if (v == "apple9") device.gpu_family = 1009;
      else usage("unknown gpu " + v);
    } else if (a == "--macos") {
      device.macos = std::atoi(value().c_str());
    } else if (a == "--os-reports") {
      long* v = device.os_reports;
      v[1] = v[2] = 0;
      if (std::sscanf(value().c_str(), "%ld.%ld.%ld", &v[0], &v[1], &v[2]) < 1) usage("--os-reports takes MAJOR[.MINOR[.PATCH]]");
      os_reports_given = true;
    } else if (a == "--async-copies") {
      o.async_copies = value();
      if (o.async_copies != "auto" && o.async_copies != "on" && o.async_copies != "off")
        usage("--async-copies is auto, on or off");
    } else if (a == "--fault") {
      device.fault = value();
      if (device.fault == "no-memory") device.max_buffer_bytes = kInitialScratchBytes;
      else if (device.fault != "empty-library" && device.fault != "nil-pipeline") usage("unknown fault " + device.fault);
    } else {
      usage("unknown argument " + a);
    }
  }
  if (!kv_heads_given) o.shape.Hk = o.shape.Hq;
  device.reject_asm = device.macos >= 26;
  if (!os_reports_given) {
    device.os_reports[0] = device.macos;
    device.os_reports[1] = device.os_reports[2] = 0;
  }
  if (std::isnan(o.scale) && !scale_given) o.scale = 1.0 / std::sqrt(double(o.shape.D));
  return o;
}

// Tensors as the bridge hands them over: [B, S, H, D] (LSE [B, H, R] fp32), each at `offset`
// bytes into its own buffer, as a tensor view into a larger storage would be.
struct Tensor {
  MTL::Buffer* buffer;
  std::size_t offset;
};

Tensor tensor(const char* name, std::uint64_t elements, std::uint64_t element_size, std::uint64_t offset) {
  return {mfa_engine::tensor_buffer(name, offset + elements * element_size), std::size_t(offset)};
}

struct Call {
  bool prepare;
  ccv_nnc_mfa_context_t* context;
  ccv_nnc_mfa_attention_params_t params;
  MTL::CommandBatch* batch;
  MTL::Buffer** buffers;
  std::size_t* offsets;
};

// A pipeline as Metal would build it: its library's source, function and constants.
std::string pipeline_identity(const mfa_engine::Pipeline& pipeline) {
  std::string identity = mfa_engine::record().libraries[pipeline.library].source + '\0' + pipeline.function;
  for (const auto& [index, value] : pipeline.constants)
    identity += '\0' + std::to_string(index) + ':' + std::to_string(value.type) + ':' +
                std::string(value.bytes.begin(), value.bytes.end());
  return identity;
}

// As the bridge does: prepare builds every kernel and pipeline and allocates the scratch
// (and may raise); the encode, which the bridge runs inside dispatch_sync, must only find
// them. (Pipelines are compared by content, not counted: host/simd's simd_all reads the
// padding lane of 3-vectors, so ccv's cache lookups can miss and rebuild an identical
// pipeline here.)
void prepare_and_encode(const Call& call) {
  if (!call.prepare) {
    ccv_nnc_mfa_encode_attention(call.context, call.params, call.batch, call.buffers, call.offsets);
    return;
  }
  ccv_nnc_mfa_prepare_attention(call.context, call.params);
  auto& r = mfa_engine::record();
  std::set<std::string> prepared;
  for (const auto& pipeline : r.pipelines) prepared.insert(pipeline_identity(pipeline));
  const std::size_t pipelines = r.pipelines.size(), buffers = r.buffers.size();
  ccv_nnc_mfa_encode_attention(call.context, call.params, call.batch, call.buffers, call.offsets);
  for (std::size_t i = pipelines; i < r.pipelines.size(); ++i)
    if (!prepared.count(pipeline_identity(r.pipelines[i])))
      r.errors.push_back("the encode built a pipeline that prepare had not: " + r.pipelines[i].function);
  if (r.buffers.size() != buffers) r.errors.push_back("the encode allocated a buffer that prepare had not");
}

// After ccv raised, the bridge's batch must be usable (no command left open) and ccv's
// caches must hold no half-built entry: the same call raises again (the faults modelled
// here persist) instead of handing out a null pipeline.
void check_recovery(const Call& call, const std::exception& raised) {
  const std::string context = std::string(" after ccv raised: ") + raised.what();
  if (call.batch->commandActive != 0) throw std::runtime_error("a command of the batch is still open" + context);
  try {
    prepare_and_encode(call);
  } catch (const std::exception&) {
    return;
  }
  throw std::runtime_error("the same call then succeeded" + context);
}

// The command buffer being encoded: what the bridge holds until it completes.
struct CommandBuffer {
  bool keep_scratch;
  std::vector<NS::SharedPtr<MTL::Buffer>> kept;

  void complete() {
    mfa_engine::complete_command_buffer();
    kept.clear();  // the bridge's completed handler lets them go
  }
};

// Every slice of the call (mfa_params.hpp, launches), one after another, as the bridge
// encodes them; first, with `summary` (the whole call's params), the mask's tile summaries.
void encode(bool prepare, ccv_nnc_mfa_context_t* context, const std::vector<mfa_sdpa::Launch>& launches, Tensor* tensors,
            int count, CommandBuffer& command_buffer, const ccv_nnc_mfa_attention_params_t* summary = nullptr) {
  MTL::ComputeCommandEncoder encoder;
  MTL::CommandBatch batch(nullptr, &encoder);  // the bridge's borrowed-encoder batch
  const mfa_sdpa::ScratchKeeper scratch(context);  // as the bridge: before prepare
  MTL::Buffer* buffers[mfa_sdpa::kBackwardBuffers] = {};
  std::size_t offsets[mfa_sdpa::kBackwardBuffers] = {};
  for (int i = 0; i < count; ++i) {
    buffers[i] = tensors[i].buffer;
    offsets[i] = tensors[i].offset;
  }
  if (summary) ccv_nnc_mfa_encode_attention_mask_tiles(context, *summary, &batch, buffers, offsets);
  for (const mfa_sdpa::Launch& launch : launches) {
    std::size_t moved[mfa_sdpa::kBackwardBuffers] = {};  // to the slice's first element
    for (int i = 0; i < count; ++i) moved[i] = offsets[i] + launch.offsets[i];
    const Call call{prepare, context, launch.params, &batch, buffers, moved};
    try {
      prepare_and_encode(call);
    } catch (const std::exception& raised) {
      check_recovery(call, raised);
      throw;
    }
  }
  if (NS::SharedPtr<MTL::Buffer> replaced = scratch.replaced(); replaced && command_buffer.keep_scratch)
    command_buffer.kept.push_back(replaced);
}

// --compile-source: one newLibrary on the modelled compiler.
int compile_only(const Options& o) {
  std::FILE* file = std::fopen(o.compile_source.c_str(), "rb");
  if (!file) usage("cannot read " + o.compile_source);
  std::string source;
  char chunk[4096];
  for (std::size_t n; (n = std::fread(chunk, 1, sizeof chunk, file)) > 0;) source.append(chunk, n);
  std::fclose(file);
  MTL::Device device;
  NS::SharedPtr<MTL::CompileOptions> options;
  if (o.language != "none") {
    unsigned major = 0, minor = 0;
    if (std::sscanf(o.language.c_str(), "%u.%u", &major, &minor) != 2) usage("--language takes X.Y or none");
    options = NS::TransferPtr(MTL::CompileOptions::alloc()->init());
    options->setLanguageVersion(MTL::LanguageVersion((major << 16) + minor));
  }
  NS::Error* error = nullptr;
  MTL::Library* library = device.newLibrary(new NS::String(source), options.get(), &error);
  if (!library) throw std::runtime_error(error ? error->localizedDescription()->value : "no library and no error");
  std::printf("{\"compiled\": true}\n");
  return 0;
}

int run(const Options& o) {
  if (!o.compile_source.empty()) return compile_only(o);
  const auto& s = o.shape;
  const mfa_sdpa::MaskStrides* mask = o.masked ? &o.mask : nullptr;
  std::string refused = mfa_sdpa::check_limits(s, o.dtype, o.grad, mask);
  if (refused.empty())  // the bridge's check against the device's largest buffer
    refused = mfa_sdpa::check_scratch(s, o.dtype, o.grad, mfa_engine::record().device.max_buffer_length, o.scratch_budget);
  if (refused.empty()) refused = mfa_sdpa::check_scale(float(o.scale));  // as the bridge refuses
  if (!refused.empty()) {
    std::printf("{\"refused\": \"%s\"}\n", refused.c_str());
    return 2;
  }
  MTL::Device device;
  ccv_nnc_mfa_context_t* context = ccv_nnc_init_mfa_context(&device);
  // As the bridge creates its context: the copy mode by the probe.
  bool async = o.async_copies == "on";
  if (o.async_copies == "auto") async = mfa_sdpa::configure_copies(context, &device);
  else ccv_nnc_mfa_set_async_copies(context, async);
  const mfa_sdpa::MacOS macos = mfa_sdpa::macos();
  auto& platform = mfa_engine::record().platform;
  platform.emplace_back("macos_version", "\"" + macos.reported + "\"");
  platform.emplace_back("macos_major", std::to_string(macos.major));
  platform.emplace_back("async_copies", async ? "true" : "false");
  platform.emplace_back("metal_language", "\"" + mfa_sdpa::metal_language() + "\"");
  const std::string too_old = mfa_sdpa::check_macos(macos.major);  // as the bridge refuses
  if (!too_old.empty()) {
    std::printf("{\"refused\": \"%s\"}\n", too_old.c_str());
    return 2;
  }
  if (!ccv_nnc_mfa_context_supported(context)) {
    std::printf("{\"refused\": \"GPU family not supported by MFA\"}\n");
    return 2;
  }
  const std::uint64_t es = mfa_sdpa::is_half(o.dtype) ? 2 : 4;
  const std::uint64_t q_elements = s.B * s.R * s.Hq * s.D, kv_elements = s.B * s.C * s.Hk * s.D;
  const std::uint64_t lse_elements = s.B * s.Hq * s.R;
  Tensor q = tensor("q", q_elements, es, o.offset), k = tensor("k", kv_elements, es, o.offset),
         v = tensor("v", kv_elements, es, o.offset), out = tensor("o", q_elements, es, o.offset),
         lse = tensor("lse", lse_elements, 4, o.offset);
  const Tensor mask_tensor = mask ? tensor("mask", mfa_sdpa::mask_span(s, *mask), mask->is_bool ? 1 : es, o.offset) : Tensor{nullptr, 0};
  // The mask's tile summaries, laid out as ccv says (building their kernels, not preparing
  // the whole call, whose scratch its slices never need: as the bridge asks).
  const mfa_sdpa::Dropout* dropout = o.dropout ? &o.drop : nullptr;
  mfa_sdpa::MaskTilesLayout layouts[2];
  ccv_nnc_mfa_attention_params_t whole[2];
  Tensor summaries[3] = {};
  const char* names[3] = {"mask_tiles_forward", "mask_tiles_backward_query", "mask_tiles_backward_key_value"};
  for (int pass = 0; mask && pass < (o.grad ? 2 : 1); ++pass) {
    whole[pass] = mfa_sdpa::whole_params(s, o.dtype, float(o.scale), pass == 1, o.causal, mask, dropout);
    ccv_nnc_mfa_attention_mask_tiles_layout(context, whole[pass], layouts[pass].blocks, layouts[pass].entry_bytes);
    const std::vector<std::uint64_t> bytes = layouts[pass].pass_bytes(s, *mask, pass == 1);
    for (std::size_t kernel = 0; kernel < bytes.size(); ++kernel)
      summaries[pass + kernel] = tensor(names[pass + kernel], bytes[kernel], 1, o.offset);
  }
  Tensor forward[mfa_sdpa::kForwardBuffers] = {q, k, v, out, mask_tensor, lse, summaries[0]};
  CommandBuffer command_buffer{o.keep_scratch, {}};
  encode(o.prepare, context,
         mfa_sdpa::launches(s, o.dtype, float(o.scale), false, o.causal, mask, o.scratch_budget, mask ? &layouts[0] : nullptr,
                            dropout),
         forward, mfa_sdpa::kForwardBuffers, command_buffer, mask ? &whole[0] : nullptr);
  if (!o.same_command_buffer) command_buffer.complete();
  if (o.grad) {
    Tensor dout = tensor("do", q_elements, es, o.offset), dq = tensor("dq", q_elements, es, o.offset),
           dk = tensor("dk", kv_elements, es, o.offset), dv = tensor("dv", kv_elements, es, o.offset);
    // the mask's gradient: the mask's span and type, zeroed by the caller (MFAKernel)
    const Tensor dmask = mask && mask->grad ? tensor("mask_grad", mfa_sdpa::mask_span(s, *mask), es, o.offset) : Tensor{nullptr, 0};
    Tensor backward[mfa_sdpa::kBackwardBuffers] = {q, k, v, out, lse, dout, dq, dk, dv, mask_tensor, summaries[1], summaries[2], dmask};
    encode(o.prepare, context,
           mfa_sdpa::launches(s, o.dtype, float(o.scale), true, o.causal, mask, o.scratch_budget, mask ? &layouts[1] : nullptr,
                              dropout),
           backward, mfa_sdpa::kBackwardBuffers, command_buffer, mask ? &whole[1] : nullptr);
  }
  command_buffer.complete();
  const auto& released = mfa_engine::record().released_in_use;
  if (!released.empty()) throw std::runtime_error("use after release: " + released.front());
  std::fputs(mfa_engine::to_json(mfa_engine::record()).c_str(), stdout);
  return mfa_engine::record().errors.empty() ? 0 : 4;
}

}  // namespace

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  try {
    return run(options);
  } catch (const std::exception& error) {
    std::string message = error.what();
    for (auto& c : message)
      if (c == '"' || c == '\\' || c == '\n') c = ' ';
    std::printf("{\"error\": \"%s\"}\n", message.c_str());
    return 3;
  }
}
