// Apple's <Foundation/Foundation.h>, as far as the bridge and PyTorch's MPS headers use it.
#pragma once
#include <CoreFoundation/CoreFoundation.h>
#include <dispatch/dispatch.h>
#include <objc/NSObject.h>
#include <objc/objc.h>

typedef long NSInteger;
typedef unsigned long NSUInteger;

typedef struct {
  NSInteger majorVersion;
  NSInteger minorVersion;
  NSInteger patchVersion;
} NSOperatingSystemVersion;

#ifdef __OBJC__
@interface NSProcessInfo : NSObject
@property(class, readonly, strong) NSProcessInfo* processInfo;
@property(readonly) NSOperatingSystemVersion operatingSystemVersion;
@end

@interface NSDictionary<__covariant KeyType, __covariant ObjectType> : NSObject
@end
#endif
