// A recording stand-in for metal-cpp, so that ccv's MFA host code (shader generation,
// pipeline set-up and command encoding) compiles and runs on Linux unchanged.
//
// Only what ccv's attention path calls is declared. Nothing draws on a GPU: the device hands
// out host memory, libraries keep their Metal source, pipelines keep their function
// constants, and the compute encoder records every dispatch with the state Metal would use
// (bindings persist between dispatches, as they do in Metal). tools/engine/recorder.cpp
// turns the record into JSON for the CPU executor. Enum values are Metal's own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>
// The real metal-cpp pulls these in, and ccv relies on it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <typeinfo>
#include <unordered_map>

#ifndef nil
#define nil nullptr
#endif

namespace NS {
using UInteger = std::uint64_t;
using Integer = std::int64_t;
enum StringEncoding : UInteger { UTF8StringEncoding = 4 };

// Reference counted like an Objective-C object; the record outlives nothing it names.
class Object {
 public:
  virtual ~Object() = default;
  void retain() { ++refs_; }
  void release() {
    if (--refs_ == 0) delete this;
  }

 private:
  long refs_ = 1;
};

template <typename T>
class SharedPtr {
 public:
  SharedPtr() = default;
  SharedPtr(const SharedPtr& other) : p_(other.p_) {
    if (p_) p_->retain();
  }
  SharedPtr& operator=(const SharedPtr& other) {
    if (other.p_) other.p_->retain();
    if (p_) p_->release();
    p_ = other.p_;
    return *this;
  }
  ~SharedPtr() {
    if (p_) p_->release();
  }
  T* get() const { return p_; }
  T* operator->() const { return p_; }
  explicit operator bool() const { return p_ != nullptr; }
  bool operator!() const { return p_ == nullptr; }
  template <typename U>
  friend SharedPtr<U> TransferPtr(U*);

 private:
  T* p_ = nullptr;
};

template <typename T>
SharedPtr<T> TransferPtr(T* p) {
  SharedPtr<T> s;
  s.p_ = p;
  return s;
}

template <typename T>
SharedPtr<T> RetainPtr(T* p) {
  if (p) p->retain();
  return TransferPtr(p);
}

class String : public Object {
 public:
  static String* string(const char* s, StringEncoding) { return new String(s); }  // autoreleased in Metal; leaked here
  const char* cString(StringEncoding) const { return value.c_str(); }
  const char* utf8String() const { return value.c_str(); }
  explicit String(std::string s) : value(std::move(s)) {}
  std::string value;
};

class Error : public Object {
 public:
  explicit Error(std::string d) : description(new String(std::move(d))) {}
  String* localizedDescription() const { return description; }
  String* localizedRecoverySuggestion() const { return nullptr; }
  String* localizedFailureReason() const { return nullptr; }
  String* description;
};

class URL : public Object {
 public:
  static URL* fileURLWithPath(String* path) { return new URL(path->value); }
  explicit URL(std::string p) : path(std::move(p)) {}
  std::string path;
};

// NSProcessInfo, as far as the bridge's platform checks read it (native/mfa_platform.hpp):
// it reports what the modelled Mac's NSProcessInfo would (the driver's --os-reports).
struct OperatingSystemVersion {
  Integer majorVersion;
  Integer minorVersion;
  Integer patchVersion;
};

class ProcessInfo : public Object {
 public:
  static ProcessInfo* processInfo();
  OperatingSystemVersion operatingSystemVersion() const;
};

class AutoreleasePool : public Object {
 public:
  static AutoreleasePool* alloc() { return new AutoreleasePool(); }
  AutoreleasePool* init() { return this; }
  void drain() { release(); }
};
}  // namespace NS

// libdispatch's data object, for the embedded v1 metallib ccv loads at context creation.
typedef struct mfa_dispatch_data_s* dispatch_data_t;
dispatch_data_t dispatch_data_create(const void* buffer, std::size_t size, void* queue, void* destructor);
void dispatch_release(dispatch_data_t data);

