// Apple's <MetalPerformanceShaders/MetalPerformanceShaders.h>, as far as PyTorch's
// MPSStream.h uses it (MPSCore/MPSCommandBuffer.h).
#pragma once
#include <Metal/Metal.h>

#ifdef __OBJC__
@interface MPSCommandBuffer : NSObject <MTLCommandBuffer>
@end
#endif
