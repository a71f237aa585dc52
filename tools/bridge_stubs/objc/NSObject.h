// Apple's <objc/NSObject.h>: the root class and protocol, as far as the bridge and the
// headers it includes use them.
#pragma once
#include <objc/objc.h>

#ifdef __OBJC__
@protocol NSObject
@end

__attribute__((objc_root_class))
@interface NSObject <NSObject> {
  Class isa;
}
@end
#endif
