// The recording metal-cpp stand-in's behaviour, and the record's JSON form.
#include "recorder.hpp"

#include <algorithm>
#include <cstdio>
#include <sstream>

namespace mfa_engine {

Record& record() {
  static Record r;
  return r;
}

static MTL::Buffer* new_buffer(const std::string& name, std::uint64_t length) {
  auto* b = new MTL::Buffer();
  b->id = int(record().buffers.size());
  b->size = length;
  record().buffers.push_back({name, length});
  return b;
}

MTL::Buffer* tensor_buffer(const std::string& name, std::uint64_t length) { return new_buffer(name, length); }

void complete_command_buffer() { record().in_flight.clear(); }

static std::string hex(const unsigned char* p, std::size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string s;
  for (std::size_t i = 0; i < n; ++i) {
    s += digits[p[i] >> 4];
    s += digits[p[i] & 15];
  }
  return s;
}

static std::string quote(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += char(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else {
      out += char(c);
    }
  }
  return out + "\"";
}

std::string to_json(const Record& r) {
  std::ostringstream o;
  o << "{\"device\": {\"gpu_family\": " << r.device.gpu_family << ", \"macos\": " << r.device.macos << "},\n";
  o << "\"platform\": {";
  for (std::size_t i = 0; i < r.platform.size(); ++i)
    o << (i ? ", " : "") << quote(r.platform[i].first) << ": " << r.platform[i].second;
  o << "},\n";
  o << "\"libraries\": [";
  for (std::size_t i = 0; i < r.libraries.size(); ++i) {
    const auto& l = r.libraries[i];
    o << (i ? ",\n" : "\n") << "{\"precompiled\": " << (l.precompiled ? "true" : "false") << ", \"options\": ";
    if (l.options_given)
      o << "{\"language\": " << quote(l.language) << ", \"fast_math\": " << (l.fast_math ? "true" : "false") << "}";
    else
      o << "null";
    o << ", \"source\": " << quote(l.source) << "}";
  }
  o << "],\n\"pipelines\": [";
  for (std::size_t i = 0; i < r.pipelines.size(); ++i) {
    const auto& p = r.pipelines[i];
    o << (i ? ",\n" : "\n") << "{\"library\": " << p.library << ", \"function\": " << quote(p.function)
      << ", \"constants\": {";
    bool first = true;
    for (const auto& [index, value] : p.constants) {
      o << (first ? "" : ", ") << "\"" << index << "\": {\"type\": " << value.type << ", \"hex\": \""
        << hex(value.bytes.data(), value.bytes.size()) << "\"}";
      first = false;
    }
    o << "}}";
  }
  o << "],\n\"buffers\": [";
  for (std::size_t i = 0; i < r.buffers.size(); ++i) {
    o << (i ? ", " : "") << "{\"name\": " << quote(r.buffers[i].name) << ", \"length\": " << r.buffers[i].length
      << "}";
  }
  o << "],\n\"dispatches\": [";
  for (std::size_t i = 0; i < r.dispatches.size(); ++i) {
    const auto& d = r.dispatches[i];
    o << (i ? ",\n" : "\n") << "{\"pipeline\": " << d.pipeline << ", \"grid\": [" << d.grid.width << ", "
      << d.grid.height << ", " << d.grid.depth << "], \"group\": [" << d.group.width << ", " << d.group.height << ", "
      << d.group.depth << "], \"threadgroup_memory\": {";
    bool first = true;
    for (const auto& [index, length] : d.threadgroup_memory) {
      o << (first ? "" : ", ") << "\"" << index << "\": " << length;
      first = false;
    }
    o << "}, \"buffers\": {";
    first = true;
    for (const auto& [index, b] : d.buffers) {
      o << (first ? "" : ", ") << "\"" << index << "\": {\"buffer\": " << b.buffer << ", \"offset\": " << b.offset
        << "}";
      first = false;
    }
    o << "}, \"bytes\": {";
    first = true;
    for (const auto& [index, payload] : d.bytes) {
      o << (first ? "" : ", ") << "\"" << index << "\": \"" << hex(payload.data(), payload.size()) << "\"";
      first = false;
    }
    o << "}}";
  }
  o << "],\n\"scratch_peak\": " << r.scratch_peak;
  o << ",\n\"errors\": [";
  for (std::size_t i = 0; i < r.errors.size(); ++i) o << (i ? ", " : "") << quote(r.errors[i]);
  o << "]}\n";
  return o.str();
}

}  // namespace mfa_engine

