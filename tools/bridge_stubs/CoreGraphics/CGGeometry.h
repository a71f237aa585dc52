// Apple's <CoreGraphics/CGGeometry.h>, as far as metal-cpp uses it (64-bit: CGFloat is double).
#pragma once
typedef double CGFloat;
struct CGSize {
  CGFloat width;
  CGFloat height;
};
typedef struct CGSize CGSize;
