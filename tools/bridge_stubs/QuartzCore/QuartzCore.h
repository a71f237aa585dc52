// Apple's <QuartzCore/QuartzCore.h>, as far as ccv's headers use it (CABase.h).
#pragma once
#include <CoreFoundation/CoreFoundation.h>
#ifdef __cplusplus
extern "C" {
#endif
CFTimeInterval CACurrentMediaTime(void);
#ifdef __cplusplus
}
#endif
