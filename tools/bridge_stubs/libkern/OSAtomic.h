// Apple's <libkern/OSAtomic.h> (its OSSpinLockDeprecated.h part), as far as ccv's
// Dispatch.hpp uses it.
#pragma once
#include <stdint.h>

typedef int32_t OSSpinLock;
#ifdef __cplusplus
extern "C" {
#endif
void OSSpinLockLock(volatile OSSpinLock* __lock);
void OSSpinLockUnlock(volatile OSSpinLock* __lock);
#ifdef __cplusplus
}
#endif