namespace MTL {
enum DataType : NS::UInteger {
  DataTypeNone = 0,
  DataTypeFloat = 3,
  DataTypeHalf = 16,
  DataTypeInt = 29,
  DataTypeUInt = 33,
  DataTypeUShort = 41,
  DataTypeBool = 53,
  DataTypeBFloat = 121,
};
enum GPUFamily : NS::Integer {
  GPUFamilyApple7 = 1007,
  GPUFamilyApple8 = 1008,
  GPUFamilyApple9 = 1009,
};
enum ResourceUsage : NS::UInteger { ResourceUsageRead = 1, ResourceUsageWrite = 2 };
inline ResourceUsage operator|(ResourceUsage a, ResourceUsage b) { return ResourceUsage(NS::UInteger(a) | NS::UInteger(b)); }
enum ResourceOptions : NS::UInteger {
  ResourceStorageModeShared = 0,
  ResourceStorageModePrivate = 32,
  ResourceHazardTrackingModeTracked = 512,
};
inline ResourceOptions operator|(ResourceOptions a, ResourceOptions b) { return ResourceOptions(NS::UInteger(a) | NS::UInteger(b)); }
enum PipelineOption : NS::UInteger { PipelineOptionNone = 0 };

struct Size {
  Size() = default;
  Size(NS::UInteger w, NS::UInteger h, NS::UInteger d) : width(w), height(h), depth(d) {}
  NS::UInteger width = 0, height = 0, depth = 0;
};

// Metal language versions as MTLLanguageVersion encodes them: (major << 16) + minor. The
// pinned metal-cpp names them up to 3.0.
enum LanguageVersion : NS::UInteger {
  LanguageVersion3_0 = 196608,
};

// What newLibrary compiles with; recorded with every library (recorder.cpp).
class CompileOptions : public NS::Object {
 public:
  static CompileOptions* alloc() { return new CompileOptions(); }
  CompileOptions* init() { return this; }
  void setLanguageVersion(LanguageVersion version) { language = version; language_set = true; }
  LanguageVersion languageVersion() const { return language; }
  void setFastMathEnabled(bool enabled) { fast_math = enabled; }
  bool fastMathEnabled() const { return fast_math; }
  LanguageVersion language = LanguageVersion3_0;  // unset: the device's default (recorder.cpp)
  bool language_set = false;
  bool fast_math = true;  // Metal's default
};

class ComputePipelineReflection;

// One function constant as set by the host: Metal type and raw bytes.
struct ConstantValue {
  DataType type;
  std::vector<unsigned char> bytes;
};

class FunctionConstantValues : public NS::Object {
 public:
  static FunctionConstantValues* alloc() { return new FunctionConstantValues(); }
  FunctionConstantValues* init() { return this; }
  void setConstantValue(const void* value, DataType type, NS::UInteger index);
  std::map<NS::UInteger, ConstantValue> values;
};

class Library;

class Function : public NS::Object {
 public:
  Library* library = nullptr;  // retained
  std::string name;
  std::map<NS::UInteger, ConstantValue> constants;
  ~Function() override;
};

class Library : public NS::Object {
 public:
  Function* newFunction(NS::String* name);
  Function* newFunction(NS::String* name, FunctionConstantValues* constants, NS::Error** error);
  int id = -1;             // index into the record's libraries
  bool precompiled = false;  // ccv's embedded v1 metallib: no source, no function we can run
};

class ComputePipelineDescriptor : public NS::Object {
 public:
  static ComputePipelineDescriptor* alloc() { return new ComputePipelineDescriptor(); }
  ComputePipelineDescriptor* init() { return this; }
  void setComputeFunction(Function* f);
  void setMaxTotalThreadsPerThreadgroup(NS::UInteger n) { maxThreads = n; }
  Function* function = nullptr;  // retained
  NS::UInteger maxThreads = 1024;
  ~ComputePipelineDescriptor() override;
};

class ComputePipelineState : public NS::Object {
 public:
  int id = -1;  // index into the record's pipelines
};

class Buffer : public NS::Object {
 public:
  NS::UInteger length() const { return size; }
  void* contents() { return nullptr; }  // private storage: the host never reads it
  int id = -1;  // index into the record's buffers
  NS::UInteger size = 0;
  ~Buffer() override;  // a release while a dispatch not yet completed binds it is recorded
};

class ComputeCommandEncoder : public NS::Object {
 public:
  void setComputePipelineState(ComputePipelineState* p);
  void setThreadgroupMemoryLength(NS::UInteger length, NS::UInteger index);
  void useResource(Buffer* buffer, ResourceUsage usage);
  void setBuffer(Buffer* buffer, NS::UInteger offset, NS::UInteger index);
  void setBytes(const void* bytes, NS::UInteger length, NS::UInteger index);
  void dispatchThreadgroups(Size grid, Size group);
  void endEncoding();
};

class CommandBuffer : public NS::Object {
 public:
  ComputeCommandEncoder* computeCommandEncoder();
  void commit();
};

class CommandQueue : public NS::Object {
 public:
  CommandBuffer* commandBuffer();
};

class Device : public NS::Object {
 public:
  bool supportsFamily(GPUFamily family) const;
  NS::String* name() const;
  Library* newLibrary(NS::String* source, CompileOptions* options, NS::Error** error);
  Library* newLibrary(dispatch_data_t data, NS::Error** error);
  Library* newLibrary(NS::URL* url, NS::Error** error);
  ComputePipelineState* newComputePipelineState(Function* function, NS::Error** error);
  ComputePipelineState* newComputePipelineState(ComputePipelineDescriptor* descriptor, PipelineOption options,
                                                ComputePipelineReflection** reflection, NS::Error** error);
  Buffer* newBuffer(NS::UInteger length, ResourceOptions options);
  Buffer* newBuffer(NS::UInteger length, NS::UInteger options) { return newBuffer(length, ResourceOptions(options)); }
};
}  // namespace MTL
