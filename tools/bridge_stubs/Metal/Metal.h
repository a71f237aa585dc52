// Apple's <Metal/Metal.h>, as far as the bridge and PyTorch's MPS headers use it: the
// protocols they name (with Metal's own inheritance), the one message the bridge sends and
// the one property it reads.
#pragma once
#include <Foundation/Foundation.h>

#ifdef __OBJC__
@protocol MTLDevice <NSObject>
// MTLDevice.h: @property (readonly) NSUInteger maxBufferLength API_AVAILABLE(macos(10.14), ios(12.0));
@property (readonly) NSUInteger maxBufferLength;
@end
@protocol MTLResource <NSObject>
@end
@protocol MTLBuffer <MTLResource>
@end
@protocol MTLCommandQueue <NSObject>
@end
@protocol MTLCommandEncoder <NSObject>
@end
@protocol MTLComputeCommandEncoder <MTLCommandEncoder>
@end
@protocol MTLEvent <NSObject>
@end
@protocol MTLSharedEvent <MTLEvent>
@end

@protocol MTLCommandBuffer;
typedef void (^MTLCommandBufferHandler)(id<MTLCommandBuffer>);
@protocol MTLCommandBuffer <NSObject>
- (void)addCompletedHandler:(MTLCommandBufferHandler)block;
@end
#endif
