// Apple's <objc/runtime.h>, as far as metal-cpp uses it.
#pragma once
#include <objc/objc.h>

#ifdef __OBJC__
@class Protocol;
#else
typedef struct objc_object Protocol;
#endif

OBJC_EXPORT Class objc_lookUpClass(const char* name);
OBJC_EXPORT Protocol* objc_getProtocol(const char* name);