using mfa_engine::record;

// libdispatch data: ccv hands it to newLibrary and releases it; nothing reads it here.
struct mfa_dispatch_data_s {};
dispatch_data_t dispatch_data_create(const void*, std::size_t, void*, void*) { return new mfa_dispatch_data_s(); }
void dispatch_release(dispatch_data_t data) { delete data; }

namespace NS {

ProcessInfo* ProcessInfo::processInfo() {
  static ProcessInfo info;
  return &info;
}

OperatingSystemVersion ProcessInfo::operatingSystemVersion() const {
  const long* v = record().device.os_reports;
  return {v[0], v[1], v[2]};
}

}  // namespace NS

namespace MTL {

void FunctionConstantValues::setConstantValue(const void* value, DataType type, NS::UInteger index) {
  std::size_t size = 4;
  switch (type) {
    case DataTypeBool:
      size = 1;
      break;
    case DataTypeUShort:
    case DataTypeHalf:
    case DataTypeBFloat:
      size = 2;
      break;
    default:
      size = 4;
  }
  const auto* p = static_cast<const unsigned char*>(value);
  values[index] = ConstantValue{type, std::vector<unsigned char>(p, p + size)};
}

Function::~Function() {
  if (library) library->release();
}

static Library* new_library(std::string source, bool precompiled) {
  auto* l = new Library();
  l->id = int(record().libraries.size());
  l->precompiled = precompiled;
  record().libraries.push_back({std::move(source), precompiled});
  return l;
}

Function* Library::newFunction(NS::String* name) { return newFunction(name, nullptr, nullptr); }

Function* Library::newFunction(NS::String* name, FunctionConstantValues* constants, NS::Error** error) {
  const auto& device = record().device;
  if (device.fault == "empty-library") return nullptr;  // no error: as reported on macOS 26.5
  const std::string& source = record().libraries[id].source;
  if (!precompiled && source.find("kernel void " + name->value + "(") == std::string::npos) {
    if (error) *error = new NS::Error("no function named " + name->value + " in the library");
    return nullptr;
  }
  auto* f = new Function();
  retain();
  f->library = this;
  f->name = name->value;
  if (constants) f->constants = constants->values;
  return f;
}

void ComputePipelineDescriptor::setComputeFunction(Function* f) {
  if (f) f->retain();
  if (function) function->release();
  function = f;
}

ComputePipelineDescriptor::~ComputePipelineDescriptor() {
  if (function) function->release();
}

bool Device::supportsFamily(GPUFamily family) const { return NS::Integer(family) <= record().device.gpu_family; }

NS::String* Device::name() const {
  return new NS::String(record().device.gpu_family >= 1009 ? "Apple M3 (modelled)" : "Apple M1 (modelled)");
}

// The newest Metal language the modelled macOS compiles: 3.0 on macOS 13, 3.1 on 14, 3.2
// on 15, 4.0 on 26.
static unsigned newest_language(int macos) {
  if (macos >= 26) return 4u << 16;
  if (macos >= 15) return (3u << 16) + 2;
  if (macos >= 14) return (3u << 16) + 1;
  return 3u << 16;
}

static std::string language_name(unsigned version) {
  return std::to_string(version >> 16) + "." + std::to_string(version & 0xFFFF);
}

// The modelled compiler: macOS 26 rejects `__asm` declarations; a language version newer
// than the macOS has fails; `bfloat` is an unknown type below Metal 3.1.
Library* Device::newLibrary(NS::String* source, CompileOptions* options, NS::Error** error) {
  const auto& device = record().device;
  const std::string macos = "modelled macOS " + std::to_string(device.macos) + " compiler: ";
  auto fail = [&](const std::string& why) -> Library* {
    if (error) *error = new NS::Error(macos + why);
    return nullptr;
  };
  if (device.reject_asm && source->value.find("__asm") != std::string::npos)
    return fail("__asm in runtime-compiled source is rejected");
  const unsigned language = options && options->language_set ? unsigned(options->language) : device.default_language;
  if (language > newest_language(device.macos))
    return fail("Metal language " + language_name(language) + " is not available (newest " +
                language_name(newest_language(device.macos)) + ")");
  if (language < (3u << 16) + 1 && source->value.find("bfloat") != std::string::npos)
    return fail("unknown type name 'bfloat' (Metal language " + language_name(language) + "; bfloat needs 3.1)");
  Library* library = new_library(source->value, false);
  auto& recorded = record().libraries[library->id];
  recorded.options_given = options != nullptr;
  recorded.language = language_name(language);
  recorded.fast_math = options ? options->fast_math : true;
  return library;
}

Library* Device::newLibrary(dispatch_data_t, NS::Error**) { return new_library("", true); }

Library* Device::newLibrary(NS::URL*, NS::Error**) { return new_library("", true); }

static ComputePipelineState* new_pipeline(Function* function) {
  if (function == nullptr) {
    // Metal aborts the process here; the record says so and the harness fails.
    record().errors.push_back("newComputePipelineState called with a nil function");
    return nullptr;
  }
  if (record().device.fault == "nil-pipeline") return nullptr;
  auto* p = new ComputePipelineState();
  p->id = int(record().pipelines.size());
  record().pipelines.push_back({function->library->id, function->name, function->constants});
  return p;
}

ComputePipelineState* Device::newComputePipelineState(Function* function, NS::Error**) { return new_pipeline(function); }

ComputePipelineState* Device::newComputePipelineState(ComputePipelineDescriptor* descriptor, PipelineOption,
                                                      ComputePipelineReflection**, NS::Error**) {
  return new_pipeline(descriptor->function);
}

Buffer* Device::newBuffer(NS::UInteger length, ResourceOptions) {
  auto& r = record();
  if (length == 0 || length > r.device.max_buffer_bytes) return nullptr;
  r.scratch_live += length;
  r.scratch_peak = std::max(r.scratch_peak, r.scratch_live);
  return mfa_engine::new_buffer("scratch", length);
}

void ComputeCommandEncoder::setComputePipelineState(ComputePipelineState* p) {
  if (p == nullptr) {
    record().errors.push_back("setComputePipelineState called with a nil pipeline");
    record().has_pipeline = false;
    return;
  }
  record().state.pipeline = p->id;
  record().has_pipeline = true;
}

void ComputeCommandEncoder::setThreadgroupMemoryLength(NS::UInteger length, NS::UInteger index) {
  record().state.threadgroup_memory[index] = length;
}

void ComputeCommandEncoder::useResource(Buffer* buffer, ResourceUsage) {
  if (buffer == nullptr) record().errors.push_back("useResource called with a nil buffer");
}

void ComputeCommandEncoder::setBuffer(Buffer* buffer, NS::UInteger offset, NS::UInteger index) {
  if (buffer == nullptr) {
    record().state.buffers.erase(index);
    return;
  }
  record().state.bytes.erase(index);
  record().state.buffers[index] = {buffer->id, offset};
}

void ComputeCommandEncoder::setBytes(const void* bytes, NS::UInteger length, NS::UInteger index) {
  const auto* p = static_cast<const unsigned char*>(bytes);
  record().state.buffers.erase(index);
  record().state.bytes[index] = std::vector<unsigned char>(p, p + length);
}

void ComputeCommandEncoder::dispatchThreadgroups(Size grid, Size group) {
  if (!record().has_pipeline) {
    record().errors.push_back("dispatch without a pipeline");
    return;
  }
  auto d = record().state;
  d.grid = grid;
  d.group = group;
  record().dispatches.push_back(d);
  for (const auto& [index, binding] : d.buffers) record().in_flight.insert(binding.buffer);
}

Buffer::~Buffer() {
  auto& r = record();
  if (r.buffers[id].name == "scratch") r.scratch_live -= size;
  if (r.in_flight.count(id))
    r.released_in_use.push_back("buffer " + std::to_string(id) + " (" + r.buffers[id].name + ", " +
                                std::to_string(size) + " bytes) was released while a dispatch of a command buffer "
                                "not yet completed binds it");
}

void ComputeCommandEncoder::endEncoding() {}

ComputeCommandEncoder* CommandBuffer::computeCommandEncoder() { return new ComputeCommandEncoder(); }

void CommandBuffer::commit() {}

CommandBuffer* CommandQueue::commandBuffer() { return new CommandBuffer(); }

}  // namespace MTL
