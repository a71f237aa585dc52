// Apple's <IOSurface/IOSurfaceRef.h>, as far as metal-cpp uses it.
#pragma once
typedef struct __IOSurface* IOSurfaceRef;
