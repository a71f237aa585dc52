// ccv includes QuartzCore only for profiling helpers its attention path never calls.
#pragma once
