// ccv's libdispatch wrapper: its attention path needs none of it (see Metal.hpp for the one
// libdispatch call ccv's context makes).
#pragma once
#include "Metal.hpp"
