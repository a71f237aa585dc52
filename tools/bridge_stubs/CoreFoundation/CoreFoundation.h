// Apple's <CoreFoundation/CoreFoundation.h>, as far as metal-cpp and QuartzCore use it. Like
// the real one it includes the standard C headers and libdispatch (CFStream.h), which
// metal-cpp relies on (INFINITY, assert, dispatch_data_t).
#pragma once
#include <dispatch/dispatch.h>
#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef double CFTimeInterval;
