// The lifetime of ccv's scratch buffer across calls encoded into one command buffer.
//
// ccv's context holds one scratch buffer (fp32 copies of half outputs, the backward's D
// term) and replaces it when a call needs more (mfa::context::request_scratch), releasing
// the old one. Dispatches encoded before (a forward, then its backward, in the same
// PyTorch command buffer) still bind the old one until that command buffer completes, and
// no buffer a recorded dispatch binds may be released before then.
//
// Plain C++ on metal-cpp's API: the bridge (mfa_bridge.mm) and the engine's driver
// (tools/engine/driver.cpp), whose stand-in device fails a run on such a release, use the
// same keeper.
#pragma once

#include "ccv_nnc_mfa.hpp"

namespace mfa_sdpa {

// Made before a call's prepare (where ccv grows the scratch; an allocation that fails
// throws before anything is replaced), it holds the scratch of before the call.
class ScratchKeeper {
 public:
  explicit ScratchKeeper(ccv_nnc_mfa_context_t* context)
      : context_(context), before_(NS::RetainPtr(context->scratch.get())) {}

  // The scratch ccv replaced during the call, retained, or empty: the caller holds it
  // until the command buffer now being encoded completes (buffers of one queue complete
  // in order, so every earlier user of it is done by then).
  NS::SharedPtr<MTL::Buffer> replaced() const {
    return context_->scratch.get() == before_.get() ? NS::SharedPtr<MTL::Buffer>() : before_;
  }

 private:
  ccv_nnc_mfa_context_t* context_;
  NS::SharedPtr<MTL::Buffer> before_;
};

}  // namespace mfa_sdpa
