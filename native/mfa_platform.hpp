// What this Mac offers ccv's kernels, decided by asking it (DESIGN section 11: a capability
// is what the device's compiler accepts, never a version number alone): the macOS version
// as NSProcessInfo reports it, read so that a compatibility answer does not mislead, and
// whether runtime-compiled source may use the async-copy intrinsics, by compiling a probe.
//
// Plain C++ on metal-cpp's API (no Objective-C, no torch): included by the bridge
// (mfa_bridge.mm) and by the Linux engine's driver (tools/engine/driver.cpp), whose
// recording metal-cpp stand-in models a Mac's compiler and NSProcessInfo (--macos,
// --os-reports), so the engine runs exactly the bridge's decisions.
#pragma once

#include <cstdio>
#include <string>

#include "ccv_nnc_mfa.hpp"

namespace mfa_sdpa {

// NSProcessInfo tells a process whose executable was linked against an SDK older than
// macOS 26 that it runs on 16.x (the system's compatibility versioning; cpython #135675,
// dotnet/runtime #116536). Most Python builds are such processes. There was no macOS 16,
// so 16 is read as 26.
inline long macos_major(long reported_major) { return reported_major == 16 ? 26 : reported_major; }

struct MacOS {
  std::string reported;  // as NSProcessInfo reports it, "15.5.0" or "16.0.0"
  long major;            // macos_major() of it
};

inline MacOS macos() {
  const NS::OperatingSystemVersion v = NS::ProcessInfo::processInfo()->operatingSystemVersion();
  char text[64];
  std::snprintf(text, sizeof text, "%ld.%ld.%ld", long(v.majorVersion), long(v.minorVersion), long(v.patchVersion));
  return {text, macos_major(long(v.majorVersion))};
}

// ccv's kernels compile as Metal 3.1 (patch 0009: ccv::nnc::mfa::language_version), which
// macOS 14 brought; "3.1".
inline std::string metal_language() {
  const auto version = static_cast<unsigned long>(ccv::nnc::mfa::language_version);
  return std::to_string(version >> 16) + "." + std::to_string(version & 0xFFFF);
}
constexpr long kMinMacOSMajor = 14;

// Empty when ccv's kernels compile on this macOS (macos_major()), else why not. Mirrors
// MFAKernel.supports().
inline std::string check_macos(long major) {
  if (major >= kMinMacOSMajor) return "";
  return "MFA's kernels compile as Metal " + metal_language() + " (for bfloat), which needs macOS " +
         std::to_string(kMinMacOSMajor) + "; this is macOS " + std::to_string(major);
}

// One of ccv's async-copy declarations (v2/GEMMHeaders.cpp, createMetalSimdgroupEvent),
// called by a kernel so that the compiler must resolve it. macOS 26 is reported to reject
// `__asm` declarations in runtime-compiled source.
constexpr const char* kAsyncCopyProbeFunction = "mfa_sdpa_async_copy_probe";
constexpr const char* kAsyncCopyProbeSource = R"(#include <metal_stdlib>
using namespace metal;

struct _simdgroup_event_t;

thread _simdgroup_event_t*
__metal_simdgroup_async_copy_1d(
  ulong, ulong, threadgroup void *, const device void *, ulong)
  __asm("air.simdgroup_async_copy_1d.p3i8.p1i8");

kernel void mfa_sdpa_async_copy_probe(device const uchar* source [[buffer(0)]],
                                      threadgroup uchar* block [[threadgroup(0)]]) {
  __metal_simdgroup_async_copy_1d(1, 1, block, source, 16);
}
)";

// Whether this device's compiler takes ccv's async copies: the probe compiles (with the
// options ccv's kernels compile with, patch 0009), its function is found, and a pipeline is made from
// it (where the backend lowers the intrinsic). Any failure means no: the kernels then copy
// with plain loads and stores (ccv_nnc_mfa_set_async_copies, our patch 0004).
inline bool async_copies_compile(MTL::Device* device) {
  NS::Error* error = nullptr;
  NS::SharedPtr<MTL::CompileOptions> options = ccv::nnc::mfa::new_compile_options();  // patch 0009
  NS::SharedPtr<MTL::Library> library = NS::TransferPtr(
      device->newLibrary(NS::String::string(kAsyncCopyProbeSource, NS::UTF8StringEncoding), options.get(), &error));
  if (!library) return false;
  NS::SharedPtr<MTL::Function> function =
      NS::TransferPtr(library->newFunction(NS::String::string(kAsyncCopyProbeFunction, NS::UTF8StringEncoding)));
  if (!function) return false;
  NS::SharedPtr<MTL::ComputePipelineState> pipeline =
      NS::TransferPtr(device->newComputePipelineState(function.get(), &error));
  return bool(pipeline);
}

// Once per ccv context, before any kernel is generated: the copy mode by the probe.
inline bool configure_copies(ccv_nnc_mfa_context_t* context, MTL::Device* device) {
  const bool async = async_copies_compile(device);
  ccv_nnc_mfa_set_async_copies(context, async);
  return async;
}

}  // namespace mfa_sdpa
