// Apple's <dispatch/dispatch.h>, as far as the bridge, PyTorch's MPSStream.h and metal-cpp
// (ccv's Dispatch.hpp, Metal.hpp) use it. In Objective-C, dispatch objects are Objective-C
// objects (OS_OBJECT_USE_OBJC), which ARC manages; in C++ they are opaque struct pointers.
#pragma once
#include <stdint.h>

#ifdef __OBJC__
#include <objc/NSObject.h>
#define MFA_STUB_DISPATCH_DECL(name, super) \
  @protocol OS_##name <OS_##super>          \
  @end                                      \
  typedef NSObject<OS_##name>* name##_t;
@protocol OS_dispatch_object <NSObject>
@end
MFA_STUB_DISPATCH_DECL(dispatch_queue, dispatch_object)
MFA_STUB_DISPATCH_DECL(dispatch_group, dispatch_object)
MFA_STUB_DISPATCH_DECL(dispatch_semaphore, dispatch_object)
MFA_STUB_DISPATCH_DECL(dispatch_data, dispatch_object)
#undef MFA_STUB_DISPATCH_DECL
#else
typedef struct dispatch_queue_s* dispatch_queue_t;
typedef struct dispatch_group_s* dispatch_group_t;
typedef struct dispatch_semaphore_s* dispatch_semaphore_t;
typedef struct dispatch_data_s* dispatch_data_t;
#endif

// <sys/qos.h>
typedef unsigned int qos_class_t;
enum : qos_class_t {
  QOS_CLASS_USER_INTERACTIVE = 0x21,
  QOS_CLASS_USER_INITIATED = 0x19,
  QOS_CLASS_DEFAULT = 0x15,
  QOS_CLASS_UTILITY = 0x11,
  QOS_CLASS_BACKGROUND = 0x09,
  QOS_CLASS_UNSPECIFIED = 0x00,
};
typedef qos_class_t dispatch_qos_class_t;

typedef intptr_t dispatch_once_t;
typedef uint64_t dispatch_time_t;
#define DISPATCH_TIME_FOREVER (~0ull)

#if defined(__BLOCKS__)
typedef void (^dispatch_block_t)(void);
#ifdef __cplusplus
extern "C" {
#endif
void dispatch_sync(dispatch_queue_t queue, __attribute__((__noescape__)) dispatch_block_t block);
#ifdef __cplusplus
}
#endif
#endif
