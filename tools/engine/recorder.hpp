// What the recording metal-cpp stand-in (host/.../Metal.hpp) saw: the libraries ccv
// compiled, the pipelines it made, the buffers it bound and every dispatch it encoded.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "nnc/mfa/3rdparty/metal-cpp/Metal.hpp"

namespace mfa_engine {

struct Binding {
  int buffer;
  std::uint64_t offset;
};

struct Dispatch {
  int pipeline;
  std::map<std::uint64_t, std::uint64_t> threadgroup_memory;  // index -> bytes
  std::map<std::uint64_t, Binding> buffers;                   // index -> buffer and byte offset
  std::map<std::uint64_t, std::vector<unsigned char>> bytes;  // index -> setBytes payload
  MTL::Size grid, group;
};

struct Pipeline {
  int library;
  std::string function;
  std::map<NS::UInteger, MTL::ConstantValue> constants;
};

struct Library {
  std::string source;  // empty for the precompiled v1 metallib
  bool precompiled;
  bool options_given = false;  // newLibrary had compile options, with:
  std::string language;        // "3.1"
  bool fast_math = true;
};

struct BufferInfo {
  std::string name;  // a tensor's name, or "scratch"
  std::uint64_t length;
};

// How the stand-in device behaves: which GPU family it reports and which macOS it models.
struct DeviceModel {
  int gpu_family = 1009;  // MTL::GPUFamilyApple9
  int macos = 26;
  // What NSProcessInfo reports (major, minor, patch): by default the modelled macOS; a
  // process linked against an SDK older than macOS 26 is told 16.x there.
  long os_reports[3] = {26, 0, 0};
  // Model the reported macOS 26 behaviour: runtime-compiled source declaring `__asm`
  // intrinsics fails to compile.
  bool reject_asm = true;
  // Fault injection, as reported on macOS 26.5: a library compiles without error but holds
  // no function ("empty-library"), or pipeline creation returns nil ("nil-pipeline").
  std::string fault;
  // The Metal language a library compiles as without options saying which: the process's
  // default, not guaranteed; modelled as 3.0, where `bfloat` is unknown (reported under
  // Python on macOS 15.6.1).
  unsigned default_language = (3u << 16) + 0;
  // Allocations above this fail (nil), as Metal's do past the device's limit.
  std::uint64_t max_buffer_bytes = std::uint64_t(1) << 36;
  // What the device reports as maxBufferLength, which the bridge checks a call's scratch
  // against before ccv allocates (mfa_params.hpp, check_scratch).
  std::uint64_t max_buffer_length = std::uint64_t(1) << 34;
};

struct Record {
  DeviceModel device;
  std::vector<Library> libraries;
  std::vector<Pipeline> pipelines;
  std::vector<BufferInfo> buffers;
  std::vector<Dispatch> dispatches;
  Dispatch state;  // the encoder's current state: it persists between dispatches, as in Metal
  bool has_pipeline = false;
  std::vector<std::string> errors;  // misuse Metal would crash on (nil pipeline, ...)
  // Buffers bound by dispatches of the command buffer not yet completed, and every release
  // of one of them (the GPU would read or write freed memory).
  std::set<int> in_flight;
  std::vector<std::string> released_in_use;
  // What the caller decided about the platform, as JSON values by name (the driver's
  // platform decisions, made by the bridge's own code).
  std::vector<std::pair<std::string, std::string>> platform;
  // Bytes of the buffers ccv allocated (its scratch) that are alive, and the most at once.
  std::uint64_t scratch_live = 0, scratch_peak = 0;
};

Record& record();

// A buffer standing for a tensor the caller owns (the bridge's MTLBuffers).
MTL::Buffer* tensor_buffer(const std::string& name, std::uint64_t length);

std::string to_json(const Record& r);

// The command buffer holding every dispatch recorded so far completed: its buffers may go.
void complete_command_buffer();

}  // namespace mfa_engine
