// Apple's <AvailabilityMacros.h>, as far as ccv's Dispatch.hpp uses it (any deployment
// target is past 10.0, so those declarations are deprecated).
#pragma once
#define DEPRECATED_ATTRIBUTE __attribute__((deprecated))
#define DEPRECATED_IN_MAC_OS_X_VERSION_10_0_AND_LATER DEPRECATED_ATTRIBUTE
