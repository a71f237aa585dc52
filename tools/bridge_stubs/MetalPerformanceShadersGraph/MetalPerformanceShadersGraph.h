// Apple's <MetalPerformanceShadersGraph/MetalPerformanceShadersGraph.h>, as far as
// PyTorch's MPSStream.h uses it: the classes it names.
#pragma once
#include <MetalPerformanceShaders/MetalPerformanceShaders.h>

#ifdef __OBJC__
@interface MPSGraphObject : NSObject
@end
@interface MPSGraph : MPSGraphObject
@end
@interface MPSGraphExecutionDescriptor : MPSGraphObject
@end
@interface MPSGraphCompilationDescriptor : MPSGraphObject
@end
#endif
