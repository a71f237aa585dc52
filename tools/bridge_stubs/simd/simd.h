// Apple's <simd/simd.h>: the engine's stand-in, which ccv's MFA sources compile against on
// Linux (tools/engine/host/simd/simd.h).
#pragma once
#include "../../engine/host/simd/simd.h"
