// Apple's <objc/message.h> with OBJC_OLD_DISPATCH_PROTOTYPES off: metal-cpp casts these to
// the signature of each message. The _stret/_fpret variants exist on x86_64 only, which is
// what metal-cpp picks on this (x86_64) host.
#pragma once
#include <objc/objc.h>

OBJC_EXPORT void objc_msgSend(void);
#if defined(__i386__) || defined(__x86_64__)
OBJC_EXPORT void objc_msgSend_stret(void);
OBJC_EXPORT void objc_msgSend_fpret(void);
#endif
